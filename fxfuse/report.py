"""`inspect`: trace, analyse, plan and split one model, and report what was found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from .analyse import Analysis, CutPoint, analyse, run_eagerly
from .plan import plan_cuts
from .split import check_parity
from .split import split as split_graph
from .trace import trace


@dataclass
class Report:
    """Where a model can be cut, and the stages of its default split.

    Attributes:
        name: the model's class name.
        tier: the tracing tier that captured it ("fx", "fx+leaves" or "export").
        cut_points: every cut point, from the inputs to the output.
        chosen: the cut points of the split, a subset of `cut_points`.
        stages: the stage modules of the split; chaining them gives the model.
        analysis: everything else the analysis found (costs, module calls).
        parity: largest absolute difference between the chained stages and the model.
    """

    name: str
    tier: str
    cut_points: list[CutPoint]
    chosen: list[CutPoint]
    stages: list[fx.GraphModule]
    analysis: Analysis
    parity: float
    notes: list[str] = field(default_factory=list)

    @property
    def leaves(self) -> list[str]:
        return self.analysis.traced.leaves


def inspect(
    model: nn.Module,
    example_inputs: tuple,
    levels: int = 3,
    cuts: Sequence[str] | None = None,
    leaf_modules: Sequence[str] = (),
    name: str | None = None,
) -> Report:
    """Trace a model, find its cut points and split it into stages.

    The model is traced in eval mode. When it has fewer cut points than `levels`,
    the split uses all of them (`fuse` refuses instead).

    Args:
        model: a trained model.
        example_inputs: positional arguments, as for `torch.export` (batch >= 2).
        levels: how many cuts the default split makes.
        cuts: module paths or node names to cut at instead of choosing.
        leaf_modules: module paths to keep opaque while tracing.
        name: the model's name in messages (defaults to its class name).

    Example::

        report = fxfuse.inspect(torchvision.models.resnet18(), (torch.randn(2, 3, 64, 64),))
        [c.closes for c in report.chosen]    # ['layer1', 'layer2', 'layer3']
    """
    name = name or type(model).__name__
    was_training = set_mode(model, training=False)
    try:
        eager = run_eagerly(model, tuple(example_inputs), name)
        traced = trace(model, tuple(example_inputs), tuple(leaf_modules))
        analysis = analyse(traced, model, tuple(example_inputs), eager)
        levels = min(levels, len(analysis.cut_points)) if not cuts else levels
        chosen = plan_cuts(analysis, levels, cuts, name) if levels else []
        stages = split_graph(traced.graph_module, [c.node for c in chosen])
        parity = check_parity(stages, analysis.reference, tuple(example_inputs), name)
    finally:
        set_mode(model, was_training)
    return Report(
        name=name,
        tier=traced.tier,
        cut_points=analysis.cut_points,
        chosen=chosen,
        stages=stages,
        analysis=analysis,
        parity=parity,
        notes=list(traced.notes),
    )


def split(
    model: nn.Module,
    example_inputs: tuple,
    levels: int = 3,
    cuts: Sequence[str] | None = None,
) -> list[fx.GraphModule]:
    """The stage modules of a model split at `levels` cut points.

    Unlike `inspect`, this raises `PlanError` when the model has fewer cut points
    than `levels`.
    """
    name = type(model).__name__
    was_training = set_mode(model, training=False)
    try:
        eager = run_eagerly(model, tuple(example_inputs), name)
        traced = trace(model, tuple(example_inputs))
        analysis = analyse(traced, model, tuple(example_inputs), eager)
        chosen = plan_cuts(analysis, levels, cuts, name)
        stages = split_graph(traced.graph_module, [c.node for c in chosen])
        check_parity(stages, analysis.reference, tuple(example_inputs), name)
    finally:
        set_mode(model, was_training)
    return stages


def set_mode(model: nn.Module, training: bool) -> bool:
    """Put `model` in train or eval mode; return the mode it was in.

    Modules from torch.export archives have a fixed mode and are left alone.
    """
    was_training = model.training
    try:
        model.train(training)
    except NotImplementedError:
        pass
    return was_training
