"""Split a traced model at its cut points into stage GraphModules.

Stage 0 takes the model's own inputs; stage k > 0 takes the value of cut k - 1; the
last stage returns the model's output. Each stage keeps the original parameter names
(``layer2.0.conv1.weight``), so weights stay recognisable and shareable. Values that
do not depend on any input (parameters, constants computed from them) are copied into
every stage that uses them.

Because a cut point dominates the output, no value other than the cut crosses a stage
boundary. `check_parity` confirms it numerically on every split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

from .errors import FxfuseError

PARITY_ATOL = 1e-6


def split(gm: fx.GraphModule, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """Cut `gm` after each node named in `cuts` (which must dominate the output).

    Args:
        gm: a traced model.
        cuts: node names of cut points, in order from the inputs to the output.

    Returns:
        ``len(cuts) + 1`` stage modules; chaining them computes `gm`.
    """
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    cut_nodes = [by_name[c] for c in cuts]
    stage_index = stage_of(nodes, set(cut_nodes))
    needed = needed_nodes(nodes)

    stages = []
    for k in range(len(cut_nodes) + 1):
        members = [
            n
            for n in nodes
            if n in needed and stage_index.get(n) == k and n.op not in ("output",)
        ]
        entry = cut_nodes[k - 1] if k > 0 else None
        exit_ = cut_nodes[k] if k < len(cut_nodes) else None
        graph = _stage_graph(gm, nodes, members, entry, exit_, stage_index)
        stage = fx.GraphModule(gm, graph, f"Stage{k}")
        stages.append(stage)
    return stages


def chain(stages: Sequence[torch.nn.Module], *inputs):
    """Run stages one after the other: the first on `inputs`, each next on the last
    one's output."""
    value = stages[0](*inputs)
    for stage in stages[1:]:
        value = stage(value)
    return value


def check_parity(
    stages: Sequence[torch.nn.Module],
    reference,
    example_inputs: tuple,
    name: str = "model",
    atol: float = PARITY_ATOL,
) -> float:
    """Assert that the chained stages reproduce `reference` on the example inputs.

    `reference` is the model, or its output on the example inputs.

    Returns:
        The largest absolute difference over all output tensors.

    Raises:
        FxfuseError: the difference is above `atol`.
    """
    with torch.no_grad():
        want = reference(*example_inputs) if callable(reference) else reference
        got = chain(stages, *example_inputs)
    want_leaves = torch.utils._pytree.tree_leaves(want)
    got_leaves = torch.utils._pytree.tree_leaves(got)
    diff = 0.0
    for w, g in zip(want_leaves, got_leaves, strict=True):
        if isinstance(w, torch.Tensor):
            diff = max(diff, (w.double() - g.double()).abs().max().item())
    if diff > atol:
        raise FxfuseError(
            f"the stages of {name} do not reproduce it: max abs difference {diff:.3g} "
            f"> {atol:g}; report this model, and name other cuts with --cuts meanwhile"
        )
    return diff


def stage_of(nodes: list[fx.Node], cuts: set[fx.Node]) -> dict[fx.Node, int]:
    """Stage of each input-dependent node: the number of cuts strictly before it.

    Nodes that depend on no input get no stage: they are copied where used.
    """
    stage: dict[fx.Node, int] = {}
    for node in nodes:
        if node.op == "placeholder":
            stage[node] = 0
            continue
        sources = [i for i in node.all_input_nodes if i in stage]
        if sources:
            stage[node] = max(stage[i] + (i in cuts) for i in sources)
    return stage


def needed_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    output = next(n for n in reversed(nodes) if n.op == "output")
    seen = {output}
    todo = [output]
    while todo:
        for source in todo.pop().all_input_nodes:
            if source not in seen:
                seen.add(source)
                todo.append(source)
    return seen


def _stage_graph(gm, nodes, members, entry, exit_, stage_of) -> fx.Graph:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy(node: fx.Node) -> fx.Node:
        """Copy a node into this stage, first copying the constants it reads."""
        if node in env:
            return env[node]
        for source in node.all_input_nodes:
            if source not in stage_of:
                copy(source)
        env[node] = graph.node_copy(node, lambda n: env[n])
        return env[node]

    if entry is None:
        for node in nodes:
            if node.op == "placeholder":
                env[node] = graph.node_copy(node)
        _keep_input_structure(gm.graph, graph)
    else:
        placeholder = graph.placeholder(entry.name)
        placeholder.meta = dict(entry.meta)
        env[entry] = placeholder

    for node in members:
        if node.op != "placeholder":
            copy(node)

    if exit_ is not None:
        graph.output(env[exit_])
    else:
        output = next(n for n in reversed(nodes) if n.op == "output")
        flat = fx.node.map_arg(output.args[0], lambda n: copy(n))
        graph.output(_output_structure(gm.graph, flat))
    graph.lint()
    return graph


def _keep_input_structure(source: fx.Graph, graph: fx.Graph) -> None:
    """Graphs from torch.export take nested inputs (a dict); stage 0 must too."""
    codegen = source._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info.orig_args, info.in_spec, None))


def _output_structure(source: fx.Graph, flat):
    """The output as the model gives it: graphs from torch.export return a flat
    tuple that their code generator nests again."""
    codegen = source._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.out_spec:
        return torch.utils._pytree.tree_unflatten(
            list(flat), codegen.pytree_info.out_spec
        )
    return flat
