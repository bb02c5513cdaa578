"""Generate one multi-task GraphModule from the stages of several models.

For each level ``k`` every model runs its stage ``k - 1`` up to its ``k``-th cut, one
`AKF` module fuses all models' values at that cut, and each model's next stage takes
its fused value. Each model's last stage gives its prediction; a task's prediction
mixes its models' predictions (`HeadMixer`, uniform at first). The graph is written
with the ``fx.Graph`` API, so ``print(fused.code)`` reads like a hand-written
``forward``. For a `TabularMLP` and a torch-rechub `DCN` fused at three levels
(fx ends a line with ``name = None`` after a value's last use; long ones are cut
short here)::

    def forward(self, x):
        income_mlp8_cut1 = self.income_mlp8.stage0(x)
        income_dcn_cut1 = self.income_dcn.stage0(x);  x = None
        fusion1 = self.fusion1(income_mlp8_cut1, income_dcn_cut1);  ...
        income_mlp8_fused1 = fusion1[0]
        income_dcn_fused1 = fusion1[1];  fusion1 = None
        income_mlp8_cut2 = self.income_mlp8.stage1(income_mlp8_fused1);  ...
        ...
        income_mlp8_out = self.income_mlp8.stage3(income_mlp8_fused3);  ...
        income_dcn_out = self.income_dcn.stage3(income_dcn_fused3);  ...
        income = self.mix_income(income_mlp8_out, income_dcn_out);  ...
        return {'income': income}

A model that reads a dict input key under another name (``input_map``) gets its
own dict, made before its first stage (a new dict; ``x`` is not written into)::

    income_dcn_x = fxfuse_inputs_rename_keys(x, {'years': 'age'})
    income_dcn_cut1 = self.income_dcn.stage0(income_dcn_x)

A model from a ``.pt2`` archive refuses a dict with keys it was not exported with, so
it gets only its own keys (after any renaming)::

    income_shop_x = fxfuse_inputs_select_keys(x, ['age', 'shop'])
    income_shop_cut1 = self.income_shop.stage0(income_shop_x)

The models' stages are frozen and stay in eval mode whatever mode the fused model is
in, so BatchNorm statistics and dropout of the trained models never drift.
"""

from __future__ import annotations

import inspect as pyinspect
import keyword
import math
import operator
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from .akf import AKF, HeadMixer, Member
from .analyse import CutPoint
from .errors import FuseError, FxfuseError, InputError, LimitationWarning
from .inputs import (
    as_read,
    by_position,
    checked_input_map,
    input_keys,
    rename_keys,
    select_keys,
    selections_for,
)
from .load import LoadedModel
from .report import Report, inspect
from .split import chain


class FrozenStages(nn.Module):
    """One model's stages (``stage0`` ... ``stageL``), frozen."""

    def __init__(self, stages: Sequence[nn.Module]):
        super().__init__()
        for k, stage in enumerate(stages):
            self.add_module(f"stage{k}", stage)
        for parameter in self.parameters():
            parameter.requires_grad_(False)


class FusedModel(fx.GraphModule):
    """The fused GraphModule. ``train()`` reaches the fusion modules and mixers only:
    the models' stages stay in eval mode, so their BatchNorm statistics and dropout
    behave as in the trained models."""

    def train(self, mode: bool = True) -> FusedModel:
        self.training = mode
        stage_owners = {m.name for m in self.fusion_info.models}
        for name, child in self.named_children():
            if name in stage_owners:
                _set_eval(child)
            else:
                child.train(mode)
        return self

    def keep(self, name: str, value) -> None:
        """Set an attribute that survives ``copy.deepcopy`` (``fusion_info``,
        ``example_inputs``): GraphModule restores those kept in its meta."""
        setattr(self, name, value)
        self.meta.setdefault(_PRESERVED, {})[name] = value


# GraphModule.meta entries under this key are set again on a copy.deepcopy.
_PRESERVED = "_user_preserved_attributes"


def _set_eval(module: nn.Module) -> None:
    module.training = False
    for child in module.children():
        try:
            child.train(False)
        except NotImplementedError:  # stages loaded from .pt2 have a fixed mode
            pass


def stages_of(fused: fx.GraphModule, name: str) -> list[nn.Module]:
    """The stage modules of the model called `name` in a fused model, in order."""
    return list(fused.get_submodule(name).children())


@dataclass
class ModelInfo:
    """One model of a fused model, as the manifest records it."""

    name: str
    task: str
    source: str
    tier: str
    cuts: list[str]
    cut_modules: list[str | None]
    shapes: list[list[int]]
    channel_dims: list[int]
    prediction_shape: list[int]
    output_kind: str = "logits"
    levels: list[int] = field(default_factory=list)
    # Dict input keys this model reads under another name: its key -> fused key.
    inputs: dict[str, str] = field(default_factory=dict)
    # The only keys (its own names) of each positional dict input that this model
    # takes, None for an input it takes whole; empty when it takes every input
    # whole. A model from a .pt2 archive takes exactly the keys it was exported with.
    selected_keys: list[list[str] | None] = field(default_factory=list)

    def joins(self, level: int) -> bool:
        """Whether this model's value at `level` passes through that level's AKF."""
        return level in self.levels


@dataclass
class FusionInfo:
    """How a fused model was built: enough to build it again around saved stages."""

    tasks: list[str]
    models: list[ModelInfo]
    levels: int
    width: int = 64
    heads: int = 4
    ff_mult: int = 2
    input_names: list[str] = field(default_factory=lambda: ["x"])
    head_weights: dict[str, list[float]] = field(default_factory=dict)
    per_input_mixing: bool = True
    # The keys of each positional input that is a dict, None for other inputs.
    input_keys: list[list[str] | None] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> FusionInfo:
        data = dict(data)
        data["models"] = [ModelInfo(**m) for m in data["models"]]
        return cls(**data)

    def task_models(self, task: str) -> list[ModelInfo]:
        return [m for m in self.models if m.task == task]

    def renames(self, model: ModelInfo) -> dict[int, dict[str, str]]:
        """`model.inputs` by positional input: ``{position: {its key: fused key}}``."""
        return by_position(model.inputs, self.input_keys)

    def selections(self, model: ModelInfo) -> dict[int, list[str]]:
        """`model.selected_keys` by positional input: ``{position: its keys}``."""
        return {
            i: list(keys)
            for i, keys in enumerate(model.selected_keys)
            if keys is not None
        }

    def output_kind(self, task: str) -> str:
        """'probability' when every model of the task ends in a sigmoid/softmax."""
        kinds = {m.output_kind for m in self.task_models(task)}
        return "probability" if kinds == {"probability"} else "logits"


ModelsOfTask = Sequence[nn.Module | LoadedModel] | Mapping[str, nn.Module]


def fuse(
    tasks: Mapping[str, ModelsOfTask],
    example_inputs: tuple,
    levels: int = 3,
    cuts: Mapping[str, Sequence[str]] | None = None,
    width: int = 64,
    heads: int = 4,
    head_weights: Mapping[str, Sequence[float]] | None = None,
    input_map: Mapping[str, Mapping[str, str]] | None = None,
) -> fx.GraphModule:
    """Fuse trained single-task models into one multi-task GraphModule.

    Args:
        tasks: for each task, its models: a list (names come from the files or
            classes) or a dict from name to model.
        example_inputs: positional arguments every model accepts (batch >= 2). With
            dict inputs, give the union of the models' keys: each model reads its own
            by name, or under another name given in `input_map`. A tensor input is
            named after the models' own forward argument when they all agree
            (``image``), else ``x``.
        levels: fusion levels, i.e. cuts per model.
        cuts: optional module paths or node names to cut at, per model name.
        width: token width of the AKF modules.
        heads: attention heads of the AKF modules.
        head_weights: optional initial mixing weights per task (one per model, in
            order), for instance from the models' validation scores.
        input_map: for models whose dict keys differ from the fused inputs' keys,
            by model name (``income_mlp8``): ``{its_key: fused_key}``. That model
            reads fused input `fused_key` as `its_key` (and no longer as
            `fused_key`; map ``{fused_key: fused_key}`` too to keep it); keys not
            mentioned pass through unchanged. See `rename_keys`. A model that takes
            only the keys it was exported with (from a ``.pt2`` archive) is given
            only those (`select_keys`); other models get the whole dict.

    Returns:
        A GraphModule whose call returns ``{task: prediction}``. At initialisation
        each task's prediction is the (weighted) mean of its models' predictions.

    Raises:
        FuseError: levels, width or heads are not positive or width is not a
            multiple of heads, a task has no model, a model is given twice,
            predictions of one task differ in shape, a model has fewer cut points
            than `levels`, or
            `cuts` or `input_map` name an unknown model.
        InputError: the example inputs do not fit a model, or `input_map` names a
            fused input key that the example inputs do not have.
    """
    _check_settings(levels, width, heads)
    example_inputs = tuple(example_inputs)
    members = _members(tasks)
    names = [name for name, _, _ in members]
    cuts = dict(cuts or {})
    unknown = set(cuts) - set(names)
    if unknown:
        raise FuseError(
            f"--cuts names unknown models {sorted(unknown)}; the models are {names}"
        )
    keys = input_keys(example_inputs)
    input_map = checked_input_map(input_map or {}, names, keys)

    # Each model is inspected on the inputs as it reads them: its keys renamed, and
    # only its own keys where it takes no others.
    renames = {name: by_position(input_map.get(name, {}), keys) for name in names}
    selections = {
        name: selections_for(loaded, name, as_read(example_inputs, renames[name]))
        for name, _, loaded in members
    }
    model_inputs = {
        name: as_read(example_inputs, renames[name], selections[name]) for name in names
    }
    reports: list[Report] = []
    for name, _, loaded in members:
        report = _inspect_member(
            loaded, name, model_inputs[name], levels, cuts.get(name)
        )
        reports.append(report)

    info = FusionInfo(
        tasks=list(tasks),
        models=[
            _model_info(name, task, loaded, report, model_inputs[name], levels)
            for (name, task, loaded), report in zip(members, reports, strict=True)
        ],
        levels=levels,
        width=width,
        heads=heads,
        input_names=_input_names(example_inputs, [m.model for _, _, m in members]),
        head_weights={t: list(w) for t, w in (head_weights or {}).items()},
        input_keys=keys,
    )
    for model in info.models:
        model.inputs = input_map.get(model.name, {})
        if selections[model.name]:
            model.selected_keys = [
                selections[model.name].get(i) for i in range(len(example_inputs))
            ]
    _check_predictions(info)
    stages = {m.name: r.stages for m, r in zip(info.models, reports, strict=True)}
    fused = build(info, stages)
    fused.keep("example_inputs", example_inputs)
    _warn_if_fusion_outweighs_models(fused)
    return fused


class LargeFusionWarning(LimitationWarning):
    """The fusion modules hold more parameters than the models they fuse."""


def _warn_if_fusion_outweighs_models(fused: fx.GraphModule) -> None:
    """Warn when the AKF modules and head mixers are larger than all models together.

    An AKF layer's size depends on its width, not on the models; models of a few
    thousand parameters (small tabular MLPs) are smaller than one layer of width 64,
    and their fused model then spends most of its time and memory on fusion.
    """
    fusion = sum(
        p.numel()
        for name, module in fused.named_children()
        if name.startswith(("fusion", "mix_"))
        for p in module.parameters()
    )
    models = sum(p.numel() for p in fused.parameters()) - fusion
    if fusion > models:
        info = fused.fusion_info
        cheaper = "a smaller width (--width)"
        if info.levels > 1:
            cheaper += " or fewer levels (--levels)"
        warnings.warn(
            LargeFusionWarning(
                f"the fusion modules add {fusion:,} parameters, "
                f"{fusion / max(models, 1):.1f} times the {models:,} of the models "
                f"(AKF width {info.width}, levels {info.levels}); for models this "
                f"small, {cheaper} costs less",
                limitation="small-models",
            ),
            stacklevel=3,
        )


# Widths above this would make AKF layers far larger than any model they join.
MAX_WIDTH = 4096


def _check_settings(levels: int, width: int, heads: int) -> None:
    """Refuse sizes the AKF modules cannot have, before any model is traced."""
    if levels < 1:
        raise FuseError(f"levels={levels}: fusion needs at least 1 level (cut)")
    if width < 1 or heads < 1:
        raise FuseError(f"AKF width={width} and heads={heads} must both be at least 1")
    if width > MAX_WIDTH:
        raise FuseError(
            f"AKF width={width} is above {MAX_WIDTH}; each AKF layer holds about "
            "12 x width^2 weights, so choose a width such as 64 or 256"
        )
    if width % heads:
        raise FuseError(
            f"AKF width={width} is not a multiple of heads={heads}; choose a width "
            "divisible by the number of heads (e.g. width 64, heads 4)"
        )


def build(
    info: FusionInfo, stages: Mapping[str, Sequence[nn.Module]]
) -> fx.GraphModule:
    """The fused GraphModule for `info`, around the given stage modules.

    `fuse` calls this with freshly split stages; `fxfuse.load` with stages read back
    from an artifact.
    """
    root = nn.Module()
    for model in info.models:
        root.add_module(model.name, FrozenStages(stages[model.name]))
    for level in range(1, info.levels + 1):
        root.add_module(f"fusion{level}", _akf(info, level))
    for task in info.tasks:
        models = info.task_models(task)
        if len(models) > 1:
            weights = info.head_weights.get(task)
            size = math.prod(models[0].prediction_shape[1:])
            mixer = HeadMixer(
                len(models),
                weights,
                per_input=info.per_input_mixing,
                prediction_size=size,
            )
            root.add_module(f"mix_{task}", mixer)

    graph = _fused_graph(info)
    fused = FusedModel(root, graph, "FusedModel")
    fused.keep("fusion_info", info)
    fused.keep("example_inputs", ())
    fused.train(False)
    return fused


def trainable_parameters(fused: nn.Module):
    """The parameters `fit` trains: AKF modules, head mixers and any unfrozen stage."""
    return [p for p in fused.parameters() if p.requires_grad]


def unfreeze(fused: fx.GraphModule, what: str) -> None:
    """Make more of the fused model trainable.

    Args:
        what: "heads" (each model's last stage that holds weights) or "all" (every
            stage). Stages stay in eval mode either way; only their weights become
            trainable. A model cut at its logit has a last stage of weightless
            operations (a sigmoid, a squeeze); "heads" then trains the stage before
            it, which holds the head's weights.
    """
    if what not in ("heads", "all"):
        raise FxfuseError(f"unfreeze takes 'heads' or 'all', not '{what}'")
    fused.keep("unfrozen", what)
    for model in fused.fusion_info.models:
        stages = stages_of(fused, model.name)
        if what == "heads":
            weighted = [s for s in stages if list(s.parameters())]
            stages = weighted[-1:]
        for stage in stages:
            for parameter in stage.parameters():
                parameter.requires_grad_(True)


class Alone(nn.Module):
    """One model of a fused model run alone (its stages chained, no fusion), as a
    module that returns ``{task: prediction}`` like the fused model.

    `renames` are the model's renamed dict keys by input position (see
    `FusionInfo.renames`), and `selections` the only keys it takes (see
    `FusionInfo.selections`): it takes the fused model's inputs.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        task: str,
        renames: Mapping[int, Mapping[str, str]] | None = None,
        selections: Mapping[int, Sequence[str]] | None = None,
    ):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.task = task
        self.renames = {i: dict(r) for i, r in (renames or {}).items()}
        self.selections = {i: list(k) for i, k in (selections or {}).items()}

    def train(self, mode: bool = True) -> Alone:
        self.training = mode  # the stages keep their eval mode
        return self

    def forward(self, *inputs):
        inputs = as_read(inputs, self.renames, self.selections)
        return {self.task: chain(list(self.stages), *inputs)}


class Average(nn.Module):
    """The plain average of each task's models' predictions: the fused model's
    starting point with uniform mixing, kept as a baseline."""

    def __init__(self, fused: fx.GraphModule):
        super().__init__()
        info = fused.fusion_info
        self.members = nn.ModuleList(
            Alone(stages_of(fused, m.name), m.task, **_reading(info, m))
            for m in info.models
        )

    def forward(self, *inputs):
        by_task: dict[str, list[torch.Tensor]] = {}
        for member in self.members:
            by_task.setdefault(member.task, []).append(member(*inputs)[member.task])
        return {t: torch.stack(p).mean(0) for t, p in by_task.items()}


def members_alone(fused: fx.GraphModule) -> dict[str, Alone]:
    """Each model of a fused model, runnable alone, by its name in the fused model."""
    info = fused.fusion_info
    return {
        m.name: Alone(stages_of(fused, m.name), m.task, **_reading(info, m))
        for m in info.models
    }


def _reading(info: FusionInfo, model: ModelInfo) -> dict:
    """How `model` reads the fused inputs, as `Alone`'s keyword arguments."""
    return {"renames": info.renames(model), "selections": info.selections(model)}


def member_inputs(info: FusionInfo, name: str, inputs: tuple) -> tuple:
    """The fused model's `inputs` as the model called `name` reads them, in new
    dicts: the dict keys it reads under other names renamed (`fuse`'s
    ``input_map``), and only its own keys where it takes no others."""
    model = next(m for m in info.models if m.name == name)
    return as_read(tuple(inputs), info.renames(model), info.selections(model))


def member_names(tasks: Mapping[str, ModelsOfTask]) -> list[str]:
    """The names `fuse` gives the models of `tasks` in the fused model, task by task
    in the order given: lower case identifiers such as ``income_mlp8`` for a model
    ``MLP8`` of task ``income``.

    Raises:
        FuseError: as `fuse` does for the same `tasks`.
    """
    return [name for name, _, _ in _members(tasks)]


def _members(tasks: Mapping[str, ModelsOfTask]) -> list[tuple[str, str, LoadedModel]]:
    """(name, task, model) for every model, with unique identifier names."""
    if not tasks:
        raise FuseError("no task given; name at least one task and its models")
    members: list[tuple[str, str, LoadedModel]] = []
    seen_ids: dict[int, str] = {}
    seen_sources: dict[str, str] = {}
    used: set[str] = set(tasks)
    for task, models in tasks.items():
        numbered = _needs_numbers(models)
        if not _identifier(task):
            raise FuseError(
                f"task name '{task}' is not a valid identifier; use letters, digits "
                "and underscores"
            )
        items = (
            list(models.items())
            if isinstance(models, Mapping)
            else [(None, m) for m in models]
        )
        if not items:
            raise FuseError(f"task '{task}' has no model; give it at least one")
        for given_name, model in items:
            loaded = (
                model
                if isinstance(model, LoadedModel)
                else LoadedModel(
                    given_name or type(model).__name__.lower(),
                    model,
                    type(model).__name__,
                )
            )
            if id(loaded.model) in seen_ids:
                raise FuseError(
                    f"the same model object is given twice (as {seen_ids[id(loaded.model)]}"
                    f" and in task '{task}'); give each model once"
                )
            source = _source_key(loaded.source)
            if isinstance(model, LoadedModel) and source in seen_sources:
                raise FuseError(
                    f"model file '{loaded.source}' is given twice (tasks "
                    f"'{seen_sources[source]}' and '{task}'); give each file once"
                )
            base = given_name or loaded.name
            if numbered:
                base = f"{base}{len([m for m in members if m[1] == task]) + 1}"
            name = _unique_name(f"{task}_{base}", used)
            used.add(name)
            seen_ids[id(loaded.model)] = name
            seen_sources[source] = task
            members.append((name, task, loaded))
    return members


def _source_key(source: str) -> str:
    """A file source as its resolved path, so that ``./a.pt2``, ``a.pt2`` and the
    absolute path compare equal; other specs (``module:factory``) as they are."""
    path = Path(source)
    try:
        return str(path.resolve()) if path.is_file() else source
    except OSError:
        return source


def _needs_numbers(models: ModelsOfTask) -> bool:
    """Models given as a list under the same name get numbers (mlp1, mlp2)."""
    if isinstance(models, Mapping):
        return False
    names = [m.name if isinstance(m, LoadedModel) else type(m).__name__ for m in models]
    return len(set(names)) < len(names)


def _identifier(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


def _unique_name(name: str, used: set[str]) -> str:
    name = re.sub(r"\W+", "_", name).strip("_").lower() or "model"
    if name[0].isdigit():
        name = f"m_{name}"
    candidate, k = name, 2
    while candidate in used or keyword.iskeyword(candidate):
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def _inspect_member(loaded, name, example_inputs, levels, cuts) -> Report:
    """Trace, analyse and split one model at exactly `levels` cuts."""
    try:
        report = inspect(loaded.model, example_inputs, levels, cuts=cuts, name=name)
    except InputError as error:
        hint = ""
        if isinstance(error.__cause__, KeyError):
            hint = (
                f"; if the fused inputs call it differently, map it with input_map="
                f"{{'{name}': {{ITS_KEY: FUSED_KEY}}}} (--input-map "
                f"{name}:ITS_KEY=FUSED_KEY)"
            )
        raise InputError(f"model {name} ({loaded.source}): {error}{hint}") from error
    available = len(report.cut_points)
    if cuts and len(cuts) > levels:
        raise FuseError(
            f"--cuts for {name} names {len(cuts)} cuts but --levels is {levels}; "
            "name at most one cut per level"
        )
    if not cuts and len(report.chosen) < levels:
        raise FuseError(
            f"model {name} ({loaded.source}) has {available} cut point"
            f"{'s' * (available != 1)}, fewer than the {levels} levels asked for; "
            f"use --levels {available} or fewer, or name its cuts with --cuts "
            f"{name}=... so that it joins only the last levels",
            limitation="few-cut-points",
        )
    return report


def _model_info(
    name, task, loaded, report: Report, example_inputs, levels: int
) -> ModelInfo:
    """What the manifest keeps of one model. A model with fewer cuts than `levels`
    (named with ``cuts``) joins the last levels."""
    with torch.no_grad():
        prediction = chain(report.stages, *example_inputs)
    if not isinstance(prediction, torch.Tensor):
        raise FuseError(
            f"model {name} returns a {type(prediction).__name__}, not one tensor; "
            "fxfuse fuses single-task models whose output is one prediction tensor",
            limitation="outputs",
        )
    return ModelInfo(
        name=name,
        task=task,
        source=loaded.source,
        tier=report.tier,
        cuts=[c.node for c in report.chosen],
        cut_modules=[c.closes for c in report.chosen],
        shapes=[list(c.shape) for c in report.chosen],
        channel_dims=[_akf_channel_dim(c) for c in report.chosen],
        prediction_shape=list(prediction.shape),
        output_kind=_output_kind(report.stages[-1]),
        levels=list(range(levels - len(report.chosen) + 1, levels + 1)),
    )


_PROBABILITY_OPS = ("sigmoid", "softmax")


def _output_kind(head: fx.GraphModule) -> str:
    """'probability' when the model ends in a sigmoid or softmax, else 'logits'.

    Losses and metrics need to know which of the two a model predicts.
    """
    output = next(n for n in reversed(head.graph.nodes) if n.op == "output")
    node = output.all_input_nodes[0] if output.all_input_nodes else None
    # Walk back through shape-only operations (squeeze, view, flatten).
    while node is not None and _name_of(node) in _SHAPE_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    if node is not None and any(op in _name_of(node) for op in _PROBABILITY_OPS):
        return "probability"
    if node is not None and node.op == "call_module":
        module = head.get_submodule(str(node.target))
        if isinstance(module, nn.Sigmoid | nn.Softmax):
            return "probability"
    return "logits"


_SHAPE_OPS = ("squeeze", "view", "reshape", "flatten", "unsqueeze", "squeeze_dim")


def _name_of(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return str(name).split(".")[0].lower()


def _akf_channel_dim(cut: CutPoint) -> int:
    """AKF reads channels in dim 1 (channel-first) or the last dim."""
    return 1 if cut.layout == "channels_first" else -1


def _check_predictions(info: FusionInfo) -> None:
    for task in info.tasks:
        models = info.task_models(task)
        shapes = {tuple(m.prediction_shape[1:]) for m in models}
        if len(shapes) > 1:
            listing = ", ".join(f"{m.name} {m.prediction_shape}" for m in models)
            raise FuseError(
                f"the models of task '{task}' predict different shapes ({listing}); "
                "a task's models must predict the same thing"
            )


def _input_names(example_inputs: tuple, models: Sequence[nn.Module]) -> list[str]:
    """The fused model's argument names: a tensor input takes the name every model's
    ``forward`` gives it (``image``); other inputs, or tensors the models name
    differently, are ``x`` (``x0``, ``x1``, ... for several inputs)."""
    count = len(example_inputs)
    default = ["x"] if count == 1 else [f"x{i}" for i in range(count)]
    signatures = [_argument_names(model) for model in models]
    names = []
    for i, value in enumerate(example_inputs):
        given = {s[i] if s is not None and i < len(s) else None for s in signatures}
        name = given.pop() if len(given) == 1 else None
        if isinstance(value, torch.Tensor) and name and _identifier(name):
            names.append(name)
        else:
            names.append(default[i])
    return names if len(set(names)) == count else default


def _argument_names(model: nn.Module) -> list[str] | None:
    """The positional parameter names of ``model.forward``, up to any ``*args``.

    For a module from a ``.pt2`` archive these are the program's own input names.
    """
    try:
        parameters = pyinspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = []
    for parameter in parameters:
        if parameter.kind not in (
            parameter.POSITIONAL_ONLY,
            parameter.POSITIONAL_OR_KEYWORD,
        ):
            break
        names.append(parameter.name)
    return names


def _akf(info: FusionInfo, level: int) -> AKF:
    """The AKF of one level, over the models that join it."""
    members = []
    for model in _joining(info, level):
        k = model.levels.index(level)
        shape, channel_dim = model.shapes[k], model.channel_dims[k]
        members.append(
            Member(
                name=model.name,
                task=model.task,
                channels=shape[channel_dim],
                channel_dim=channel_dim,
                ndim=len(shape),
            )
        )
    tasks = [t for t in info.tasks if any(m.task == t for m in members)]
    return AKF(members, tasks, width=info.width, heads=info.heads, ff_mult=info.ff_mult)


def _joining(info: FusionInfo, level: int) -> list[ModelInfo]:
    return [m for m in info.models if m.joins(level)]


def _fused_graph(info: FusionInfo) -> fx.Graph:
    """The forward of the fused model, one node per stage, fusion and mix."""
    graph = fx.Graph()
    inputs = [graph.placeholder(name) for name in info.input_names]
    values: dict[str, fx.Node] = {}

    for level in range(1, info.levels + 1):
        joining = _joining(info, level)
        for model in joining:
            k = model.levels.index(level)
            if k == 0:
                args = _model_arguments(graph, info, model, inputs)
            else:
                args = [values[model.name]]
            values[model.name] = graph.create_node(
                "call_module",
                f"{model.name}.stage{k}",
                tuple(args),
                name=f"{model.name}_cut{level}",
            )
        fusion = graph.create_node(
            "call_module",
            f"fusion{level}",
            tuple(values[m.name] for m in joining),
            name=f"fusion{level}",
        )
        for index, model in enumerate(joining):
            values[model.name] = graph.create_node(
                "call_function",
                operator.getitem,
                (fusion, index),
                name=f"{model.name}_fused{level}",
            )
    for model in info.models:
        last = len(model.levels)
        values[model.name] = graph.create_node(
            "call_module",
            f"{model.name}.stage{last}",
            (values[model.name],),
            name=f"{model.name}_out",
        )

    outputs = {}
    for task in info.tasks:
        models = info.task_models(task)
        predictions = tuple(values[m.name] for m in models)
        if len(models) == 1:
            outputs[task] = predictions[0]
        else:
            outputs[task] = graph.create_node(
                "call_module", f"mix_{task}", predictions, name=task
            )
    graph.output(outputs)
    graph.lint()
    return graph


def _model_arguments(
    graph: fx.Graph, info: FusionInfo, model: ModelInfo, inputs: list[fx.Node]
) -> list[fx.Node]:
    """The fused inputs as `model` reads them: a dict input whose keys it renames
    becomes its own dict, ``income_years_x = ...rename_keys(x, {'years': 'age'})``,
    and one of which it takes only some keys is cut to those,
    ``income_shop_x = ...select_keys(x, ['age', 'shop'])``."""
    arguments = list(inputs)
    renames, selections = info.renames(model), info.selections(model)
    for position in sorted({*renames, *selections}):
        source = inputs[position]
        name = f"{model.name}_{source.name}"
        value = source
        if position in renames:
            value = graph.create_node(
                "call_function",
                rename_keys,
                (value, dict(renames[position])),
                name=f"{name}_renamed" if position in selections else name,
            )
        if position in selections:
            value = graph.create_node(
                "call_function",
                select_keys,
                (value, list(selections[position])),
                name=name,
            )
        arguments[position] = value
    return arguments
