"""Model builders shared by the tests and the benchmarks.

Every entry of the zoo is a `ZooModel`: a name, a function that builds a fresh model
with fixed random weights (never downloaded ones) in eval mode, a function that makes
example inputs at batch 2, and the model's family. Three groups exist:

- `torchvision_models()`: classification models from every torchvision family, with
  10 classes and the smallest convenient input size each accepts.
- `rechub_models()`: ranking and multi-task models from torch-rechub on a small
  synthetic feature set; their input is one dict from feature name to a `[batch]`
  tensor.
- `multifashion_models()`: the single-task example models of `examples/multifashion`.

Example::

    for entry in all_models():
        model = entry.build()
        output = model(*entry.example_inputs())
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torchvision
from torch import nn

from examples.multifashion.models import SmallMobileNet, SmallResNet, SmallViT

if TYPE_CHECKING:
    from torch_rechub.basic.features import DenseFeature, SparseFeature

NUM_CLASSES = 10
BATCH = 2


@dataclass
class ZooModel:
    """One model of the zoo.

    Attributes:
        name: Unique name, e.g. `"resnet18"`.
        build: Returns a fresh model in eval mode. Called with no arguments it uses
            seed 0; `build(seed=1)` gives the same architecture with other weights,
            as two independently trained models would have.
        example_inputs: Returns the positional arguments of `forward` at batch 2,
            always as a tuple (a dict input is one positional argument). Takes an
            optional `seed` as well.
        family: Architecture family, e.g. `"resnet"`, `"vit"`, `"rechub"`.
        slow: True for the heaviest models (building and one forward take a
            second or more on two CPU cores); tests mark them `slow`.
    """

    name: str
    build: Callable[..., nn.Module]
    example_inputs: Callable[..., tuple]
    family: str
    slow: bool = False


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seeds torch's CPU generator inside the block and restores the caller's state
    afterwards, so building a model does not shift anyone else's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _image(size: int, seed: int = 0, channels: int = 3) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, channels, size, size, generator=generator),)


# --------------------------------------------------------------------- torchvision


def _build_torchvision(
    constructor: Callable[..., nn.Module], kwargs: dict[str, Any], seed: int = 0
) -> nn.Module:
    with _seeded(seed):
        return constructor(**kwargs).eval()


def _torchvision_entry(
    name: str,
    family: str,
    size: int,
    *,
    constructor: Callable[..., nn.Module] | None = None,
    slow: bool = False,
    **kwargs: Any,
) -> ZooModel:
    if constructor is None:
        constructor = getattr(torchvision.models, name)
        kwargs = {"weights": None, "num_classes": NUM_CLASSES, **kwargs}
    return ZooModel(
        name=name,
        build=functools.partial(_build_torchvision, constructor, kwargs),
        example_inputs=functools.partial(_image, size),
        family=family,
        slow=slow,
    )


def torchvision_models() -> list[ZooModel]:
    """Classification models covering every torchvision family.

    Input sizes are 64x64 unless the model needs more: `inception_v3` accepts 75x75
    at least, `vit_b_16` is fixed to 224x224 by its position embedding and
    `maxvit_t` needs 224x224 for its 7x7 partitions. `vit_small` and
    `maxvit_small` are reduced versions of those two that run at 64x64.

    Returns:
        One `ZooModel` per model, 10 classes each.
    """
    no_aux = {"aux_logits": False, "init_weights": False}
    vit_small = {
        "image_size": 64,
        "patch_size": 16,
        "num_layers": 2,
        "num_heads": 2,
        "hidden_dim": 64,
        "mlp_dim": 128,
        "num_classes": NUM_CLASSES,
    }
    maxvit_small = {
        "input_size": (64, 64),
        "stem_channels": 16,
        "partition_size": 2,
        "block_channels": [16, 32, 64, 128],
        "block_layers": [1, 1, 1, 1],
        "head_dim": 16,
        "stochastic_depth_prob": 0.0,
        "num_classes": NUM_CLASSES,
    }
    return [
        _torchvision_entry("resnet18", "resnet", 64),
        _torchvision_entry("resnet34", "resnet", 64),
        _torchvision_entry("resnet50", "resnet", 64),
        _torchvision_entry("resnext50_32x4d", "resnext", 64),
        _torchvision_entry("wide_resnet50_2", "wide_resnet", 64, slow=True),
        _torchvision_entry("mobilenet_v2", "mobilenet_v2", 64),
        _torchvision_entry("mobilenet_v3_small", "mobilenet_v3", 64),
        _torchvision_entry("mobilenet_v3_large", "mobilenet_v3", 64),
        _torchvision_entry("efficientnet_b0", "efficientnet", 64),
        _torchvision_entry("efficientnet_v2_s", "efficientnet_v2", 64),
        _torchvision_entry("regnet_y_400mf", "regnet", 64),
        _torchvision_entry("regnet_x_400mf", "regnet", 64),
        _torchvision_entry("convnext_tiny", "convnext", 64),
        _torchvision_entry("vit_b_16", "vit", 224, slow=True),
        _torchvision_entry(
            "vit_small",
            "vit",
            64,
            constructor=torchvision.models.VisionTransformer,
            **vit_small,
        ),
        _torchvision_entry("swin_t", "swin", 64),
        _torchvision_entry("swin_v2_t", "swin", 64, slow=True),
        _torchvision_entry("maxvit_t", "maxvit", 224, slow=True),
        _torchvision_entry(
            "maxvit_small",
            "maxvit",
            64,
            constructor=torchvision.models.MaxVit,
            **maxvit_small,
        ),
        _torchvision_entry("densenet121", "densenet", 64),
        _torchvision_entry("squeezenet1_0", "squeezenet", 64),
        _torchvision_entry("squeezenet1_1", "squeezenet", 64),
        _torchvision_entry("shufflenet_v2_x0_5", "shufflenet", 64),
        _torchvision_entry("shufflenet_v2_x1_0", "shufflenet", 64),
        _torchvision_entry("mnasnet0_5", "mnasnet", 64),
        _torchvision_entry("mnasnet1_0", "mnasnet", 64),
        _torchvision_entry("googlenet", "googlenet", 64, **no_aux),
        _torchvision_entry("inception_v3", "inception", 75, **no_aux),
        _torchvision_entry("alexnet", "alexnet", 64),
        _torchvision_entry("vgg11", "vgg", 64, slow=True),
        _torchvision_entry("vgg11_bn", "vgg", 64, slow=True),
    ]


# ----------------------------------------------------------------------- rechub

#: Synthetic features for the torch-rechub models: vocabulary size per sparse
#: feature, and the dense feature names.
SYNTHETIC_SPARSE = {
    "sparse_0": 10,
    "sparse_1": 20,
    "sparse_2": 30,
    "sparse_3": 40,
    "sparse_4": 50,
}
SYNTHETIC_DENSE = ["dense_0", "dense_1", "dense_2"]


def census_rechub_features(
    sparse: dict[str, int], dense: list[str], embed_dim: int = 4
) -> tuple[list[SparseFeature], list[DenseFeature]]:
    """Makes torch-rechub feature objects for a tabular data set.

    A `SparseFeature` creates its embedding table on first use and keeps it, so
    two models built from the same objects share their tables. Each call returns
    new objects; build each model from its own call to keep the models
    independent.

    Args:
        sparse: Vocabulary size per categorical column.
        dense: Names of the numeric columns.
        embed_dim: Embedding width of every sparse feature.

    Returns:
        The sparse features and the dense features, in the order given.
    """
    # Imported here: torch-rechub pulls in scikit-learn and pandas, which the
    # vision models do not need.
    from torch_rechub.basic.features import DenseFeature, SparseFeature

    sparse_features = [
        SparseFeature(name, vocab_size=vocab, embed_dim=embed_dim)
        for name, vocab in sparse.items()
    ]
    dense_features = [DenseFeature(name) for name in dense]
    return sparse_features, dense_features


def _rechub_inputs(seed: int = 0) -> tuple[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        name: torch.randint(vocab, (BATCH,), generator=generator)
        for name, vocab in SYNTHETIC_SPARSE.items()
    }
    for name in SYNTHETIC_DENSE:
        inputs[name] = torch.randn(BATCH, generator=generator)
    return (inputs,)


def _build_rechub(name: str, seed: int = 0) -> nn.Module:
    from torch_rechub.models.multi_task import MMOE, PLE, SharedBottom
    from torch_rechub.models.ranking import DCN, DeepFM, WideDeep

    with _seeded(seed):
        sparse, dense = census_rechub_features(SYNTHETIC_SPARSE, SYNTHETIC_DENSE)
        features = sparse + dense
        two_tasks = ["classification", "classification"]
        towers = [{"dims": [8]}, {"dims": [8]}]
        if name == "widedeep":
            model = WideDeep(
                wide_features=sparse, deep_features=features, mlp_params={"dims": [16]}
            )
        elif name == "deepfm":
            model = DeepFM(
                deep_features=features, fm_features=sparse, mlp_params={"dims": [16]}
            )
        elif name == "dcn":
            model = DCN(features, n_cross_layers=2, mlp_params={"dims": [16]})
        elif name == "mmoe":
            model = MMOE(
                features,
                two_tasks,
                n_expert=3,
                expert_params={"dims": [16]},
                tower_params_list=towers,
            )
        elif name == "ple":
            model = PLE(
                features,
                two_tasks,
                n_level=2,
                n_expert_specific=1,
                n_expert_shared=1,
                expert_params={"dims": [16]},
                tower_params_list=towers,
            )
        elif name == "sharedbottom":
            model = SharedBottom(
                features,
                two_tasks,
                bottom_params={"dims": [16]},
                tower_params_list=towers,
            )
        else:
            raise ValueError(f"unknown torch-rechub model {name!r}")
    return model.eval()


def rechub_models() -> list[ZooModel]:
    """torch-rechub models on the synthetic features `SYNTHETIC_SPARSE` (embedding
    width 4) and `SYNTHETIC_DENSE`.

    Ranking models (`widedeep`, `deepfm`, `dcn`) return a probability of shape
    `[batch]`; multi-task models (`mmoe`, `ple`, `sharedbottom`) return two task
    probabilities of shape `[batch, 2]`. Every model has its own embedding tables.

    Returns:
        One `ZooModel` per model, family `"rechub"`.
    """
    names = ["widedeep", "deepfm", "dcn", "mmoe", "ple", "sharedbottom"]
    return [
        ZooModel(
            name=name,
            build=functools.partial(_build_rechub, name),
            example_inputs=_rechub_inputs,
            family="rechub",
        )
        for name in names
    ]


# ------------------------------------------------------------------- multifashion


def _build_multifashion(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    with _seeded(seed):
        return cls(num_classes=NUM_CLASSES).eval()


def multifashion_models() -> list[ZooModel]:
    """The single-task MultiFashion example models, on 1x36x36 images.

    Returns:
        `SmallResNet`, `SmallMobileNet` and `SmallViT` as `ZooModel`s, 10 classes.
    """
    models = [
        ("multifashion_resnet", SmallResNet, "resnet"),
        ("multifashion_mobilenet", SmallMobileNet, "mobilenet_v2"),
        ("multifashion_vit", SmallViT, "vit"),
    ]
    return [
        ZooModel(
            name=name,
            build=functools.partial(_build_multifashion, cls),
            example_inputs=functools.partial(_image, 36, channels=1),
            family=family,
        )
        for name, cls, family in models
    ]


def all_models() -> list[ZooModel]:
    """Every model of the zoo: torchvision, torch-rechub, then MultiFashion."""
    return torchvision_models() + rechub_models() + multifashion_models()
