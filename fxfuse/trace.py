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
    """A module attribute that is not a parameter or buffer (a plain tensor, or a
    float used in arithmetic) was frozen into the graph as a constant."""


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
            Arguments they leave unfilled keep their defaults in the graph.
        leaf_modules: module paths to keep opaque from the start.

    Returns:
        A `Traced` whose graph reproduces the model on the example inputs.

    Raises:
        TraceFailure: no tier could capture the model.

    Limitations:
        A module attribute that is neither a parameter nor a buffer is read once,
        while tracing, and its value is frozen into the graph: changing it later
        does not change the traced model. `FrozenAttributeWarning` names two kinds,
        in the ``fx`` and ``fx+leaves`` tiers only: a plain tensor attribute, and a
        float attribute of a module of the user's own, passed as it is to
        arithmetic on traced values (``x * self.scale``, ``h / self.temperature``,
        ``x.clamp(max=self.limit)``). Not warned about: int and bool attributes
        (sizes, axes and switches, read by every model; an int is as likely a
        channel count as a scale), floats derived from an attribute before use
        (``self.scale * 2``), floats passed to other functions (dropout rates,
        ``eps``), floats of torch and torchvision modules and attributes listed in
        ``__constants__`` (architecture constants such as ``head_dim ** -0.5``),
        and anything the ``export`` tier freezes. See docs/limitations.md#tracing.
    """
    example_inputs = tuple(example_inputs)
    if isinstance(model, fx.GraphModule):
        return _already_traced(model)
    paths = {id(m): name for name, m in model.named_modules()}
    leaves = list(leaf_modules)
    defaults = _unfilled_defaults(model, len(example_inputs))
    notes: list[str] = []

    first_failure = None
    for attempt in range(MAX_LEAF_RETRIES + 1):
        try:
            gm, frozen = _symbolic_trace(model, set(leaves), defaults)
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
        if _reads_keyword_arguments(gm):
            notes.append(
                "fx: forward reads **kwargs, which positional inputs leave empty"
            )
            break
        tier = "fx+leaves" if len(leaves) > len(leaf_modules) else "fx"
        for message in frozen:
            notes.append(f"fx: {message.split(':')[0]}")
            warnings.warn(message, FrozenAttributeWarning, stacklevel=2)
        if tier != "fx":
            _warn_fallback(
                f"modules {leaves} were kept as leaves after tracing failed inside "
                f"them ({first_failure.where()})"
            )
        _check_mode_independent(model, set(leaves), defaults, gm)
        return Traced(gm, tier, leaves, notes)

    if first_failure is not None:
        notes.append(
            f"fx: {type(first_failure.error).__name__} at {first_failure.where()}"
        )
    try:
        gm = _export(model, example_inputs)
    except Exception as error:
        raise _trace_failure(model, first_failure, _locate(error, paths)) from error
    reason = first_failure.where() if first_failure else notes[-1][len("fx: ") :]
    _warn_fallback(
        f"torch.fx could not trace {type(model).__name__} ({reason}); captured it "
        "with torch.export instead"
    )
    return Traced(gm, "export", [], notes)


def _already_traced(model: fx.GraphModule) -> Traced:
    """A GraphModule (say, from a .pt2 archive) is used as it is."""
    gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
    _drop_guard_nodes(gm)
    from_export = any("nn_module_stack" in n.meta for n in gm.graph.nodes)
    return Traced(gm, "export" if from_export else "fx", [], ["given as a graph"])


class _PathTracer(fx.Tracer):
    """A symbolic tracer that can keep chosen module paths opaque, and that records
    the attributes it freezes into the graph (see `frozen`)."""

    def __init__(self, root: nn.Module, leaf_paths: set[str]):
        super().__init__()
        self.leaf_paths = leaf_paths
        self._attribute_names = _tensor_attribute_names(root)
        self._float_attributes = _float_attributes(root)
        self._frozen: set[str] = set()
        self._tensors: list[str] = []
        self._floats: list[str] = []

    @property
    def frozen(self) -> list[str]:
        """One message per frozen tensor attribute, and one for all float ones."""
        messages = [
            f"tensor attribute '{name}' frozen as a constant: it is not a parameter "
            "or buffer, so its value at tracing time is frozen into the graph; "
            "register it with register_buffer() if it should follow the model"
            for name in self._tensors
        ]
        if self._floats:
            shown = ", ".join(self._floats[:4])
            more = len(self._floats) - 4
            shown += f" and {more} more" if more > 0 else ""
            messages.append(
                f"float attribute{'s' * (len(self._floats) > 1)} {shown} frozen as "
                "constants: used in arithmetic on traced values, their values at "
                "tracing time are frozen into the graph and changing them later "
                "changes nothing; keep one as a buffer (register_buffer(name, "
                "torch.tensor(value))) if it should follow the model"
            )
        return messages

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a):
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            name = self._attribute_names.get(id(a))
            if name is not None and name not in self._frozen:
                self._frozen.add(name)
                self._tensors.append(name)
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if _is_arithmetic(kind, target):
            owned = self._float_attributes.get(self.scope.module_path, {})
            if owned:
                fx.node.map_aggregate((args, kwargs), self._check_float)
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def _check_float(self, value):
        """Record a float attribute of the module being traced that is used as an
        operand: the object itself, not an equal number (``x * 0.5``)."""
        if not isinstance(value, float):
            return
        path = self.scope.module_path
        key = self._float_attributes.get(path, {}).get(id(value))
        name = f"{path}.{key}" if path and key else key
        if name is not None and name not in self._frozen:
            self._frozen.add(name)
            self._floats.append(f"'{name}' ({value!r})")


def _tensor_attribute_names(root: nn.Module) -> dict[int, str]:
    """Plain tensor attributes (neither parameter nor buffer), by id."""
    names = {}
    for path, module in root.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not key.startswith("_"):
                names[id(value)] = f"{path}.{key}" if path else key
    return names


def _float_attributes(root: nn.Module) -> dict[str, dict[int, str]]:
    """Plain float attributes of each module, by module path, then by object id.

    Only modules of the user's own classes count. The floats of torch and
    torchvision modules are architecture constants (an attention scale
    ``head_dim ** -0.5``), and so are the attributes a class lists in
    ``__constants__`` (``eps``, ``momentum``, ``p``).
    """
    found: dict[str, dict[int, str]] = {}
    for path, module in root.named_modules():
        if type(module).__module__.split(".")[0] in _LIBRARIES:
            continue
        constants = set(getattr(type(module), "__constants__", ()))
        owned = {
            id(value): key
            for key, value in vars(module).items()
            if isinstance(value, float)
            and not key.startswith("_")
            and key not in constants
        }
        if owned:
            found[path] = owned
    return found


_LIBRARIES = ("torch", "torchvision")

# Operations whose operands are numbers to compute with, not settings.
_ARITHMETIC_FUNCTIONS = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.floordiv,
    operator.mod,
    operator.pow,
    torch.add,
    torch.sub,
    torch.rsub,
    torch.mul,
    torch.div,
    torch.true_divide,
    torch.pow,
    torch.clamp,
    torch.clip,
}
_ARITHMETIC_METHODS = {
    "add",
    "sub",
    "mul",
    "div",
    "true_divide",
    "pow",
    "clamp",
    "clip",
}


def _is_arithmetic(kind: str, target) -> bool:
    if kind == "call_function":
        return target in _ARITHMETIC_FUNCTIONS
    if kind == "call_method":
        return str(target).rstrip("_") in _ARITHMETIC_METHODS
    return False


def _unfilled_defaults(model: nn.Module, given: int) -> dict:
    """Parameters of `model.forward` that `given` positional inputs leave at their
    default, when the default is a plain value (``mask=None``, ``scale=2.0``).

    fx would make each a symbolic input: a branch on it (``if mask is not None``)
    would take the side of a given argument, and a value from it would look like
    an input to the analysis. Bound to its default, it is what the model computes.
    """
    try:
        parameters = list(pyinspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: bind nothing
        return {}
    positional = [
        p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unfilled = positional[given:] + [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    plain = (type(None), bool, int, float, str)
    return {p.name: p.default for p in unfilled if type(p.default) in plain}


def _symbolic_trace(
    model: nn.Module, leaf_paths: set[str], defaults: dict | None = None
) -> tuple[fx.GraphModule, list[str]]:
    """The fx graph of `model` with `defaults` bound, and messages naming the
    attributes frozen into it."""
    tracer = _PathTracer(model, leaf_paths)
    graph = tracer.trace(model, concrete_args=defaults or None)
    return fx.GraphModule(tracer.root, graph, type(model).__name__), tracer.frozen


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


def _reads_keyword_arguments(gm: fx.GraphModule) -> bool:
    """Whether the root forward reads its ``**kwargs``: fx keeps them as a symbolic
    input that the example inputs (positional only) never fill, so the graph cannot
    be run or cut as traced; torch.export binds them to ``{}`` instead."""
    return any(
        node.op == "placeholder" and str(node.target).startswith("**") and node.users
        for node in gm.graph.nodes
    )


def _check_mode_independent(
    model: nn.Module, leaf_paths: set[str], defaults: dict, gm
) -> None:
    """Warn when tracing in the other mode gives a different graph."""
    was_training = model.training
    try:
        model.train(not was_training)
        other, _ = _symbolic_trace(model, leaf_paths, defaults)
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
    return _Failure(
        error,
        filename=frame.f_code.co_filename,
        lineno=lineno,
        line=(summary.line or "").strip() or None,
        module_path=paths.get(id(_frame_owner(frame))),
    )


def _frame_owner(frame):
    """The first argument of the frame's function (``self`` in a method), whatever
    its name: a ``forward(s, x)`` belongs to its module as much as ``forward(self, x)``.
    """
    code = frame.f_code
    if not code.co_argcount:
        return None
    return frame.f_locals.get(code.co_varnames[0])


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
