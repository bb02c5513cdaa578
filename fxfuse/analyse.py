"""Find where a traced model can be cut, from the structure of its graph alone.

A node is a *cut point* when every path from the inputs to the output passes through
it: it dominates the output. At a cut point the node's value is the only live value,
so the model splits there into two parts joined by one tensor. The dominator tree of
the value-flow graph gives all cut points in order; residual, dense and attention
blocks need no rule of their own.

Each cut point gets a *rank*: 1 when it is the last value computed inside a top-level
child module (it closes ``layer2``), 2 when it closes a grandchild (``layer2.1``), and
so on; ``None`` when it closes no module. Shapes, channel layout and FLOPs come from
running the graph once on the example inputs.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .errors import InputError
from .trace import Traced

_SOURCE = "__inputs__"

# Operations whose output keeps its channels in dimension 1 (NCHW, NCL).
_CHANNEL_FIRST_OPS = (
    "conv",
    "batch_norm",
    "max_pool",
    "avg_pool",
    "adaptive_avg_pool",
    "adaptive_max_pool",
    "group_norm",
    "instance_norm",
    "pixel_shuffle",
)
# Operations whose output keeps its channels in the last dimension.
_CHANNEL_LAST_OPS = (
    "linear",
    "layer_norm",
    "embedding",
    "matmul",
    "bmm",
    "scaled_dot_product_attention",
    "multihead_attention",
    "gru",
    "lstm",
    "rnn",
)


@dataclass
class CutPoint:
    """A node whose value alone carries everything the rest of the model needs.

    Attributes:
        index: position among the model's cut points, from the input side, from 0.
        node: name of the graph node.
        module_path: innermost module the node was computed in ('' for the root).
        rank: depth of the coarsest module this node closes (1 = a top-level child),
            or None when it closes no module.
        closes: that module's path, or None.
        shape: shape of the value on the example inputs.
        channel_dim: dimension that holds the channels (1 or ndim - 1).
        flops: FLOPs of the model up to and including this node.
        flops_fraction: `flops` as a fraction of the whole model's FLOPs.
        params: parameters used up to and including this node.
    """

    index: int
    node: str
    module_path: str
    rank: int | None
    closes: str | None
    shape: tuple[int, ...]
    channel_dim: int
    flops: int
    flops_fraction: float
    params: int

    @property
    def layout(self) -> str:
        """'channels_first' (NCHW, NCL) or 'channels_last' (NC, NTC, NHWC)."""
        first = self.channel_dim == 1 and len(self.shape) > 2
        return "channels_first" if first else "channels_last"


@dataclass
class Analysis:
    """What fxfuse knows about one traced model.

    Attributes:
        traced: the captured graph and how it was captured.
        cut_points: every cut point, in order from the inputs to the output.
        node_flops: FLOPs of each node, by node name.
        node_params: parameter tensors each node uses, by node name.
        total_flops: FLOPs of the whole model on the example inputs.
        total_params: parameters of the whole model.
        module_calls: how often each module was called in one forward pass.
        param_names: qualified names of all the model's parameters.
        output_shape: shape of the model's output, when it is one tensor.
        reference: the model's own output on the example inputs (eager mode).
    """

    traced: Traced
    cut_points: list[CutPoint]
    node_flops: dict[str, int]
    node_params: dict[str, list[str]]
    total_flops: int
    total_params: int
    module_calls: dict[str, int] = field(default_factory=dict)
    param_names: list[str] = field(default_factory=list)
    output_shape: tuple[int, ...] | None = None
    reference: object = None

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.traced.graph_module

    @property
    def reused_modules(self) -> list[str]:
        """Modules called more than once per forward pass."""
        return sorted(p for p, n in self.module_calls.items() if n > 1 and p)

    @property
    def unused_modules(self) -> list[str]:
        """Modules with parameters that the forward pass neither called nor read.

        Only the outermost such module is listed (``AuxLogits``, not its layers).
        """
        used = {p for names in self.node_params.values() for p in names}
        active: set[str] = set()  # called modules and every module above them
        for path, count in self.module_calls.items():
            if count:
                parts = path.split(".")
                active.update(".".join(parts[:d]) for d in range(1, len(parts) + 1))
        params_of = _by_module(self.param_names)
        unused: list[str] = []
        for path in self.module_calls:
            if not path or path in active or _prefixes(path) & set(unused):
                continue
            own = params_of.get(path, [])
            if own and not any(p in used for p in own):
                unused.append(path)
        return unused

    def find(self, name_or_path: str) -> CutPoint:
        """The cut point with this node name, or the one that closes this module.

        Raises:
            KeyError: no cut point has that name or closes that module.
        """
        for cut in self.cut_points:
            if name_or_path in (cut.node, cut.closes):
                return cut
        for cut in reversed(self.cut_points):
            if cut.module_path == name_or_path:
                return cut
        raise KeyError(name_or_path)


def analyse(
    traced: Traced,
    model: nn.Module,
    example_inputs: tuple,
    eager: EagerRun | None = None,
) -> Analysis:
    """Cut points, ranks, shapes, layouts and costs of a traced model.

    Args:
        traced: the graph from `fxfuse.trace.trace`.
        model: the original model (for parameter counts and module calls).
        example_inputs: positional arguments the graph is run on once.
        eager: the model's own run on the inputs, when the caller already has it.
    """
    gm = traced.graph_module
    nodes = list(gm.graph.nodes)
    values, node_flops = _run(gm, example_inputs)
    node_params = _node_params(gm)
    constants = _constants(nodes)
    dominators = _output_dominators(nodes, constants)
    paths = {n.name: module_path(n) for n in nodes}
    closes = _closed_modules(nodes, paths)
    channel_dims = _channel_dims(nodes, values)

    cut_points = []
    flops_so_far = 0
    params_seen: set[str] = set()
    total_flops = sum(node_flops.values())
    final = _final_value(gm)
    param_sizes = {name: p.numel() for name, p in gm.named_parameters()}
    params_so_far = 0
    for node in nodes:
        flops_so_far += node_flops.get(node.name, 0)
        for name in node_params.get(node.name, ()):
            if name not in params_seen:
                params_seen.add(name)
                params_so_far += param_sizes.get(name, 0)
        if node.name not in dominators or node is final or node.op == "placeholder":
            continue
        value = values.get(node.name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        closed = closes.get(node.name)
        cut_points.append(
            CutPoint(
                index=len(cut_points),
                node=node.name,
                module_path=paths[node.name],
                rank=closed.count(".") + 1 if closed else None,
                closes=closed,
                shape=tuple(value.shape),
                channel_dim=channel_dims.get(node.name, value.dim() - 1),
                flops=flops_so_far,
                flops_fraction=flops_so_far / total_flops if total_flops else 0.0,
                params=params_so_far,
            )
        )

    output = values.get("output")
    eager = eager or run_eagerly(model, example_inputs)
    return Analysis(
        traced=traced,
        cut_points=cut_points,
        node_flops=node_flops,
        node_params=node_params,
        total_flops=total_flops,
        total_params=sum(p.numel() for p in model.parameters()),
        module_calls=eager.calls,
        param_names=[name for name, _ in model.named_parameters()],
        output_shape=tuple(output.shape) if isinstance(output, torch.Tensor) else None,
        reference=eager.output,
    )


def module_path(node: fx.Node) -> str:
    """The innermost module a node was computed in ('' for the root module)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):  # torch.export's placeholder label
        return ""
    return _clean_path(path)


def _clean_path(path: str) -> str:
    """torch.export may spell paths as ``L['self'].layer1[0]``; make them dotted."""
    if path.startswith("L['self']"):
        path = path[len("L['self']") :].replace("[", ".").replace("]", "")
        path = path.replace("'", "").strip(".")
    return path


class _Recorder(fx.Interpreter):
    """Runs the graph once, keeping every node's value and FLOPs."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.flops: dict[str, int] = {}
        self.counter = FlopCounterMode(display=False)
        self._total = 0

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        total = self.counter.get_total_flops()
        self.flops[n.name] = total - self._total
        self._total = total
        return result


def _run(gm: fx.GraphModule, example_inputs: tuple):
    """Every node's value and FLOPs on the example inputs.

    Real tensors, not fake ones: fake tensors cost about 2 ms per node, which is more
    than computing a small model's nodes outright.
    """
    recorder = _Recorder(gm)
    try:
        with torch.no_grad(), recorder.counter:
            output = recorder.run(*example_inputs)
    except Exception as error:
        raise InputError(
            f"the example inputs do not fit the traced model: {_first_line(error)}; "
            "pass inputs with the shapes and dtypes the model expects"
        ) from error
    values = {n.name: v for n, v in recorder.env.items()}
    values["output"] = output
    return values, recorder.flops


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def _node_params(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Qualified names of the parameters each computing node reads.

    A parameter read through a ``get_attr`` node counts for the nodes that use it,
    so that parameters add up where they are used, not where they are declared.
    """
    params = dict(gm.named_parameters())
    by_module = _by_module(params)
    used: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            used[node.name] = by_module.get(str(node.target), [])
        elif node.op in ("call_function", "call_method"):
            reads = [
                str(i.target)
                for i in node.all_input_nodes
                if i.op == "get_attr" and str(i.target) in params
            ]
            if reads:
                used[node.name] = reads
    return used


def _by_module(param_names) -> dict[str, list[str]]:
    """Parameter names grouped under every module that holds them."""
    by_module: dict[str, list[str]] = {}
    for name in param_names:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            by_module.setdefault(".".join(parts[:depth]), []).append(name)
    return by_module


def _prefixes(path: str) -> set[str]:
    """The modules strictly above `path` (``a``, ``a.b`` for ``a.b.c``)."""
    parts = path.split(".")
    return {".".join(parts[:d]) for d in range(1, len(parts))}


def _constants(nodes: list[fx.Node]) -> set[str]:
    """Nodes whose value does not depend on any input: they travel with their users."""
    constant: set[str] = set()
    for node in nodes:
        if node.op in ("placeholder", "output"):
            continue
        inputs = node.all_input_nodes
        if node.op == "get_attr" or all(i.name in constant for i in inputs):
            if node.op != "call_module" or inputs:
                constant.add(node.name)
    return constant


def _output_dominators(nodes: list[fx.Node], constants: set[str]) -> set[str]:
    """Names of the nodes that lie on every path from the inputs to the output."""
    graph = nx.DiGraph()
    graph.add_node(_SOURCE)
    output = None
    for node in nodes:
        if node.name in constants:
            continue
        if node.op == "placeholder":
            graph.add_edge(_SOURCE, node.name)
        for source in node.all_input_nodes:
            if source.name not in constants:
                graph.add_edge(source.name, node.name)
        if node.op == "output":
            output = node.name
    if output is None or output not in graph:
        return set()
    idom = nx.immediate_dominators(graph, _SOURCE)
    chain = set()
    current = idom.get(output)
    while current is not None and current != _SOURCE:
        chain.add(current)
        parent = idom[current]
        current = None if parent == current else parent
    return chain


def _closed_modules(nodes: list[fx.Node], paths: dict[str, str]) -> dict[str, str]:
    """For each node that is the last one computed inside some module, the coarsest
    such module."""
    last_inside: dict[str, str] = {}
    for node in nodes:
        path = paths[node.name]
        if node.op in ("placeholder", "get_attr", "output") or not path:
            continue
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            last_inside[".".join(parts[:depth])] = node.name
    closes: dict[str, str] = {}
    for path, name in last_inside.items():
        if name not in closes or path.count(".") < closes[name].count("."):
            closes[name] = path
    return closes


def _channel_dims(nodes: list[fx.Node], values: dict) -> dict[str, int]:
    """Which dimension holds the channels of each tensor value.

    Known operations decide (convolutions and pooling put channels first; linear
    layers, layer norms and attention put them last); permutes and transposes move
    the dimension; other operations keep it from their first tensor input.
    """
    dims: dict[str, int] = {}
    modules_first = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    modules_first += (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
    modules_first += (nn.GroupNorm, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)
    modules_last = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
    modules_last += (nn.RNNBase, nn.EmbeddingBag)
    for node in nodes:
        value = values.get(node.name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            continue
        ndim = value.dim()
        name = _op_name(node).lower()
        module = None
        if node.op == "call_module":
            module = node.graph.owning_module.get_submodule(str(node.target))
        if isinstance(module, modules_first):
            dims[node.name] = 1
        elif isinstance(module, modules_last):
            dims[node.name] = ndim - 1
        elif module is not None:
            dims[node.name] = _inherited_channel_dim(node, name, ndim, dims, values)
        elif any(key in name for key in _CHANNEL_FIRST_OPS):
            dims[node.name] = 1
        elif any(key in name for key in _CHANNEL_LAST_OPS):
            dims[node.name] = ndim - 1
        else:
            dims[node.name] = _inherited_channel_dim(node, name, ndim, dims, values)
    return dims


def _inherited_channel_dim(node, name, ndim, dims, values) -> int:
    source = next(
        (
            i
            for i in node.all_input_nodes
            if i.name in dims and values[i.name].dim() == ndim
        ),
        None,
    )
    if "permute" in name and node.all_input_nodes:
        first = node.all_input_nodes[0]
        order = node.args[1:] if len(node.args) > 2 else node.args[1]
        if first.name in dims and isinstance(order, (list, tuple)):
            order = [d % ndim for d in order if isinstance(d, int)]
            if len(order) == ndim:
                return order.index(dims[first.name] % ndim)
    if "transpose" in name and len(node.args) >= 3:
        first = node.all_input_nodes[0]
        a, b = (d % ndim for d in node.args[1:3])
        if first.name in dims:
            old = dims[first.name] % ndim
            return b if old == a else a if old == b else old
    if source is not None:
        return dims[source.name]
    return 1 if ndim == 4 else ndim - 1


def _op_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return str(target)
    return getattr(target, "__name__", str(target))


def _final_value(gm: fx.GraphModule) -> fx.Node | None:
    """The node whose value the graph returns, when it returns one node."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = [a for a in output.all_input_nodes]
    return values[0] if len(values) == 1 else None


@dataclass
class EagerRun:
    """The model's own output on the example inputs, and its module calls."""

    output: object
    calls: dict[str, int]


def run_eagerly(model: nn.Module, example_inputs: tuple, name: str = "") -> EagerRun:
    """Run the model once, counting how often each module runs.

    Raises:
        InputError: the inputs do not fit the model; the message names the missing
            input key, or the module that failed with the shapes it was given.
    """
    calls: Counter[str] = Counter({path: 0 for path, _ in model.named_modules()})
    shapes: dict[str, str] = {}

    def count(module, args, path):
        calls.update([path])
        shapes[path] = _describe(args)

    handles = [
        module.register_forward_pre_hook(lambda m, a, path=path: count(m, a, path))
        for path, module in model.named_modules()
    ]
    try:
        with torch.no_grad():
            output = model(*example_inputs)
    except Exception as error:
        raise _input_error(model, example_inputs, error, shapes, name) from error
    finally:
        for handle in handles:
            handle.remove()
    return EagerRun(output, dict(calls))


def _describe(value) -> str:
    leaves = torch.utils._pytree.tree_leaves(value)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    return ", ".join("x".join(map(str, t.shape)) or "scalar" for t in tensors)


def _input_error(model, example_inputs, error, shapes, name) -> InputError:
    from .trace import _locate

    name = name or type(model).__name__
    given = describe_inputs(example_inputs)
    if isinstance(error, KeyError):
        return InputError(
            f"{name} reads input {error}, which the example inputs do not have "
            f"(they have: {given}); add it or map the inputs"
        )
    failure = _locate(error, {id(m): p for p, m in model.named_modules()})
    path = failure.module_path
    failing = _failing_module(model, error, shapes)
    recorded = _recorded_inputs(model)
    if recorded and "input tree spec" in str(error):
        # A torch.export program given inputs of another structure (a dict for a
        # tensor, other keys): torch's message is the two structures, at length.
        return InputError(
            f"example inputs ({given}) do not fit {name}, which takes {recorded} "
            "(N: any batch size); give inputs of that structure, or fuse it with "
            "models that take the same inputs"
        )
    if recorded and (failing or "").startswith("_guards"):
        # A torch.export program checks its inputs in a guard module of its own;
        # the shapes it was exported for say more than that module's name.
        return InputError(
            f"example inputs ({given}) do not fit {name}, which takes {recorded} "
            f"(N: any batch size): {_first_line(error)}"
        )
    where = f" in module '{failing}' (given {shapes[failing]})" if failing else ""
    if not failing and path is not None:
        where = f" in module '{path or '<root>'}'"
    expected = _expectation(model, failing)
    return InputError(
        f"example inputs ({given}) do not fit {name}{where}{expected}: "
        f"{_first_line(error)}"
    )


def describe_inputs(example_inputs: tuple) -> str:
    """Inputs as text: ``input 0 2x3x32x32`` per positional tensor, ``key 2`` per
    dict entry, separated by semicolons."""
    parts = []
    for i, value in enumerate(example_inputs):
        if isinstance(value, dict):
            parts.extend(f"{k} {_describe(v)}" for k, v in value.items())
        else:
            parts.append(f"input {i} {_describe(value)}")
    return "; ".join(parts)


def _recorded_inputs(model) -> str:
    """The input shapes a graph records for its placeholders (``x Nx1x36x36``),
    or "" when it records none. Symbolic sizes are shown as N."""
    if not isinstance(model, fx.GraphModule):
        return ""
    parts = []
    for node in model.graph.nodes:
        value = node.meta.get("val")
        if node.op == "placeholder" and isinstance(value, torch.Tensor):
            sizes = [str(d) if isinstance(d, int) else "N" for d in value.shape]
            parts.append(f"{node.name} {'x'.join(sizes) or 'scalar'}")
    return "; ".join(parts)


def _failing_module(model, error, shapes) -> str | None:
    """The innermost module that had started running when the error came."""
    deepest = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            for path, module in model.named_modules():
                if module is owner and path in shapes:
                    deepest = path
    return deepest


def _expectation(model, path) -> str:
    if not path:
        return ""
    module = model.get_submodule(path)
    if isinstance(module, nn.Linear):
        return f", which expects {module.in_features} features in the last dimension"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f", which expects {module.in_channels} channels in dimension 1"
    if isinstance(module, nn.Embedding):
        return f", which expects ids below {module.num_embeddings}"
    return ""
