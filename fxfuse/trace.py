"""Capture a model as an ``fx.GraphModule``, trying tracing tiers in turn.

Tiers, tried in this order until one succeeds:

- ``fx``: ``torch.fx`` symbolic tracing. Nodes keep module names and carry their
  module path in ``node.meta["nn_module_stack"]``.
- ``fx+leaves``: on a failure inside a submodule, that submodule becomes a leaf (one
  opaque call in the graph) and tracing is retried, a bounded number of times.
- ``export``: ``torch.export.export(..., strict=False)`` with the example inputs and a
  dynamic batch dimension; the graph is functional (no in-place writes).

When every tier fails, `TraceFailure` names the user's file and line, the module path
and what can be done. Every later step works on whatever graph a tier produced.
"""

from __future__ import annotations

import contextlib
import copy
import inspect as pyinspect
import logging
import operator
import os
import traceback
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import TraceFailure

log = logging.getLogger("fxfuse")

TIERS = ("fx", "fx+leaves", "export")
MAX_LEAF_RETRIES = 8
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


class FallbackWarning(UserWarning):
    """A later tracing tier had to capture the model."""


class ModeDependentGraphWarning(UserWarning):
    """The traced graph differs between train and eval mode."""


class FrozenAttributeWarning(UserWarning):
    """A tensor attribute that is not a parameter or buffer was frozen into the graph."""


@dataclass
class Traced:
    """A model captured as a graph, and how it was captured.

    Attributes:
        graph_module: the captured graph; calling it gives the model's output.
        tier: which tier produced it (one of `TIERS`).
        leaves: module paths that were kept opaque so that tracing could succeed.
        notes: one line per fallback or risk met on the way.
    """

    graph_module: fx.GraphModule
    tier: str
    leaves: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    """Where a tier failed: the exception and the user's frame that raised it."""

    error: BaseException
    filename: str | None = None
    lineno: int | None = None
    line: str | None = None
    module_path: str | None = None

    def where(self) -> str:
        if self.filename is None:
            return "an unknown place"
        text = f"{self.filename}:{self.lineno}"
        if self.line:
            text += f" (`{self.line}`)"
        if self.module_path is not None:
            text += f" in module '{self.module_path or '<root>'}'"
        return text


def trace(
    model: nn.Module, example_inputs: tuple, leaf_modules: tuple[str, ...] = ()
) -> Traced:
    """Capture `model` as a GraphModule, trying the tiers in turn.

    Args:
        model: the model to capture, in the mode it will be used in (usually eval).
        example_inputs: positional arguments for `model`, as in `torch.export`.
        leaf_modules: module paths to keep opaque from the start.

    Returns:
        A `Traced` whose graph reproduces the model on the example inputs.

    Raises:
        TraceFailure: no tier could capture the model.
    """
    example_inputs = tuple(example_inputs)
    if isinstance(model, fx.GraphModule):
        return _already_traced(model)
    paths = {id(m): name for name, m in model.named_modules()}
    leaves = list(leaf_modules)
    notes: list[str] = []

    first_failure = None
    for attempt in range(MAX_LEAF_RETRIES + 1):
        try:
            gm = _symbolic_trace(model, set(leaves), notes)
        except Exception as error:  # any tracer failure moves on to the next step
            failure = _locate(error, paths)
            first_failure = first_failure or failure
            if _unsupported_mutation(error):
                notes.append(f"fx: in-place write at {failure.where()}")
                break
            path = failure.module_path
            if not path or path in leaves or attempt == MAX_LEAF_RETRIES:
                break
            log.debug("fx tracing failed in %s; retrying with it as a leaf", path)
            leaves.append(path)
            continue
        if _has_mutation(gm):
            notes.append("fx: the graph writes into a tensor in place")
            break
        tier = "fx+leaves" if len(leaves) > len(leaf_modules) else "fx"
        if tier != "fx":
            _warn_fallback(
                f"modules {leaves} were kept as leaves after tracing failed inside "
                f"them ({first_failure.where()})"
            )
        _check_mode_independent(model, set(leaves), gm)
        return Traced(gm, tier, leaves, notes)

    if first_failure is not None:
        notes.append(
            f"fx: {type(first_failure.error).__name__} at {first_failure.where()}"
        )
    try:
        gm = _export(model, example_inputs)
    except Exception as error:
        raise _trace_failure(model, first_failure, _locate(error, paths)) from error
    _warn_fallback(
        f"torch.fx could not trace {type(model).__name__}"
        + (f" ({first_failure.where()})" if first_failure else "")
        + "; captured it with torch.export instead"
    )
    return Traced(gm, "export", [], notes)


def _already_traced(model: fx.GraphModule) -> Traced:
    """A GraphModule (say, from a .pt2 archive) is used as it is."""
    gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    _drop_guard_nodes(gm)
    from_export = any("nn_module_stack" in n.meta for n in gm.graph.nodes)
    return Traced(gm, "export" if from_export else "fx", [], ["given as a graph"])


class _PathTracer(fx.Tracer):
    """A symbolic tracer that can keep chosen module paths opaque."""

    def __init__(self, root: nn.Module, leaf_paths: set[str], notes: list[str]):
        super().__init__()
        self.leaf_paths = leaf_paths
        self.notes = notes
        self._attribute_names = _tensor_attribute_names(root)
        self._frozen: set[str] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a):
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            name = self._attribute_names.get(id(a))
            if name is not None and name not in self._frozen:
                self._frozen.add(name)
                self.notes.append(f"fx: tensor attribute '{name}' frozen as a constant")
                warnings.warn(
                    f"tensor attribute '{name}' is not a parameter or buffer: its "
                    "value at tracing time is frozen into the graph as a constant; "
                    "register it with register_buffer() if it should follow the model",
                    FrozenAttributeWarning,
                    stacklevel=4,
                )
        return super().create_arg(a)


def _tensor_attribute_names(root: nn.Module) -> dict[int, str]:
    """Plain tensor attributes (neither parameter nor buffer), by id."""
    names = {}
    for path, module in root.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                names[id(value)] = f"{path}.{key}" if path else key
    return names


def _symbolic_trace(model: nn.Module, leaf_paths: set[str], notes: list[str]):
    tracer = _PathTracer(model, leaf_paths, notes)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _unsupported_mutation(error: BaseException) -> bool:
    return "does not support item assignment" in str(error)


def _has_mutation(gm: fx.GraphModule) -> bool:
    """Whether the graph writes into a tensor in a way the value flow cannot see."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.setitem:
            return True
        if node.op == "call_method" and str(node.target).endswith("_"):
            if not node.users:
                return True
    return False


def _check_mode_independent(model: nn.Module, leaf_paths: set[str], gm) -> None:
    """Warn when tracing in the other mode gives a different graph."""
    was_training = model.training
    try:
        model.train(not was_training)
        other = _symbolic_trace(model, leaf_paths, [])
    except Exception:
        return
    finally:
        model.train(was_training)
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    other_ops = [(n.op, str(n.target)) for n in other.graph.nodes]
    if ops != other_ops:
        mode = "train" if was_training else "eval"
        warnings.warn(
            f"the graph of {type(model).__name__} differs between train and eval mode "
            f"({len(ops)} vs {len(other_ops)} nodes); fxfuse uses the {mode}-mode "
            "graph, so the other mode's behaviour is not kept",
            ModeDependentGraphWarning,
            stacklevel=3,
        )


def _warn_fallback(message: str) -> None:
    log.info(message)
    warnings.warn(message, FallbackWarning, stacklevel=3)


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Capture with torch.export (non-strict) and a dynamic batch dimension."""
    dynamic = pytree.tree_map(
        lambda v: {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) else None,
        example_inputs,
    )
    if _takes_varargs(model):
        dynamic = (dynamic,)
    with quiet_torch_logs():
        program = torch.export.export(
            model, example_inputs, dynamic_shapes=dynamic, strict=False
        )
        if _program_mutates(program):
            program = program.run_decompositions({})
    gm = program.module()
    _drop_guard_nodes(gm)
    return gm


def _takes_varargs(model: nn.Module) -> bool:
    parameters = pyinspect.signature(model.forward).parameters.values()
    return any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _program_mutates(program) -> bool:
    for node in program.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op == "call_function" and schema is not None and schema.is_mutable:
            return True
    return False


def _drop_guard_nodes(gm: fx.GraphModule) -> None:
    """Remove torch.export's input guards and metadata asserts: they compute nothing."""
    for node in list(gm.graph.nodes):
        is_guard = node.op == "call_module" and node.target == "_guards_fn"
        is_assert = node.op == "call_function" and "_assert" in str(node.target)
        if (is_guard or is_assert) and not node.users:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()


@contextlib.contextmanager
def quiet_torch_logs():
    """torch.export logs failures loudly; fxfuse reports them itself."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.fx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _locate(error: BaseException, paths: dict[int, str]) -> _Failure:
    """The innermost frame of user code (outside torch) where `error` was raised."""
    user = None
    for frame, lineno in traceback.walk_tb(error.__traceback__):
        filename = frame.f_code.co_filename
        if filename.startswith((_TORCH_DIR, _OWN_DIR)) or "<" in filename:
            continue
        user = (frame, lineno)
    if user is None:
        return _Failure(error)
    frame, lineno = user
    summary = traceback.FrameSummary(
        frame.f_code.co_filename, lineno, frame.f_code.co_name
    )
    owner = frame.f_locals.get("self")
    return _Failure(
        error,
        filename=frame.f_code.co_filename,
        lineno=lineno,
        line=(summary.line or "").strip() or None,
        module_path=paths.get(id(owner)),
    )


def _trace_failure(
    model: nn.Module, fx_failure: _Failure | None, export_failure: _Failure
) -> TraceFailure:
    """One error that says what failed, where, and what the user can do."""
    failure = export_failure if export_failure.filename else fx_failure
    failure = failure or export_failure
    kind = _failure_kind(export_failure.error)
    name = type(model).__name__
    advice = {
        "data-dependent": (
            "control flow that depends on a tensor's value cannot be captured; "
            "rewrite it with torch.where(...) or torch.cond(...)"
        ),
        "other": (
            "make the failing module a leaf (leaf_modules=[path] / --leaf PATH), "
            "or rewrite the statement so that torch.export can capture it"
        ),
    }[kind]
    first_line = str(export_failure.error).strip().splitlines()
    reason = first_line[0] if first_line else type(export_failure.error).__name__
    return TraceFailure(
        f"cannot trace {name}: {kind} code at {failure.where()}: {reason[:200]}; "
        f"{advice}",
        limitation="tracing",
    )


def _failure_kind(error: BaseException) -> str:
    text = f"{type(error).__name__} {error}"
    markers = ("data-dependent", "DataDependent", "GuardOnDataDependent")
    return "data-dependent" if any(m in text for m in markers) else "other"
