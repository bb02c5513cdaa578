"""Choosing cuts: coarsest ranks first, FLOPs balanced, named cuts honoured."""

import pytest
import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse.analyse import CutPoint
from fxfuse.errors import PlanError
from fxfuse.plan import _balanced, stage_fractions


def _cut(index: int, flops: int) -> CutPoint:
    return CutPoint(index, f"n{index}", "", 1, None, (2, 4), 1, flops, 0.0, 0)


def test_balanced_choice_minimises_the_spread_of_stage_flops():
    # Cumulative FLOPs 10, 20, ..., 90 of a 100-FLOP model: cuts at 30/50/80
    # would be lopsided; 20/50/70 or 30/50/80 give max stage 30; best is 30/50/70?
    # With four stages of 25 ideal, the squared-sum optimum among multiples of
    # 10 is 20/50/70 or 30/50/80 (equal cost); both have max 30.
    pool = [_cut(i, 10 * (i + 1)) for i in range(9)]
    chosen = _balanced(pool, 3, 100)
    fractions = stage_fractions(chosen, 100)
    assert max(fractions) == pytest.approx(0.3)
    assert sum(f * f for f in fractions) == pytest.approx(0.26)


def test_resnet_cuts_fall_on_whole_top_level_blocks():
    model = torchvision.models.resnet18(num_classes=10).eval()
    report = fxfuse.inspect(model, (torch.randn(2, 3, 64, 64),))
    assert [c.closes for c in report.chosen] == ["layer1", "layer2", "layer3"]
    assert all(c.rank == 1 for c in report.chosen)


def test_unbalanced_coarse_ranks_give_way_to_finer_ones():
    # A model whose top-level children are one big body and a tiny head: rank-1
    # cuts would put almost all FLOPs in one stage, so rank-2 blocks are used.
    body = nn.Sequential(
        *[nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(6)]
    )
    model = nn.Sequential(nn.Linear(8, 64), body, nn.Linear(64, 64), nn.Linear(64, 2))
    report = fxfuse.inspect(model.eval(), (torch.randn(2, 8),))
    assert any(c.rank == 2 for c in report.chosen)
    fractions = stage_fractions(report.chosen, report.analysis.total_flops)
    assert max(fractions) < 0.5


def test_named_cuts_are_used_as_given():
    model = torchvision.models.resnet18(num_classes=10).eval()
    inputs = (torch.randn(2, 3, 64, 64),)
    stages = fxfuse.split(model, inputs, cuts=["layer2", "layer4"])
    assert len(stages) == 3
    assert any(n.startswith("layer3.") for n, _ in stages[1].named_parameters())
    assert not any(n.startswith("layer2.") for n, _ in stages[1].named_parameters())


def test_unknown_named_cut_lists_the_real_ones():
    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(PlanError, match="'layer9' is not a cut point.*layer1"):
        fxfuse.split(model, (torch.randn(2, 3, 64, 64),), cuts=["layer9"])


def test_too_many_levels_says_how_many_cut_points_there_are():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    with pytest.raises(PlanError, match="has 2 cut points.*--levels 2 or fewer"):
        fxfuse.split(model, (torch.randn(2, 4),), levels=5)


class _AuxAndShared(nn.Module):
    """An auxiliary head that eval mode never calls, and an activation used twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.aux = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.act(self.b(self.act(self.a(x))))
        if self.training:
            return self.out(h), self.aux(h)
        return self.out(h)


def test_modules_called_twice_or_never_are_reported():
    report = fxfuse.inspect(_AuxAndShared(), (torch.randn(2, 4),))
    assert report.analysis.reused_modules == ["act"]
    assert report.analysis.unused_modules == ["aux"]
