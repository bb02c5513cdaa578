"""Single-task models for MultiFashion, written the way a user would write them.

MultiFashion images are 1x36x36 grayscale: two Fashion-MNIST items overlapped, one
task per item. Each model below predicts one item's class and is trained on its own;
fxfuse later fuses several of them into one multi-task model.

The three models cover the three families fusion has to connect: a residual CNN, an
inverted-residual (MobileNetV2-style) CNN and a vision transformer. None of them
branches on tensor values or shapes, so `torch.fx.symbolic_trace` captures each one
whole, and all convolutions run in `torch.channels_last` as well as in the default
layout.

Example::

    model = SmallResNet(num_classes=10)
    logits = model(torch.randn(8, 1, 36, 36))  # [8, 10]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallMobileNet", "SmallResNet", "SmallViT"]


def _conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
) -> list[nn.Module]:
    """A bias-free convolution followed by BatchNorm, padded to keep the size."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=kernel_size // 2,
        groups=groups,
        bias=False,
    )
    return [conv, nn.BatchNorm2d(out_channels)]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the first convolution; the shortcut is a strided 1x1
            convolution whenever the stride or the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_channels, out_channels, stride=stride)
        self.conv2, self.bn2 = _conv_bn(out_channels, out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                *_conv_bn(in_channels, out_channels, kernel_size=1, stride=stride)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class SmallResNet(nn.Module):
    """A ResNet for 36x36 images: a stem and three stages of two basic blocks.

    The stem convolution has stride 2, so the stages work at 18x18, 9x9 and 5x5.
    About 0.7M parameters with the default widths.

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input image.
        widths: Channels of the three stages.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (32, 64, 128),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(in_channels, widths[0], stride=2), nn.ReLU(inplace=True)
        )
        stages = []
        previous = widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            stages.append(
                nn.Sequential(
                    BasicBlock(previous, width, stride), BasicBlock(width, width)
                )
            )
            previous = width
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.fc(x.mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        stride: Stride of the depthwise convolution.
        expansion: Ratio of the hidden width to `in_channels`; 1 skips the
            expansion convolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expansion: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(in_channels, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [
            *_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.ReLU6(inplace=True),
            *_conv_bn(hidden, out_channels, 1),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


class SmallMobileNet(nn.Module):
    """A MobileNetV2-style network for 36x36 images, about 0.2M parameters.

    The stem has stride 2; the blocks then work at 18x18, 9x9 and 5x5.

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input image.
        last_channels: Width of the final 1x1 convolution before pooling.
    """

    # (expansion, output channels, blocks, stride of the first block)
    settings = (
        (1, 16, 1, 1),
        (4, 24, 2, 2),
        (4, 32, 2, 1),
        (4, 64, 2, 2),
        (4, 96, 1, 1),
    )

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, last_channels: int = 320
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            *_conv_bn(in_channels, 16, stride=2),
            nn.ReLU6(inplace=True),
        ]
        previous = 16
        for expansion, channels, blocks, stride in self.settings:
            for index in range(blocks):
                block_stride = stride if index == 0 else 1
                layers.append(
                    InvertedResidual(previous, channels, block_stride, expansion)
                )
                previous = channels
        layers += [*_conv_bn(previous, last_channels, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(0.1), nn.Linear(last_channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over tokens, computed by
    `torch.nn.functional.scaled_dot_product_attention`.

    Args:
        width: Token width.
        heads: Number of heads; must divide `width`.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, N, 3 * width] -> [3, B, heads, N, head width], without reading shapes.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention, then a GELU feed-forward network.

    Args:
        width: Token width.
        heads: Number of attention heads.
        mlp_ratio: Hidden width of the feed-forward network over `width`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A vision transformer for 36x36 images: 6x6 patches, 36 tokens and a class
    token, four pre-norm blocks and a linear head on the class token.

    About 0.45M parameters with the default width of 96.

    Args:
        num_classes: Number of output classes.
        in_channels: Channels of the input image.
        image_size: Side of the square input image; a multiple of `patch_size`.
        patch_size: Side of a square patch.
        width: Token width.
        depth: Number of transformer blocks.
        heads: Number of attention heads.
        mlp_ratio: Hidden width of the feed-forward networks over `width`.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 36,
        patch_size: int = 6,
        width: int = 96,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of patch_size {patch_size}"
            )
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(
            in_channels, width, kernel_size=patch_size, stride=patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, width) * 0.02)
        self.blocks = nn.Sequential(
            *(EncoderBlock(width, heads, mlp_ratio) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, tokens, width]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.size(0), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.blocks(x)
        return self.head(self.norm(x[:, 0]))
