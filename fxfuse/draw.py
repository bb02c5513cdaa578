"""Draw a model's graph with its stages and cut points, using Graphviz.

One box per graph node that computes something; arrows follow the values. Each stage
of the chosen split is a cluster labelled with its size and share of the FLOPs. Cut
points are filled: the chosen cuts in a strong colour, the other cut points in a light
one. Inputs and the output sit outside the clusters and show their shapes.

Constants are folded away: ``get_attr`` nodes and nodes that depend on no input (the
split copies them into every stage that reads them) do not get a box; the tooltip of a
box lists the constants it reads. Nodes the output does not need are drawn dashed, as
the split drops them.

Large graphs are collapsed so that ``dot`` lays them out in seconds: when the graph
has more than `MAX_BOXES` boxes, or its layout cost (boxes plus the ranks its edges
cross, which DenseNet's concatenations make large) is above `MAX_LAYOUT_COST`, nodes
of one stage are grouped by module, the largest groups split into their child modules
first while the budget allows. Inputs, the output and the chosen cuts keep boxes of
their own, and the graph's label says that it was collapsed.
"""

from __future__ import annotations

import heapq
import logging
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import graphviz
import networkx as nx
import torch.fx as fx

from .analyse import module_path
from .errors import FxfuseError, InputError
from .files import write_bytes
from .split import needed_nodes, stage_of

if TYPE_CHECKING:
    from .report import Report

log = logging.getLogger("fxfuse")

SUFFIXES = (".dot", ".svg", ".png")
MAX_BOXES = 1500
# Layout cost (boxes plus ranks crossed by edges) above which the graph is collapsed,
# and above which dot runs with cheaper settings.
MAX_LAYOUT_COST = 6000
FAST_LAYOUT_COST = 1500

CHOSEN_CUT_COLOUR = "#d62728"
CUT_COLOUR = "#fdd0a2"
STAGE_COLOURS = ("#f2f6fc", "#f4faf0")
IO_COLOUR = "#e8e8e8"


@dataclass
class _Box:
    """One box of the picture: a graph node, or a collapsed group of them."""

    id: str
    label: str
    tooltip: str
    kind: str  # "input", "output", "op" or "group"
    stage: int | None = None
    chosen: bool = False
    cut_points: int = 0
    unused: bool = False
    members: list[fx.Node] = field(default_factory=list)


def draw(report: Report, path: str | Path) -> Path:
    """Draw the graph of an inspected model, with its stages and cut points.

    The suffix of `path` decides the format: ``.dot`` writes the DOT text, ``.svg``
    and ``.png`` render it with Graphviz's ``dot`` program. The file is written to a
    temporary name beside `path` and renamed into place, so no half-written file is
    ever left.

    Args:
        report: what `fxfuse.inspect` found.
        path: where to write the picture.

    Returns:
        The path written. When ``dot`` is not installed and ``.svg`` or ``.png`` was
        asked for, that is the DOT text beside it (``path.with_suffix(".dot")``), and
        a warning says how to install Graphviz.

    Raises:
        InputError: the suffix of `path` is not one of `SUFFIXES`.
        FxfuseError: ``dot`` failed to render the graph.

    Example::

        report = fxfuse.inspect(model, (torch.randn(2, 3, 64, 64),))
        fxfuse.draw(report, "resnet18.svg")
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(
            f"cannot draw to '{path}': unknown suffix '{path.suffix}'; "
            f"use one of {', '.join(SUFFIXES)}"
        )

    picture = to_graphviz(report)
    if suffix == ".dot":
        write_bytes(path, picture.source.encode())
        return path

    if shutil.which("dot") is None:
        dot_path = path.with_suffix(".dot")
        write_bytes(dot_path, picture.source.encode())
        log.warning(
            "graphviz's `dot` program is missing, so %s was not rendered; wrote the "
            "DOT text to %s instead (install it with `apt-get install graphviz`)",
            path,
            dot_path,
        )
        return dot_path

    try:
        data = picture.pipe(format=suffix[1:], quiet=True)
    except graphviz.CalledProcessError as error:
        raise FxfuseError(
            f"graphviz's `dot` could not render {path}: {error}; write a .dot file "
            "instead and render it yourself"
        ) from error
    write_bytes(path, data)
    return path


def to_graphviz(report: Report, max_boxes: int = MAX_BOXES) -> graphviz.Digraph:
    """The picture `draw` writes, as a `graphviz.Digraph`.

    Args:
        report: what `fxfuse.inspect` found.
        max_boxes: collapse the graph by module when it has more boxes than this.
    """
    gm = report.analysis.graph_module
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    chosen = {by_name[c.node] for c in report.chosen}
    cuts = {by_name[c.node] for c in report.cut_points}
    stage_index = stage_of(nodes, chosen)
    needed = needed_nodes(nodes)

    drawn = [n for n in nodes if _is_drawn(n, stage_index)]
    group_of, cost = _grouping(drawn, stage_index, chosen, max_boxes)
    boxes, box_of = _boxes(report, drawn, stage_index, needed, chosen, cuts, group_of)

    picture = graphviz.Digraph(report.name)
    computing = sum(1 for n in drawn if n.op not in ("placeholder", "output"))
    label = _graph_label(report, computing, len(boxes) if group_of else None)
    picture.attr(label=label, labelloc="t", fontname="Helvetica")
    if cost > FAST_LAYOUT_COST:
        # Fewer crossing-reduction and positioning passes, straight edges: dot's
        # defaults take minutes on graphs with many long edges.
        picture.attr(mclimit="0.05", nslimit="0.2", nslimit1="0.2", splines="line")
    picture.attr("node", shape="box", style="rounded", fontname="Helvetica")
    picture.attr("node", fontsize="10")
    picture.attr("edge", arrowsize="0.6")

    stage_flops = _stage_flops(report, nodes, stage_index)
    total = report.analysis.total_flops
    for k in range(len(report.chosen) + 1):
        members = [b for b in boxes if b.stage == k and b.kind in ("op", "group")]
        size = sum(
            1
            for b in members
            for n in b.members
            if n in needed and n.op not in ("placeholder", "output")
        )
        share = 100.0 * stage_flops.get(k, 0) / total if total else 0.0
        with picture.subgraph(name=f"cluster_{k}") as cluster:
            cluster.attr(
                label=f"stage {k}: {_count(size, 'node')}, {share:.1f}% FLOPs",
                style="filled",
                color="#9aa5b1",
                fillcolor=STAGE_COLOURS[k % len(STAGE_COLOURS)],
            )
            for box in members:
                _add_box(cluster, box)
    for box in boxes:
        if box.kind in ("input", "output") or box.stage is None:
            _add_box(picture, box)

    for tail, head in _edges(drawn, box_of):
        picture.edge(tail, head)
    return picture


def _is_drawn(node: fx.Node, stage_of: dict[fx.Node, int]) -> bool:
    """Inputs, the output and every node that depends on an input."""
    if node.op in ("placeholder", "output"):
        return True
    return node.op != "get_attr" and node in stage_of


def _grouping(drawn, stage_of, chosen, max_boxes) -> tuple[dict, int]:
    """The group of each collapsed node (empty when nothing needs collapsing), and
    the layout cost of the result.

    Many long edges (DenseNet's concatenations) slow ``dot`` down as much as many
    nodes do, so the budget of boxes is halved until the layout is cheap enough,
    then raised again by bisection as far as the cost allows.
    """
    group_of: dict[fx.Node, tuple] = {}
    cost = _layout_cost(drawn, group_of)
    if len(drawn) <= max_boxes and cost <= MAX_LAYOUT_COST:
        return group_of, cost

    def attempt(budget: int) -> tuple[dict, int]:
        grouping = _collapse(drawn, stage_of, chosen, budget)
        return grouping, _layout_cost(drawn, grouping)

    low, high = max_boxes, None  # cost fits at `low` (once found), not at `high`
    group_of, cost = attempt(low)
    while cost > MAX_LAYOUT_COST and low > 1:
        high, low = low, low // 2
        group_of, cost = attempt(low)
    while high is not None and high - low > max(8, low // 8):
        middle = (low + high) // 2
        grouping, middle_cost = attempt(middle)
        if middle_cost <= MAX_LAYOUT_COST:
            low, group_of, cost = middle, grouping, middle_cost
        else:
            high = middle
    return group_of, cost


def _collapse(drawn, stage_of, chosen, budget) -> dict[fx.Node, tuple]:
    """Group nodes by stage and module so that there are about `budget` boxes.

    Starts from one group per stage and splits the largest group into its child
    modules (and the nodes computed directly in it) while the budget allows. Inputs,
    the output and the chosen cuts keep boxes of their own.

    Returns:
        For each grouped node, its group: (stage, module path as a tuple of parts).
    """
    loose = [n for n in drawn if n.op not in ("placeholder", "output")]
    loose = [n for n in loose if n not in chosen]
    parts = {
        n: tuple(module_path(n).split(".")) if module_path(n) else () for n in loose
    }

    start: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in loose:
        start[(stage_of.get(node), ())].append(node)
    budget -= len(drawn) - len(loose)
    boxes = len(start)
    heap = [(-len(m), i, key, m) for i, (key, m) in enumerate(start.items())]
    heapq.heapify(heap)
    order = len(heap)

    group_of: dict[fx.Node, tuple] = {}
    while heap:
        _, _, key, members = heapq.heappop(heap)
        if len(members) == 1:
            continue  # a group of one is drawn as that node
        stage, prefix = key
        children: dict[tuple, list[fx.Node]] = defaultdict(list)
        direct = []
        for node in members:
            if len(parts[node]) > len(prefix):
                children[(stage, parts[node][: len(prefix) + 1])].append(node)
            else:
                direct.append(node)
        more = len(children) + len(direct) - 1
        if boxes + more > budget:
            group_of.update((node, key) for node in members)
            continue
        boxes += more
        for child, child_members in children.items():
            order += 1
            heapq.heappush(heap, (-len(child_members), order, child, child_members))
    return group_of


def _layout_cost(drawn, group_of) -> int:
    """Boxes plus the ranks that edges cross: what ``dot`` has to place.

    ``dot`` puts a virtual node on every rank an edge passes, so a few long edges
    can cost more than many boxes. Ranks are longest paths from the inputs in the
    box graph, with cycles (a group that feeds itself through another) contracted.
    """
    box_of = {n: group_of.get(n, n.name) for n in drawn}
    graph = nx.DiGraph()
    graph.add_nodes_from(set(box_of.values()))
    graph.add_edges_from(_edges(drawn, box_of))
    acyclic = nx.condensation(graph)
    component = acyclic.graph["mapping"]
    rank: dict[int, int] = {}
    for c in nx.topological_sort(acyclic):
        rank[c] = max((rank[p] + 1 for p in acyclic.predecessors(c)), default=0)
    spans = sum(
        max(0, rank[component[head]] - rank[component[tail]] - 1)
        for tail, head in graph.edges
    )
    return graph.number_of_nodes() + spans


def _boxes(report, drawn, stage_of, needed, chosen, cuts, group_of):
    """The boxes of the picture, and the id of the box of each drawn node.

    Nodes in `group_of` share one box per group; the others get one box each.
    """
    shapes = _known_shapes(report)
    boxes: dict[object, _Box] = {}
    box_of: dict[fx.Node, str] = {}
    for node in drawn:
        key = group_of.get(node)
        if key is None:
            box = _node_box(node, shapes, stage_of, needed, chosen, cuts)
            boxes[box.id] = box
        else:
            box = boxes.get(key)
            if box is None:
                stage, prefix = key
                box_id = f"stage{stage}/{'.'.join(prefix) or '(root)'}"
                box = boxes[key] = _Box(box_id, "", "", "group", stage=stage)
            box.members.append(node)
            box.cut_points += node in cuts
        box_of[node] = box.id

    for key, box in boxes.items():
        if box.kind == "group":
            _label_group(box, ".".join(key[1]), needed)
    return list(boxes.values()), box_of


def _node_box(node, shapes, stage_of, needed, chosen, cuts) -> _Box:
    shape = shapes.get(node.name)
    shown = _format_shape(shape) if shape is not None else None
    constants = [_constant_name(i) for i in node.all_input_nodes if i not in stage_of]
    if node.op in ("placeholder", "output"):
        title = f"input {node.name}" if node.op == "placeholder" else "output"
        label = title + (f"\\n{shown}" if shown else "")
        return _Box(node.name, label, title, "input" if title != "output" else "output")

    path = module_path(node)
    tooltip = [f"module: {path or '(root)'}", f"op: {_op_text(node)}"]
    if constants:
        tooltip.append("reads: " + ", ".join(constants))
    if node in cuts:
        tooltip.append("chosen cut point" if node in chosen else "cut point")
    unused = node not in needed
    if unused:
        tooltip.append("unused by the output; the split drops it")
    return _Box(
        node.name,
        node.name + (f"\\n{shown}" if shown else ""),
        "\\n".join(tooltip),
        "op",
        stage=stage_of.get(node),
        chosen=node in chosen,
        cut_points=int(node in cuts),
        unused=unused,
        members=[node],
    )


def _label_group(box: _Box, path: str, needed: set[fx.Node]) -> None:
    count = sum(1 for n in box.members if n in needed)
    box.label = f"{path or '(root)'}\\n{_count(count, 'node')}"
    box.tooltip = f"module: {path or '(root)'}\\n{len(box.members)} nodes collapsed"
    if box.cut_points:
        box.tooltip += f"\\n{box.cut_points} cut points inside"


def _add_box(picture: graphviz.Digraph, box: _Box) -> None:
    attrs = {"label": box.label, "tooltip": box.tooltip}
    if box.kind in ("input", "output"):
        attrs.update(
            shape="invhouse" if box.kind == "input" else "house",
            style="filled",
            fillcolor=IO_COLOUR,
        )
    elif box.chosen:
        attrs.update(
            style="rounded,filled,bold",
            fillcolor=CHOSEN_CUT_COLOUR,
            fontcolor="white",
            penwidth="3",
        )
    elif box.cut_points:
        attrs.update(style="rounded,filled,bold", fillcolor=CUT_COLOUR, penwidth="2")
    elif box.unused:
        attrs.update(style="rounded,dashed", fontcolor="#7f7f7f")
    if box.kind == "group":
        attrs["shape"] = "box3d"
    picture.node(box.id, **attrs)


def _edges(drawn: list[fx.Node], box_of: dict[fx.Node, str]) -> Iterable[tuple]:
    """Value-flow edges between boxes, each once, without self-loops."""
    edges: dict[tuple[str, str], None] = {}
    for node in drawn:
        for source in node.all_input_nodes:
            tail, head = box_of.get(source), box_of[node]
            if tail is not None and tail != head:
                edges[(tail, head)] = None
    return edges.keys()


def _stage_flops(report, nodes, stage_of) -> dict[int, int]:
    """FLOPs per stage; a constant counts in the first stage that reads it."""
    flops = report.analysis.node_flops
    stage = dict(stage_of)
    for node in reversed(nodes):
        if node not in stage:
            readers = [stage[u] for u in node.users if u in stage]
            if readers:
                stage[node] = min(readers)
    totals: dict[int, int] = defaultdict(int)
    for node, k in stage.items():
        if node.op != "output":
            totals[k] += flops.get(node.name, 0)
    return totals


def _known_shapes(report: Report) -> dict[str, tuple]:
    """Node shapes that the graph's metadata or the analysis know."""
    shapes: dict[str, tuple] = {}
    for node in report.analysis.graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta") or node.meta.get("val")
        shape = getattr(meta, "shape", None)
        if shape is not None:
            shapes[node.name] = tuple(shape)
    for cut in report.cut_points:
        shapes[cut.node] = cut.shape
    if report.analysis.output_shape is not None:
        shapes["output"] = report.analysis.output_shape
    return shapes


def _format_shape(shape: tuple) -> str:
    """``2x64x16x16``; a symbolic dimension (torch.export's dynamic batch) is ``B``."""
    if not shape:
        return "scalar"
    return "x".join(str(d) if isinstance(d, int) else "B" for d in shape)


def _op_text(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _constant_name(node: fx.Node) -> str:
    """A parameter's name, or a constant's name and the parameters it comes from."""
    if node.op == "get_attr":
        return str(node.target)
    sources, todo, seen = [], list(node.all_input_nodes), set()
    while todo:
        source = todo.pop()
        if source in seen:
            continue
        seen.add(source)
        if source.op == "get_attr":
            sources.append(str(source.target))
        todo.extend(source.all_input_nodes)
    return f"{node.name} (from {', '.join(sorted(sources))})" if sources else node.name


def _graph_label(report: Report, nodes: int, boxes: int | None) -> str:
    chosen = ", ".join(c.closes or c.node for c in report.chosen) or "none"
    label = (
        f"{report.name} (tier {report.tier}): {_count(nodes, 'node')}, "
        f"{_count(len(report.cut_points), 'cut point')}, chosen cuts: {chosen}"
    )
    if boxes is not None:
        label += (
            f"\\ncollapsed by module into {boxes} boxes: drawn node by node, the "
            "graph would take too long to lay out"
        )
    return label


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"
