"""A task's kind (binary, multi-class, regression) is read from its head and labels
when not given, and the given kind wins."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.cli import _fused_tasks
from fxfuse.data import Split
from fxfuse.errors import InputError
from fxfuse.train import TrainConfig, fit, infer_kinds


class Head(nn.Module):
    """A small model with one of three kinds of output."""

    def __init__(self, outputs: int = 1, sigmoid: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.head = nn.Linear(8, outputs)
        self.sigmoid = sigmoid
        self.outputs = outputs

    def forward(self, x):
        y = self.head(self.body(x))
        if self.sigmoid:
            y = torch.sigmoid(y)
        return y if self.outputs > 1 else y.squeeze(1)


TASKS = ("clicked", "kind", "price", "bought")


def _rows(n: int = 64) -> Split:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    return Split(
        x,
        {
            "clicked": (x[:, 0] > 0).float(),
            "kind": (x[:, 1] > 0).long() + (x[:, 2] > 0).long(),
            "price": x[:, 3] * 10.0,
            "bought": (x[:, 3] > 0).float(),
        },
    )


def _fused():
    return fxfuse.fuse(
        {
            "clicked": [Head(sigmoid=True, seed=0), Head(sigmoid=True, seed=1)],
            "kind": [Head(outputs=3, seed=2)],
            "price": [Head(seed=3)],
            "bought": [Head(seed=4)],
        },
        (torch.randn(4, 4),),
        levels=1,
        width=8,
    )


def test_kinds_come_from_the_heads_and_the_labels():
    kinds = infer_kinds(_fused(), ["clicked", "kind", "price", "bought"], _rows())
    assert kinds == {
        "clicked": "binary",  # ends in a sigmoid
        "kind": "multiclass",  # three outputs per row
        "price": "regression",  # one raw output, labels other than 0/1
        "bought": "binary",  # one raw output, 0/1 labels
    }


def test_fit_with_task_names_alone_trains_each_task_with_its_inferred_kind():
    rows = _rows()
    result = fit(
        _fused(),
        rows,
        rows,
        ["kind", "price"],
        TrainConfig(epochs=1, batch_size=32, progress=False),
    )
    # Accuracy of three classes lies in [0, 1]; an RMSE of prices around 10 does
    # not, so a kind taken for the other would show.
    assert 0.0 <= result.best_metrics["kind"] <= 1.0
    assert result.best_metrics["price"] > 1.0


def test_a_given_kind_wins_over_the_inferred_one():
    rows = _rows()
    metrics = fxfuse.evaluate(_fused(), rows, {"bought": "regression"})
    assert metrics["bought"] > 0.0  # an RMSE, where an AUC was inferred
    inferred = fxfuse.evaluate(_fused(), rows, ["bought"])
    assert inferred != metrics


def test_the_task_kind_flag_overrides_and_names_what_it_accepts():
    data = SimpleNamespace(tasks={t: "binary" for t in TASKS}, val=_rows())
    fused = _fused()

    kinds = _fused_tasks(fused, data, ["bought=regression"])
    assert kinds["bought"] == "regression"
    assert kinds["clicked"] == "binary"
    with pytest.raises(InputError, match="TASK=KIND.*clicked.*regression"):
        _fused_tasks(fused, data, ["bought=ordinal"])
    with pytest.raises(InputError, match="--task-kind 'sold=binary'"):
        _fused_tasks(fused, data, ["sold=binary"])
