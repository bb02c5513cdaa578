"""Head mixing starts from weights chosen on validation rows: a model that only hurts
gets almost none, models that complement each other share."""

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.data import Split
from fxfuse.heads import weigh_heads
from fxfuse.train import evaluate, loss_for, predict


class Reader(nn.Module):
    """Predicts ``sigmoid(scale * x[:, feature])`` through a small MLP whose weights
    are set by hand (``relu(v) - relu(-v) == v``)."""

    def __init__(self, feature: int, scale: float = 2.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 2), nn.ReLU())
        self.head = nn.Linear(2, 1)
        with torch.no_grad():
            self.body[0].weight.zero_()
            self.body[0].bias.zero_()
            self.body[0].weight[0, feature] = 1.0
            self.body[0].weight[1, feature] = -1.0
            self.head.weight.copy_(torch.tensor([[scale, -scale]]))
            self.head.bias.zero_()

    def forward(self, x):
        return torch.sigmoid(self.head(self.body(x))).squeeze(1)


def _rows(n: int = 4000) -> Split:
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    # Features 0 and 1 each carry half of the signal; feature 3 carries none.
    return Split(x, {"t": (x[:, 0] + x[:, 1] > 0).float()})


def _fused(*members: nn.Module):
    return fxfuse.fuse({"t": list(members)}, (torch.randn(4, 4),), levels=1, width=8)


def _loss(model, rows: Split) -> float:
    prediction = predict(model, rows)["t"]
    return loss_for("binary", "probability")(prediction, rows.labels["t"]).item()


@pytest.mark.parametrize("method", ["fit", "scores"])
def test_a_model_that_only_hurts_gets_almost_no_weight(method):
    rows = _rows()
    fused = _fused(Reader(0), Reader(3, scale=4.0))  # confident noise
    weights = weigh_heads(fused, rows, {"t": "binary"}, method=method)
    useful, useless = weights["t"].values()
    assert useless < 0.05 < 0.95 < useful
    assert fused.fusion_info.head_weights["t"] == list(weights["t"].values())


def test_fitted_weights_share_between_complementary_models_and_beat_both():
    rows = _rows()
    first, second = Reader(0), Reader(1)
    fused = _fused(first, second)
    weights = weigh_heads(fused, rows, {"t": "binary"}, method="fit")
    assert all(0.4 < w < 0.6 for w in weights["t"].values())

    alone = [_loss(_fused(model), rows) for model in (first, second)]
    assert _loss(fused, rows) < min(alone) - 0.01
    auc = evaluate(fused, rows, {"t": "binary"})["t"]
    assert auc > max(
        evaluate(_fused(model), rows, {"t": "binary"})["t"] for model in (first, second)
    )


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="'best'.*fit"):
        weigh_heads(_fused(Reader(0), Reader(1)), _rows(), {"t": "binary"}, "best")
