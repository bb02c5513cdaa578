"""Census-Income baselines from torch-rechub, and wrappers that make any model answer
``{task: prediction}`` as `fxfuse.train.fit` expects.

Single-task: `DCN` and `DeepFM` with embeddings of width 4 and an MLP of [16, 8], as
in the paper's comparison. Multi-task: `SharedBottom`, `MMOE` and `PLE` with the
settings of torch-rechub's own Census-Income example (experts [16], towers [8]).

Each builder makes fresh feature objects: torch-rechub keeps an embedding table on
the feature object that first builds it, so two models built from the same objects
would share (and co-train) their embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_rechub.models.multi_task import MMOE, PLE, SharedBottom
from torch_rechub.models.ranking import DCN, DeepFM

from tools.zoo import census_rechub_features

EMBED_DIM = 4
MLP_DIMS = [16, 8]
CROSS_LAYERS = 3


def dcn(sparse: dict[str, int], dense: Sequence[str]) -> nn.Module:
    """Deep & Cross Network: 3 cross layers beside an MLP of [16, 8]."""
    sparse_features, dense_features = census_rechub_features(
        sparse, list(dense), EMBED_DIM
    )
    return DCN(
        sparse_features + dense_features,
        n_cross_layers=CROSS_LAYERS,
        mlp_params={"dims": list(MLP_DIMS)},
    )


def deepfm(sparse: dict[str, int], dense: Sequence[str]) -> nn.Module:
    """DeepFM: first- and second-order terms of the sparse features plus an MLP."""
    sparse_features, dense_features = census_rechub_features(
        sparse, list(dense), EMBED_DIM
    )
    return DeepFM(
        deep_features=sparse_features + dense_features,
        fm_features=sparse_features,
        mlp_params={"dims": list(MLP_DIMS)},
    )


def multi_task(name: str, sparse: dict[str, int], dense: Sequence[str]) -> nn.Module:
    """One of torch-rechub's two-task models: "sharedbottom", "mmoe" or "ple".

    Returns:
        The model; its output is ``[B, 2]`` probabilities (income, never married).
    """
    sparse_features, dense_features = census_rechub_features(
        sparse, list(dense), EMBED_DIM
    )
    features = sparse_features + dense_features
    task_types = ["classification", "classification"]
    towers = [{"dims": [8]}, {"dims": [8]}]
    if name == "sharedbottom":
        return SharedBottom(
            features, task_types, bottom_params={"dims": [16]}, tower_params_list=towers
        )
    if name == "mmoe":
        return MMOE(
            features,
            task_types,
            n_expert=8,
            expert_params={"dims": [16]},
            tower_params_list=towers,
        )
    if name == "ple":
        return PLE(
            features,
            task_types,
            n_level=1,
            n_expert_specific=2,
            n_expert_shared=1,
            expert_params={"dims": [16]},
            tower_params_list=towers,
        )
    raise ValueError(
        f"unknown multi-task model {name!r}; use sharedbottom, mmoe or ple"
    )


class SingleTask(nn.Module):
    """A single-task model that answers ``{task: prediction}``.

    With ``keep_eval``, the model stays in eval mode even while it trains (BatchNorm
    uses its running statistics, dropout is off), as the stages of a fused model do.
    """

    def __init__(self, task: str, model: nn.Module, keep_eval: bool = False):
        super().__init__()
        self.task = task
        self.model = model
        self.keep_eval = keep_eval

    def train(self, mode: bool = True) -> SingleTask:
        super().train(mode)
        if self.keep_eval:
            self.model.eval()
        return self

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.task: self.model(features)}


class MultiTask(nn.Module):
    """A model whose output ``[B, T]`` holds one column per task, as a dict."""

    def __init__(self, tasks: Sequence[str], model: nn.Module):
        super().__init__()
        self.tasks = list(tasks)
        self.model = model

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.model(features)
        return {task: out[:, k] for k, task in enumerate(self.tasks)}


class Average(nn.Module):
    """The plain average of trained single-task models: per task, the mean of its
    models' predicted probabilities."""

    def __init__(self, tasks: dict[str, Sequence[nn.Module]]):
        super().__init__()
        self.tasks = list(tasks)
        self.members = nn.ModuleDict(
            {task: nn.ModuleList(models) for task, models in tasks.items()}
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            task: torch.stack([m(features) for m in self.members[task]]).mean(0)
            for task in self.tasks
        }
