"""Draw a model's graph with its stages and cut points, using Graphviz.

One box per graph node that computes something; arrows follow the values. Each stage
of the chosen split is a cluster labelled with its size and share of the FLOPs. Cut
points are filled: the chosen cuts in a strong colour, the other cut points in a light
one. Inputs and the output sit outside the clusters and show their shapes.

Constants are folded away: ``get_attr`` nodes and nodes that depend on no input (the
split copies them into every stage that reads them) do not get a box; the tooltip of a
box lists the constants it reads. Nodes the output does not need are drawn dashed, as
the split drops them.

Graphs with more than `MAX_BOXES` boxes are collapsed so that ``dot`` lays them out in
seconds: nodes of one stage whose module paths share a prefix become one box per
module, at the deepest module level that fits. The chosen cuts keep boxes of their
own, and the graph's label says that it was collapsed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import graphviz
import torch.fx as fx

from .analyse import module_path
from .errors import FxfuseError, InputError
from .report import Report
from .split import _ancestors_of_output, _stage_of

log = logging.getLogger("fxfuse")

SUFFIXES = (".dot", ".svg", ".png")
MAX_BOXES = 1500

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
        _write_atomically(path, picture.source.encode())
        return path

    if shutil.which("dot") is None:
        dot_path = path.with_suffix(".dot")
        _write_atomically(dot_path, picture.source.encode())
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
    _write_atomically(path, data)
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
    stage_of = _stage_of(nodes, chosen)
    needed = _ancestors_of_output(nodes)

    drawn = [n for n in nodes if _is_drawn(n, stage_of)]
    depth = None
    if len(drawn) > max_boxes:
        depth = _collapse_depth(drawn, stage_of, chosen, max_boxes)
    boxes, box_of = _boxes(report, drawn, stage_of, needed, chosen, cuts, depth)

    picture = graphviz.Digraph(report.name)
    label = _graph_label(report, len(drawn), depth, max_boxes)
    picture.attr(label=label, labelloc="t")
    picture.attr("node", shape="box", style="rounded", fontname="Helvetica")
    picture.attr("node", fontsize="10")
    picture.attr("edge", arrowsize="0.6")

    stage_flops = _stage_flops(report, nodes, stage_of)
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
                label=f"stage {k}: {size} nodes, {share:.1f}% FLOPs",
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


def _boxes(report, drawn, stage_of, needed, chosen, cuts, depth=None):
    """The boxes of the picture, and the box of each drawn node.

    With `depth` None every node gets its own box; otherwise nodes of one stage are
    grouped by the first `depth` parts of their module path.
    """
    shapes = _known_shapes(report)
    boxes: dict[str, _Box] = {}
    box_of: dict[fx.Node, str] = {}
    for node in drawn:
        key = _group_key(node, stage_of, chosen, depth)
        if key is None:
            box = _node_box(node, shapes, stage_of, needed, chosen, cuts)
            boxes[box.id] = box
        else:
            stage, prefix = key
            box = boxes.get(key)
            if box is None:
                box_id = f"stage{stage}/{prefix or '(root)'}"
                box = boxes[key] = _Box(box_id, "", "", "group", stage=stage)
            box.members.append(node)
            box.cut_points += node in cuts
        box_of[node] = box.id

    for box in boxes.values():
        if box.kind == "group":
            _label_group(box, needed)
    return list(boxes.values()), box_of


def _group_key(node, stage_of, chosen, depth) -> tuple | None:
    """Which group a node collapses into, or None when it keeps its own box."""
    if depth is None or node.op in ("placeholder", "output") or node in chosen:
        return None
    parts = module_path(node).split(".") if module_path(node) else []
    return (stage_of.get(node), ".".join(parts[:depth]))


def _collapse_depth(drawn, stage_of, chosen, max_boxes) -> int:
    """The deepest module level at which grouping gives at most `max_boxes` boxes."""
    deepest = max((len(module_path(n).split(".")) for n in drawn), default=0)
    for depth in range(deepest, 0, -1):
        keys = {_group_key(n, stage_of, chosen, depth) or n.name for n in drawn}
        if len(keys) <= max_boxes:
            return depth
    return 0


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


def _label_group(box: _Box, needed: set[fx.Node]) -> None:
    first = module_path(box.members[0]).split(".")
    path = ".".join(first[: _common_depth(box.members)])
    count = sum(1 for n in box.members if n in needed)
    box.label = f"{path or '(root)'}\\n{count} nodes"
    box.tooltip = f"module: {path or '(root)'}\\n{len(box.members)} nodes collapsed"
    if box.cut_points:
        box.tooltip += f"\\n{box.cut_points} cut points inside"


def _common_depth(members: list[fx.Node]) -> int:
    """How many leading module-path parts all members share."""
    paths = [module_path(n).split(".") if module_path(n) else [] for n in members]
    return len(os.path.commonprefix(paths))


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
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _op_text(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"call_module {node.target}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _constant_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "get_attr" else node.name


def _graph_label(report: Report, nodes: int, depth: int | None, max_boxes: int) -> str:
    chosen = ", ".join(c.closes or c.node for c in report.chosen) or "none"
    label = (
        f"{report.name} (tier {report.tier}): {nodes} nodes, "
        f"{len(report.cut_points)} cut points, chosen cuts: {chosen}"
    )
    if depth is not None:
        level = f"module depth {depth}" if depth else "stage"
        label += (
            f"\\ncollapsed to one box per {level}: the graph has more than "
            f"{max_boxes} nodes"
        )
    return label


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
