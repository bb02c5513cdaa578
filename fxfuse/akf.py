"""Adaptive Knowledge Fusion (AKF): the trainable modules of a fused model.

One `AKF` sits at each fusion level. It sees every model's value at that level's cut,
lets the models of one task and then the tasks exchange information through small
tokens, and adds what it learned back onto each value. Its output projections start
at zero, so an untrained AKF returns its inputs unchanged and the fused model starts
as the models it was built from.

One `HeadMixer` per task mixes the final predictions of that task's models, starting
from their (weighted) mean.

Every module here is out of place, differentiable and capturable by
``torch.export.export(..., strict=False)`` with a dynamic batch dimension, by
``torch.onnx.export(..., dynamo=True)``, and by ``torch.fx.symbolic_trace`` inside a
model that calls them, such as the fused model (the checks of the values' shapes run
in eager mode and under export, and are skipped for fx proxies, which have no
shape). The attention is written out (broadcast products for a few tokens,
`torch.nn.functional.scaled_dot_product_attention` for more) because the eval-mode
fast path of `nn.MultiheadAttention` does not export.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AKF", "HeadMixer", "Member", "TaskEncoderLayer", "TaskGate"]


@dataclass(frozen=True)
class Member:
    """One model's value at a cut, as AKF sees it.

    Attributes:
        name: Model name, e.g. ``"income_mlp8"``.
        task: The task the model serves.
        channels: Size of the channel dimension of the value at this cut.
        channel_dim: ``1`` for channel-first layouts (convolution outputs
            ``[B, C, H, W]``, ``[B, C, L]``), ``-1`` for channel-last ones (``[B, C]``,
            ``[B, T, C]``, ``[B, H, W, C]``).
        ndim: Number of dimensions of the value, at least 2; dimension 0 is the batch.

    Example:
        A ResNet stage output and a ViT token sequence::

            Member("resnet", "left", channels=256, channel_dim=1, ndim=4)
            Member("vit", "right", channels=192, channel_dim=-1, ndim=3)
    """

    name: str
    task: str
    channels: int
    channel_dim: int
    ndim: int

    def __post_init__(self) -> None:
        where = f"AKF member {self.name!r} (task {self.task!r})"
        if self.ndim < 2:
            raise ValueError(
                f"{where}: ndim={self.ndim}, but a value at a cut needs a batch and a "
                "channel dimension (ndim >= 2); cut the model where the value has both"
            )
        if self.channel_dim not in (1, -1):
            raise ValueError(
                f"{where}: channel_dim={self.channel_dim}; use 1 for channel-first "
                "layouts or -1 for channel-last ones"
            )
        if self.channels < 1:
            raise ValueError(f"{where}: channels={self.channels}, must be positive")

    @property
    def pooled_dims(self) -> tuple[int, ...]:
        """Dimensions averaged away when reading: all but batch and channel.

        Example::

            >>> Member("cnn", "t", 256, channel_dim=1, ndim=4).pooled_dims
            (2, 3)
            >>> Member("vit", "t", 192, channel_dim=-1, ndim=3).pooled_dims
            (1,)
        """
        if self.channel_dim == 1:
            return tuple(range(2, self.ndim))
        return tuple(range(1, self.ndim - 1))

    @property
    def write_shape(self) -> tuple[int, ...]:
        """Shape that turns a ``[B, C]`` update into one that broadcasts over the value.

        Example::

            >>> Member("cnn", "t", 256, channel_dim=1, ndim=4).write_shape
            (-1, 256, 1, 1)
            >>> Member("vit", "t", 192, channel_dim=-1, ndim=3).write_shape
            (-1, 1, 192)
        """
        ones = (1,) * (self.ndim - 2)
        if self.channel_dim == 1:
            return (-1, self.channels, *ones)
        return (-1, *ones, self.channels)

    def describe(self) -> str:
        """One short phrase for ``repr``: name, task, channels and layout."""
        layout = "channel-first" if self.channel_dim == 1 and self.ndim > 2 else "last"
        return f"{self.name}({self.task}, C={self.channels}, {self.ndim}-D {layout})"


class TaskGate(nn.Module):
    """Intra-task step: a softmax gate mixes the tokens of one task's models.

    The scores come from the tokens themselves (one learned vector dotted with each
    token). The vector starts at zero, so the gate starts as the plain mean. A task
    with one model has no parameters and passes its token through with gate 1.

    Args:
        n_members: Number of models serving the task at this cut.
        width: Token width ``d``.
    """

    def __init__(self, n_members: int, width: int):
        super().__init__()
        self.n_members = n_members
        # No bias: the softmax ignores a score shared by all members, so a bias would
        # never receive a gradient.
        self.score = nn.Linear(width, 1, bias=False) if n_members > 1 else None
        if self.score is not None:
            nn.init.zeros_(self.score.weight)

    def forward(self, tokens: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Mix ``n`` tokens of shape ``[B, d]``.

        Returns:
            The task token ``[B, d]`` and the gates ``[B, n]`` (rows sum to 1).
        """
        stacked = torch.stack(tuple(tokens), dim=1)
        if self.score is None:
            return tokens[0], torch.ones_like(stacked[..., 0])

        gates = self.score(stacked).squeeze(-1).softmax(dim=-1)
        task_token = (gates.unsqueeze(-1) * stacked).sum(dim=1)
        return task_token, gates


# Up to this many tokens (tasks), attention is computed with broadcast products
# rather than `scaled_dot_product_attention`. For a handful of tokens the fused kernel
# spends its time on setup per (row, head): on 2 CPU threads, 2 tokens of width 8 at
# batch 8192 took 11 ms with it and 1.6 ms with broadcasting; from about 4 tokens on
# the two are alike, and beyond, broadcasting's [B, T, T, d] products grow too large.
FEW_TOKENS = 4


def _attend_few(
    query: Tensor, key: Tensor, value: Tensor, dropout_p: float, training: bool
) -> Tensor:
    """Attention over ``[B, T, heads, w]`` queries, keys and values, for small T.

    Returns:
        ``[B, T, heads, w]``: each query's softmax-weighted mix of the values.
    """
    # scores[b, i, j, h] = <query[b, i, h], key[b, j, h]> / sqrt(w)
    scores = (query.unsqueeze(2) * key.unsqueeze(1)).sum(dim=-1)
    weights = (scores * query.shape[-1] ** -0.5).softmax(dim=2)
    weights = F.dropout(weights, dropout_p, training)
    return (weights.unsqueeze(-1) * value.unsqueeze(1)).sum(dim=2)


class TaskEncoderLayer(nn.Module):
    """Inter-task step: one pre-norm transformer encoder layer over task tokens.

    ``x = x + MHSA(LN(x))`` then ``x = x + FFN(LN(x))`` with a GELU feed-forward block
    of hidden width ``ff_mult * width``. The query/key/value projection has no bias:
    a key bias shifts every score of a query by the same amount, which the softmax
    ignores, and the layer norm before it already supplies an offset.

    Args:
        width: Token width ``d``; divisible by ``heads``.
        heads: Number of attention heads.
        ff_mult: Hidden width of the feed-forward block, as a multiple of ``width``.
        dropout: Dropout on attention weights and on both residual branches, active
            in training mode only.
        tokens: How many tokens the layer will see, if known. Up to `FEW_TOKENS`
            the attention uses broadcast products, which are faster there; the
            result is the same either way.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        ff_mult: int,
        dropout: float,
        tokens: int | None = None,
    ):
        super().__init__()
        self.few_tokens = tokens is not None and tokens <= FEW_TOKENS
        self.heads = heads
        self.head_width = width // heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attention_out = nn.Linear(width, width)
        self.feed_forward_norm = nn.LayerNorm(width)
        self.feed_forward = nn.Sequential(
            nn.Linear(width, ff_mult * width),
            nn.GELU(),
            nn.Linear(ff_mult * width, width),
        )
        self.residual_dropout = nn.Dropout(dropout)

    def attend(self, x: Tensor) -> Tensor:
        """Multi-head self-attention across the tokens of ``x`` (``[B, T, d]``)."""
        # [B, T, 3d] -> [B, T, 3, heads, d / heads]; only static sizes are used, so
        # the batch dimension stays symbolic under export.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, self.head_width))
        dropout_p = self.dropout if self.training else 0.0
        if self.few_tokens:
            query, key, value = qkv.unbind(2)
            mixed = _attend_few(query, key, value, dropout_p, self.training)
            return self.attention_out(mixed.flatten(-2))

        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
        return self.attention_out(mixed.transpose(1, 2).flatten(-2))

    def forward(self, x: Tensor) -> Tensor:
        """Update task tokens ``x`` of shape ``[B, T, d]``."""
        x = x + self.residual_dropout(self.attend(self.attention_norm(x)))
        x = x + self.residual_dropout(self.feed_forward(self.feed_forward_norm(x)))
        return x


class AKF(nn.Module):
    """Adaptive Knowledge Fusion at one cut: read, intra-task, inter-task, write.

    With member ``i`` serving task ``t(i)`` and ``h_i`` its value at the cut:

    1. Read: ``z_i = LayerNorm_i(W_i · pool(h_i))``; ``pool`` averages every
       dimension but batch and channel, ``W_i`` maps ``channels_i`` to ``width``.
    2. Intra-task: ``u_t = Σ_{i in t} g_{t,i} z_i`` with softmax gates computed from
       the tokens (`TaskGate`).
    3. Inter-task: ``[u_1 … u_T]`` plus learned task embeddings pass through one
       pre-norm transformer encoder layer (`TaskEncoderLayer`), giving ``v_t``.
    4. Write: ``h_i' = h_i + broadcast(W_i^out · v_{t(i)})``, with ``W_i^out`` (weight
       and bias) initialised to zero, so an untrained AKF returns its inputs exactly.

    Args:
        members: The models' values at this cut, in the order ``forward`` takes them.
        tasks: The tasks, in the order of the task tokens. Every task needs at least
            one member and every member's task must be listed.
        width: Token width ``d``.
        heads: Attention heads; must divide ``width``.
        ff_mult: Feed-forward hidden width as a multiple of ``width``.
        dropout: Dropout in the inter-task layer, in training mode only.

    Raises:
        ValueError: If the members, tasks or sizes do not fit together.

    Example::

        akf = AKF(
            [
                Member("inc_cnn", "income", 256, channel_dim=1, ndim=4),
                Member("inc_mlp", "income", 16, channel_dim=-1, ndim=2),
                Member("mar_vit", "marital", 192, channel_dim=-1, ndim=3),
            ],
            tasks=["income", "marital"],
        )
        h_cnn, h_mlp, h_vit = akf(h_cnn, h_mlp, h_vit)  # same shapes as the inputs

    Limitations:
        With a single task the attention has one token to attend to, so its query and
        key projections receive no gradient; the layer then acts as a feed-forward
        block on the task token.
    """

    def __init__(
        self,
        members: Sequence[Member],
        tasks: Sequence[str],
        width: int = 64,
        heads: int = 4,
        ff_mult: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        members, tasks = tuple(members), tuple(tasks)
        _check_settings(members, tasks, width, heads, ff_mult, dropout)
        self.members = members
        self.tasks = tasks
        self.width = width
        self.heads = heads
        self.member_tasks = tuple(tasks.index(member.task) for member in members)
        self.task_members = tuple(
            tuple(i for i, member in enumerate(members) if member.task == task)
            for task in tasks
        )

        self.readers = nn.ModuleList(nn.Linear(m.channels, width) for m in members)
        self.read_norms = nn.ModuleList(nn.LayerNorm(width) for _ in members)
        self.gates = nn.ModuleList(
            TaskGate(len(indices), width) for indices in self.task_members
        )
        self.task_embeddings = nn.Parameter(torch.empty(len(tasks), width))
        nn.init.trunc_normal_(self.task_embeddings, std=0.02)
        self.encoder = TaskEncoderLayer(width, heads, ff_mult, dropout, len(tasks))
        self.writers = nn.ModuleList(nn.Linear(width, m.channels) for m in members)
        for writer in self.writers:
            nn.init.zeros_(writer.weight)
            nn.init.zeros_(writer.bias)

    def read(self, values: Sequence[Tensor]) -> list[Tensor]:
        """Step 1: one ``[B, width]`` token per member."""
        tokens = []
        for member, reader, norm, value in zip(
            self.members, self.readers, self.read_norms, values, strict=True
        ):
            pooled = value.mean(dim=member.pooled_dims) if member.ndim > 2 else value
            tokens.append(norm(reader(pooled)))
        return tokens

    def intra_task(self, tokens: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Step 2: task tokens ``[B, T, width]`` and each task's gates ``[B, n_t]``."""
        task_tokens, gates = [], []
        for gate, indices in zip(self.gates, self.task_members, strict=True):
            task_token, task_gates = gate([tokens[i] for i in indices])
            task_tokens.append(task_token)
            gates.append(task_gates)
        return torch.stack(task_tokens, dim=1), gates

    def inter_task(self, task_tokens: Tensor) -> Tensor:
        """Step 3: task tokens ``[B, T, width]`` after attending across tasks."""
        return self.encoder(task_tokens + self.task_embeddings)

    def write(
        self, values: Sequence[Tensor], task_tokens: Tensor
    ) -> tuple[Tensor, ...]:
        """Step 4: each value plus its task token projected and broadcast back."""
        updated = []
        for member, writer, task, value in zip(
            self.members, self.writers, self.member_tasks, values, strict=True
        ):
            update = writer(task_tokens[:, task]).reshape(member.write_shape)
            updated.append(value + update)
        return tuple(updated)

    def forward(self, *values: Tensor) -> tuple[Tensor, ...]:
        """Fuse the members' values at this cut.

        Args:
            *values: ``values[i]`` is member ``i``'s value at this cut.

        Returns:
            The updated values, with the same shapes and in the same order.
        """
        self._check_values(values)
        tokens = self.read(values)
        task_tokens, _ = self.intra_task(tokens)
        task_tokens = self.inter_task(task_tokens)
        return self.write(values, task_tokens)

    def _check_values(self, values: Sequence[Tensor]) -> None:
        # Only static sizes are compared (rank and channels), never the batch, so the
        # checks add no guards under torch.export.
        if len(values) != len(self.members):
            names = ", ".join(member.name for member in self.members)
            raise ValueError(
                f"AKF got {len(values)} values but has {len(self.members)} members "
                f"({names}); pass one value per member, in that order"
            )
        for member, value in zip(self.members, values, strict=True):
            if isinstance(value, fx.Proxy):
                continue  # symbolic tracing: no shape to check
            fits = value.ndim == member.ndim
            fits = fits and value.shape[member.channel_dim] == member.channels
            if not fits:
                raise ValueError(
                    f"AKF member {member.name!r}: expected a {member.ndim}-D value "
                    f"with {member.channels} channels in dim {member.channel_dim}, "
                    f"got shape {tuple(value.shape)}; check the cut's layout in the "
                    "fusion plan"
                )

    def extra_repr(self) -> str:
        members = ", ".join(member.describe() for member in self.members)
        return (
            f"members=[{members}], tasks=[{', '.join(self.tasks)}], "
            f"width={self.width}, heads={self.heads}"
        )


def _check_settings(
    members: tuple[Member, ...],
    tasks: tuple[str, ...],
    width: int,
    heads: int,
    ff_mult: int,
    dropout: float,
) -> None:
    """Raise a ValueError naming the first AKF setting that cannot work."""
    if not members:
        raise ValueError("AKF needs at least one member")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"AKF tasks {list(tasks)} contain a duplicate; list each once")
    served = {member.task for member in members}
    for member in members:
        if member.task not in tasks:
            raise ValueError(
                f"AKF member {member.name!r} serves task {member.task!r}, which is not "
                f"among the tasks {list(tasks)}; add it to the tasks"
            )
    for task in tasks:
        if task not in served:
            raise ValueError(
                f"AKF task {task!r} has no member at this cut; every task needs at "
                "least one model"
            )
    if width < 1 or heads < 1 or ff_mult < 1:
        raise ValueError(
            f"AKF width={width}, heads={heads}, ff_mult={ff_mult}: all must be positive"
        )
    if width % heads:
        raise ValueError(
            f"AKF width={width} is not divisible by heads={heads}; choose a width "
            "that is a multiple of the number of heads, or fewer heads"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"AKF dropout={dropout} must be in [0, 1)")


class HeadMixer(nn.Module):
    """Mixes one task's models' predictions: ``Σ_i w_i p_i``, ``w = softmax(logits)``.

    The logits start at ``log(weights)`` (normalised; uniform when ``weights`` is
    None), so an untrained mixer returns the (weighted) mean of the predictions, and
    exactly the prediction when there is one model.

    With ``context_width``, ``forward`` also takes a context vector per input (for
    example the task token of the last AKF) and adds ``Linear(context)`` to the
    logits. That linear map starts at zero, so it changes nothing until trained.

    Args:
        n_models: Number of predictions to mix.
        weights: Initial mixing weights, positive, one per model.
        context_width: Width of the optional context input.

    Raises:
        ValueError: If ``weights`` does not have ``n_models`` positive entries.

    Example::

        mixer = HeadMixer(2, weights=[3, 1])
        mixer(p_a, p_b)  # == 0.75 * p_a + 0.25 * p_b until trained
    """

    def __init__(
        self,
        n_models: int,
        weights: Sequence[float] | None = None,
        context_width: int | None = None,
        per_input: bool = False,
        prediction_size: int = 1,
    ):
        super().__init__()
        if n_models < 1:
            raise ValueError(f"HeadMixer needs at least one model, got {n_models}")
        if weights is None:
            weights = [1.0] * n_models
        if len(weights) != n_models or not all(w > 0 for w in weights):
            raise ValueError(
                f"HeadMixer weights {list(weights)} must be {n_models} positive numbers"
            )
        if context_width is not None and context_width < 1:
            raise ValueError(
                f"HeadMixer context_width={context_width} must be positive"
            )

        self.n_models = n_models
        total = math.fsum(weights)
        self.logits = nn.Parameter(
            torch.tensor([math.log(w / total) for w in weights], dtype=torch.float32)
        )
        self.context_correction = None
        if context_width is not None:
            self.context_correction = nn.Linear(context_width, n_models)
            nn.init.zeros_(self.context_correction.weight)
            nn.init.zeros_(self.context_correction.bias)
        # Per-input mixing from the predictions themselves: which model is confident
        # on this input. Zero-initialised like the context correction.
        self.per_input = None
        if per_input and n_models > 1:
            self.per_input = nn.Linear(n_models * prediction_size, n_models)
            nn.init.zeros_(self.per_input.weight)
            nn.init.zeros_(self.per_input.bias)

    def set_weights(self, weights: Sequence[float]) -> None:
        """Restart the mixing from these weights (positive, one per model)."""
        if len(weights) != self.n_models or not all(w > 0 for w in weights):
            raise ValueError(
                f"HeadMixer weights {list(weights)} must be {self.n_models} positive "
                "numbers"
            )
        total = math.fsum(weights)
        with torch.no_grad():
            self.logits.copy_(torch.tensor([math.log(w / total) for w in weights]))

    def forward(self, *predictions: Tensor, context: Tensor | None = None) -> Tensor:
        """Mix predictions of one shape: ``[B]``, ``[B, 1]`` or ``[B, K]``.

        Args:
            *predictions: One prediction per model, all of the same shape.
            context: ``[B, context_width]``; required exactly when the mixer was
                built with ``context_width``.

        Returns:
            The mixed prediction, shaped like each input.
        """
        if len(predictions) != self.n_models:
            raise ValueError(
                f"HeadMixer got {len(predictions)} predictions, expected "
                f"{self.n_models}, one per model of the task"
            )
        if (context is None) != (self.context_correction is None):
            raise ValueError(
                "HeadMixer: pass context exactly when the mixer has a context_width"
            )

        stacked = torch.stack(predictions, dim=-1)
        if self.context_correction is None and self.per_input is None:
            return (stacked * self.logits.softmax(dim=-1)).sum(dim=-1)

        # Per-input weights [B, n] broadcast over [..., B, n]: the batch dim is moved
        # next to the model dim and back, which works for any prediction rank.
        logits = self.logits
        if self.context_correction is not None:
            logits = logits + self.context_correction(context)
        if self.per_input is not None:
            logits = logits + self.per_input(stacked.flatten(1))
        batch_next_to_models = stacked.movedim(0, -2)
        mixed = (batch_next_to_models * logits.softmax(dim=-1)).sum(dim=-1)
        return mixed.movedim(-1, 0)

    def extra_repr(self) -> str:
        context = self.context_correction
        width = None if context is None else context.in_features
        per_input = self.per_input is not None
        return f"n_models={self.n_models}, context_width={width}, per_input={per_input}"
