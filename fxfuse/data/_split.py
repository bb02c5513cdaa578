"""The containers every loader returns: a `Split` of rows and a `Dataset` of splits.

A split holds its rows as tensors whose first dimension is the row, so taking a
subset is one indexing operation per tensor and a model gets its batch as one
positional argument (`Split.args`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import InputError

Inputs = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Split:
    """Rows of one part of a data set, as tensors whose first dimension is the row.

    Attributes:
        inputs: What a model takes as one positional argument: an image tensor, or a
            dict from feature name to a ``[N]`` tensor (int64 for sparse features,
            float32 for dense ones).
        labels: Task name to a ``[N]`` tensor: float32 0/1 for binary tasks, int64
            class ids for multi-class tasks, float32 for regression.
    """

    inputs: Inputs
    labels: dict[str, torch.Tensor]

    def __post_init__(self):
        lengths = {name: len(t) for name, t in self._tensors().items()}
        if len(set(lengths.values())) > 1:
            raise InputError(
                f"Split tensors disagree on the number of rows: {lengths}; "
                "every input and label tensor needs the same first dimension"
            )

    def __len__(self) -> int:
        return len(next(iter(self._tensors().values())))

    def take(self, index: torch.Tensor | slice) -> Split:
        """Return the rows at ``index`` (a tensor of row indices or a slice)."""
        if isinstance(self.inputs, dict):
            inputs = {name: t[index] for name, t in self.inputs.items()}
        else:
            inputs = self.inputs[index]
        labels = {task: t[index] for task, t in self.labels.items()}
        return Split(inputs, labels)

    def args(self) -> tuple:
        """Return the positional arguments a model takes: ``(self.inputs,)``."""
        return (self.inputs,)

    def _tensors(self) -> dict[str, torch.Tensor]:
        if isinstance(self.inputs, dict):
            tensors = {f"input {name!r}": t for name, t in self.inputs.items()}
        else:
            tensors = {"inputs": self.inputs}
        tensors.update({f"label {task!r}": t for task, t in self.labels.items()})
        return tensors


@dataclass
class Dataset:
    """A data set split into train, validation and test rows, with its tasks.

    Attributes:
        train: Rows to fit on.
        val: Rows to choose settings and stop training on.
        test: Rows to report on.
        tasks: Task name to its kind: ``"binary"``, ``"multiclass"`` or
            ``"regression"``.
        sparse: Tabular data only: sparse feature name to its vocabulary size (ids
            ``0 .. size - 1`` occur). Empty for images.
        dense: Tabular data only: the dense (float) feature names. Empty for images.
        num_classes: Multi-class task name to its number of classes.
    """

    train: Split
    val: Split
    test: Split
    tasks: dict[str, str]
    sparse: dict[str, int] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    num_classes: dict[str, int] = field(default_factory=dict)

    def subset(self, n_train: int, n_eval: int, seed: int = 0) -> Dataset:
        """Return a smaller copy for quick runs.

        The rows are drawn at random without replacement, the same rows for the same
        ``seed``. Vocabulary sizes are kept, so a model built for the full data set
        accepts the subset.

        Args:
            n_train: Rows to keep from train (all of them if there are fewer).
            n_eval: Rows to keep from validation and, separately, from test.
            seed: Seed of the draw.

        Returns:
            A new `Dataset` sharing tasks and feature descriptions with this one.
        """
        generator = torch.Generator().manual_seed(seed)
        return Dataset(
            train=_draw_rows(self.train, n_train, generator),
            val=_draw_rows(self.val, n_eval, generator),
            test=_draw_rows(self.test, n_eval, generator),
            tasks=dict(self.tasks),
            sparse=dict(self.sparse),
            dense=list(self.dense),
            num_classes=dict(self.num_classes),
        )


def _draw_rows(split: Split, n: int, generator: torch.Generator) -> Split:
    """Take ``n`` random rows of ``split``, kept in their original order."""
    order = torch.randperm(len(split), generator=generator)
    index, _ = torch.sort(order[: max(0, n)])
    return split.take(index)


def tabular_split(
    frame: pd.DataFrame,
    sparse: list[str],
    dense: list[str],
    labels: dict[str, str],
) -> Split:
    """Turn the rows of a prepared table into a `Split` with dict inputs.

    Args:
        frame: Rows with encoded sparse ids, scaled dense values and 0/1 labels.
        sparse: Columns that become int64 inputs.
        dense: Columns that become float32 inputs.
        labels: Task name to the column holding its 0/1 label (float32 tensor).

    Returns:
        The split; its inputs dict lists the sparse features, then the dense ones.
    """
    inputs = {name: _column_tensor(frame, name, np.int64) for name in sparse}
    inputs.update({name: _column_tensor(frame, name, np.float32) for name in dense})
    targets = {
        task: _column_tensor(frame, col, np.float32) for task, col in labels.items()
    }
    return Split(inputs, targets)


def _column_tensor(frame: pd.DataFrame, column: str, dtype: type) -> torch.Tensor:
    # A copy: pandas may hand out a read-only view, which torch cannot own.
    return torch.from_numpy(frame[column].to_numpy(dtype, copy=True))
