"""Validation metrics per task kind, and the one score that early stopping follows.

Each task kind has one metric, as in the paper's tables: ROC AUC for binary tasks,
accuracy for multi-class tasks and RMSE for regression. `mean_score` folds them into
one number where higher is always better, so that training can compare epochs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor

from .errors import InputError

KINDS = ("binary", "multiclass", "regression")
OUTPUT_KINDS = ("probability", "logits")

_NAMES = {"binary": "auc", "multiclass": "accuracy", "regression": "rmse"}


def metric_name(kind: str) -> str:
    """The metric of a task kind: ``"auc"``, ``"accuracy"`` or ``"rmse"``."""
    return _NAMES[_check_kind(kind)]


def higher_is_better(kind: str) -> bool:
    """Whether a larger metric value is better for this task kind (not for RMSE)."""
    return _check_kind(kind) != "regression"


def task_metric(
    kind: str, prediction: Tensor, labels: Tensor, output_kind: str = "logits"
) -> float:
    """The metric of one task on a set of rows.

    AUC and accuracy depend only on the order of the scores, so a model that
    predicts probabilities and one that predicts logits get the same value; the
    output kind is accepted so that callers can pass what they pass to the loss.

    Args:
        kind: ``"binary"``, ``"multiclass"`` or ``"regression"``.
        prediction: ``[N]`` or ``[N, 1]`` scores for binary and regression tasks,
            ``[N, C]`` class scores for multi-class tasks.
        labels: ``[N]`` 0/1 labels, class ids or targets.
        output_kind: ``"probability"`` or ``"logits"``.

    Returns:
        ROC AUC (binary), accuracy (multi-class) or RMSE (regression).

    Raises:
        InputError: the prediction does not fit the labels, or a binary task's
            labels hold only one class (AUC is undefined then).
    """
    _check_kind(kind)
    if output_kind not in OUTPUT_KINDS:
        raise InputError(
            f"output kind '{output_kind}' is unknown; use one of {OUTPUT_KINDS}"
        )
    prediction = prediction.detach().to("cpu", torch.float64)
    labels = labels.detach().cpu()

    if kind == "multiclass":
        if prediction.ndim != 2 or len(prediction) != len(labels):
            raise InputError(
                f"a multi-class prediction must be [N, classes] for {len(labels)} "
                f"labels, not {list(prediction.shape)}"
            )
        correct = prediction.argmax(dim=1) == labels.long()
        return correct.double().mean().item()

    scores = flat_prediction(prediction, len(labels))
    if kind == "binary":
        if labels.unique().numel() < 2:
            raise InputError(
                f"AUC is undefined: all {len(labels)} labels are {labels[0].item():g}; "
                "evaluate on rows that hold both classes (a larger validation split)"
            )
        return float(roc_auc_score(labels.numpy(), scores.numpy()))
    return math.sqrt(torch.mean((scores - labels.double()) ** 2).item())


def mean_score(metrics: Mapping[str, float], kinds: Mapping[str, str]) -> float:
    """The mean over tasks of their metrics, with RMSE negated.

    Higher is better for the result whatever the tasks' kinds, so it is the number
    early stopping and checkpoint choice compare.

    Args:
        metrics: Task name to its metric value.
        kinds: Task name to its kind; must cover every task in `metrics`.
    """
    if not metrics:
        raise InputError("no metric to average; give at least one task")
    signed = [
        value if higher_is_better(kinds[task]) else -value
        for task, value in metrics.items()
    ]
    return sum(signed) / len(signed)


def flat_prediction(prediction: Tensor, rows: int) -> Tensor:
    """A binary or regression prediction (``[N]`` or ``[N, 1]``) as ``[N]``."""
    if (
        prediction.ndim not in (1, 2)
        or len(prediction) != rows
        or prediction.numel() != rows
    ):
        raise InputError(
            f"a binary or regression prediction must be [N] or [N, 1] for {rows} "
            f"labels, not {list(prediction.shape)}"
        )
    return prediction.reshape(rows)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"task kind '{kind}' is unknown; use one of {KINDS}")
    return kind
