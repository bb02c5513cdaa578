"""Train the MultiFashion models as a user would, before fxfuse sees them.

`fxfuse.train.fit` trains any module that returns ``{task: prediction}``, so a
single-task model is wrapped in `TaskModel`; the hard-parameter-sharing baseline
`SharedTrunk` returns both tasks itself. Convolutional models train in
``torch.channels_last``, which is faster on CPU; `export_archive` turns them back to
the default layout and writes a ``.pt2`` archive with a dynamic batch, which is what
``fxfuse fuse`` takes.

Example::

    model = TaskModel(SmallResNet(), "left", channels_last=True)
    fit(model, data.train, data.val, {"left": "multiclass"}, TrainConfig(epochs=2))
    export_archive(model.model, batch, "runs/multifashion/resnet.pt2")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from examples.multifashion.models import SmallResNet

__all__ = ["SharedTrunk", "TaskModel", "export_archive", "to_layout"]


def to_layout(x: Tensor, channels_last: bool) -> Tensor:
    """`x` in ``channels_last`` when asked and 4-D, else unchanged."""
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


class TaskModel(nn.Module):
    """A single-task model that answers ``{task: logits}``, as `fit` expects.

    Args:
        model: The plain model, ``model(x) -> logits``.
        task: The task it predicts.
        channels_last: Run the model and its inputs in ``torch.channels_last``.
    """

    def __init__(self, model: nn.Module, task: str, channels_last: bool = False):
        super().__init__()
        self.model = (
            model.to(memory_format=torch.channels_last) if channels_last else model
        )
        self.task = task
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {self.task: self.model(to_layout(x, self.channels_last))}


class SharedTrunk(nn.Module):
    """Hard parameter sharing: one SmallResNet trunk, one linear head per task.

    The trunk is SmallResNet up to its pooled features; each task gets its own
    classifier on them, and the task losses are summed in training.

    Args:
        tasks: The task names, one head each.
        num_classes: Classes of every task.
        widths: Channels of the trunk's three stages (as in SmallResNet).
        channels_last: Run the trunk and its inputs in ``torch.channels_last``.
    """

    def __init__(
        self,
        tasks: Sequence[str] = ("left", "right"),
        num_classes: int = 10,
        widths: tuple[int, int, int] = (32, 64, 128),
        channels_last: bool = False,
    ):
        super().__init__()
        self.trunk = SmallResNet(num_classes, widths=widths)
        self.trunk.fc = nn.Identity()  # the trunk ends at the pooled features
        self.heads = nn.ModuleDict(
            {task: nn.Linear(widths[-1], num_classes) for task in tasks}
        )
        self.channels_last = channels_last
        if channels_last:
            self.trunk.to(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(to_layout(x, self.channels_last))
        return {task: head(features) for task, head in self.heads.items()}


def export_archive(
    model: nn.Module, batch: Tensor, path: str | os.PathLike
) -> torch.export.ExportedProgram:
    """Save `model` as a ``.pt2`` archive whose batch dimension is dynamic.

    The model is put in eval mode and in the default memory layout first, so the
    archive runs on ordinary contiguous inputs. The archive also stores `batch` as
    its example inputs, which ``fxfuse inspect`` and ``fxfuse fuse`` use.

    Args:
        model: The trained model.
        batch: A few example inputs (at least 2 rows).
        path: The ``.pt2`` file to write.

    Returns:
        The exported program.
    """
    model = model.to(memory_format=torch.contiguous_format).eval()
    program = torch.export.export(
        model, (batch,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.pt2")
    torch.export.save(program, partial)
    partial.replace(path)
    return program
