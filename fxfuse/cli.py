"""The ``fxfuse`` command line: a thin layer over the Python API.

Every error fxfuse raises on purpose is printed as one line on stderr with exit code
2; ``-v`` adds the traceback and progress logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence

from ._version import __version__
from .errors import FxfuseError

log = logging.getLogger("fxfuse")
EXIT_BAD_INPUT = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.run(args) or 0
    except FxfuseError as error:
        if args.verbose:
            raise
        print(f"fxfuse: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fxfuse: interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbose: int) -> None:
    level = (
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    )
    logging.basicConfig(format="fxfuse: %(message)s", level=level)
    log.setLevel(level)
    if not verbose:
        # Warnings are one line each, without the source line that raised them.
        warnings.showwarning = _one_line_warning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"fxfuse: warning: {message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxfuse",
        description="Fuse trained single-task PyTorch models into one multi-task model.",
    )
    parser.add_argument("--version", action="version", version=f"fxfuse {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="progress logs; tracebacks"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_inspect(commands)
    _add_fuse(commands)
    return parser


def _common_model_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--example-inputs",
        metavar="SPEC",
        help="a tensor/tuple/dict file, shapes like 2x3x224x224, or features like "
        "shop=int10,price=float (not needed for .pt2 archives that store them)",
    )
    command.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading whole pickled models (.pt): this runs code from the file",
    )


def _add_inspect(commands) -> None:
    command = commands.add_parser(
        "inspect",
        help="show where a model can be cut",
        description="Trace a model, list its cut points and the stages of a split.",
    )
    command.add_argument(
        "model", help="model.pt2, module:factory[@weights], or model.pt"
    )
    _common_model_options(command)
    command.add_argument("--levels", type=int, default=3, help="cuts in the split (3)")
    command.add_argument(
        "--cuts", help="module paths or node names to cut at, comma-separated"
    )
    command.add_argument(
        "--leaf", action="append", default=[], help="module path to keep opaque"
    )
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.add_argument(
        "--graph", metavar="FILE", help="draw the graph (.svg, .png or .dot)"
    )
    command.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from .load import load_model
    from .report import inspect

    loaded = load_model(args.model, allow_pickle=args.allow_pickle)
    inputs = _example_inputs(args.example_inputs, loaded)
    cuts = [c.strip() for c in args.cuts.split(",")] if args.cuts else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = inspect(
            loaded.model,
            inputs,
            levels=args.levels,
            cuts=cuts,
            leaf_modules=args.leaf,
            name=loaded.name,
        )
    notes = _unique(str(w.message) for w in caught)
    for note in notes:
        print(f"fxfuse: warning: {note}", file=sys.stderr)
    if args.graph:
        from .draw import draw

        written = draw(report, args.graph)
    if args.json:
        print(json.dumps(report_json(report, notes), indent=2))
    else:
        print(format_report(report))
        if args.graph:
            print(f"\ngraph: {written}")
    return 0


def _add_fuse(commands) -> None:
    command = commands.add_parser(
        "fuse",
        help="fuse models into one multi-task model",
        description="Fuse trained single-task models into one multi-task artifact.",
    )
    command.add_argument(
        "--task",
        action="append",
        required=True,
        metavar="NAME=MODEL[,MODEL...]",
        help="a task and its models (repeat for each task)",
    )
    _common_model_options(command)
    command.add_argument("--levels", type=int, default=3, help="fusion levels (3)")
    command.add_argument(
        "--cuts",
        action="append",
        default=[],
        metavar="MODEL=PATH[,PATH...]",
        help="cut a model at these module paths or nodes instead of choosing",
    )
    command.add_argument("--width", type=int, default=64, help="AKF token width (64)")
    command.add_argument("--heads", type=int, default=4, help="AKF attention heads (4)")
    command.add_argument("-o", "--output", required=True, help="artifact folder")
    command.add_argument(
        "--force", action="store_true", help="replace an existing artifact"
    )
    command.set_defaults(run=_run_fuse)


def _run_fuse(args) -> int:
    from .artifact import save
    from .errors import InputError
    from .generate import fuse
    from .load import load_model

    tasks: dict[str, dict] = {}
    by_key: dict[str, str] = {}
    for entry in args.task:
        task, _, specs = entry.partition("=")
        task = task.strip()
        if not task or not specs.strip():
            raise InputError(
                f"--task '{entry}' has no model; write --task NAME=MODEL[,MODEL...]"
            )
        if task in tasks:
            raise InputError(f"task '{task}' is given twice; give each task once")
        tasks[task] = {}
        for spec in (s.strip() for s in specs.split(",") if s.strip()):
            loaded = load_model(spec, allow_pickle=args.allow_pickle)
            name = _unique_key(loaded.name, tasks[task])
            tasks[task][name] = loaded
            for key in (spec, loaded.name, name, f"{task}_{name}"):
                by_key.setdefault(key, f"{task}_{name}")
    first = next(m for models in tasks.values() for m in models.values())
    inputs = _example_inputs(args.example_inputs, first)
    cuts = {}
    for entry in args.cuts:
        key, _, paths = entry.partition("=")
        if key not in by_key:
            raise InputError(
                f"--cuts names model '{key}', which no --task gives; the models are "
                f"{sorted(set(by_key.values()))}"
            )
        cuts[by_key[key]] = [p.strip() for p in paths.split(",") if p.strip()]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = fuse(
            {t: dict(m) for t, m in tasks.items()},
            inputs,
            levels=args.levels,
            cuts=cuts,
            width=args.width,
            heads=args.heads,
        )
    for note in _unique(str(w.message) for w in caught):
        print(f"fxfuse: warning: {note}", file=sys.stderr)
    save(fused, args.output, overwrite=args.force)
    print(format_fused(fused))
    print(f"\nwritten: {args.output}")
    return 0


def format_fused(fused) -> str:
    """A summary of a fused model: tasks, models, cuts and sizes."""
    info = fused.fusion_info
    trainable = sum(p.numel() for p in fused.parameters() if p.requires_grad)
    total = sum(p.numel() for p in fused.parameters())
    lines = [
        f"fused model: {len(info.tasks)} tasks, {len(info.models)} models, "
        f"{info.levels} levels, AKF width {info.width}",
        f"parameters: {_count(total)} ({_count(trainable)} trainable)",
    ]
    header = ("task", "model", "tier", "cuts")
    rows = [
        (
            m.task,
            m.name,
            m.tier,
            ", ".join(c or n for c, n in zip(m.cut_modules, m.cuts, strict=True)),
        )
        for m in info.models
    ]
    lines.extend(_table([header, *rows]))
    return "\n".join(lines)


def _unique_key(name: str, taken) -> str:
    key, k = name, 2
    while key in taken:
        key, k = f"{name}{k}", k + 1
    return key


def _example_inputs(spec: str | None, loaded) -> tuple:
    from .errors import InputError
    from .load import check_batch, parse_example_inputs

    if spec:
        return parse_example_inputs(spec)
    if loaded.example_inputs is not None:
        check_batch(loaded.example_inputs)
        return loaded.example_inputs
    raise InputError(
        f"{loaded.source} needs example inputs: pass --example-inputs with a file, "
        "shapes like 2x3x224x224, or features like shop=int10,price=float"
    )


def _unique(items) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape is not None else "-"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def format_report(report) -> str:
    """The human-readable `fxfuse inspect` output."""
    from .plan import stage_fractions

    analysis = report.analysis
    nodes = len(analysis.graph_module.graph.nodes)
    lines = [
        f"model: {report.name}  tier: {report.tier}  nodes: {nodes}  "
        f"parameters: {_count(analysis.total_params)}  "
        f"FLOPs: {_count(analysis.total_flops)}  output: {_shape(analysis.output_shape)}",
    ]
    if report.leaves:
        lines.append(f"kept as leaves: {', '.join(report.leaves)}")
    chosen = {c.node for c in report.chosen}
    header = ("", "idx", "node", "module path", "rank", "shape", "FLOPs %", "params")
    rows = [
        (
            "*" if c.node in chosen else "",
            str(c.index),
            c.node,
            c.module_path or "<root>",
            str(c.rank) if c.rank is not None else "-",
            _shape(c.shape),
            f"{100 * c.flops_fraction:.1f}",
            _count(c.params),
        )
        for c in report.cut_points
    ]
    lines.append(f"\ncut points: {len(report.cut_points)} (* = chosen)")
    lines.extend(_table([header, *rows]))
    fractions = stage_fractions(report.chosen, analysis.total_flops)
    lines.append(f"\nstages: {len(report.stages)} (levels={len(report.chosen)})")
    bounds = ["input", *[c.closes or c.node for c in report.chosen], "output"]
    for k, fraction in enumerate(fractions):
        params = sum(p.numel() for p in report.stages[k].parameters())
        lines.append(
            f"  stage {k}: {bounds[k]} -> {bounds[k + 1]}  "
            f"FLOPs {100 * fraction:.1f}%  params {_count(params)}"
        )
    lines.append(f"parity of chained stages: max abs diff {report.parity:.2g}")
    if analysis.reused_modules:
        lines.append(
            f"modules called more than once: {_listing(analysis.reused_modules)}"
        )
    if analysis.unused_modules:
        lines.append(f"modules never called: {_listing(analysis.unused_modules)}")
    return "\n".join(lines)


def _listing(items: list[str], most: int = 8) -> str:
    more = f" (+{len(items) - most} more)" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]


def report_json(report, notes: list[str] = ()) -> dict:
    """The `fxfuse inspect --json` output."""
    analysis = report.analysis
    return {
        "model": report.name,
        "tier": report.tier,
        "leaves": report.leaves,
        "nodes": len(analysis.graph_module.graph.nodes),
        "parameters": analysis.total_params,
        "flops": analysis.total_flops,
        "output_shape": analysis.output_shape,
        "cut_points": [
            {
                "index": c.index,
                "node": c.node,
                "module_path": c.module_path,
                "rank": c.rank,
                "closes": c.closes,
                "shape": list(c.shape),
                "layout": c.layout,
                "flops_fraction": round(c.flops_fraction, 6),
                "params": c.params,
            }
            for c in report.cut_points
        ],
        "chosen": [c.node for c in report.chosen],
        "stages": [
            {"parameters": sum(p.numel() for p in s.parameters())}
            for s in report.stages
        ],
        "parity": report.parity,
        "reused_modules": analysis.reused_modules,
        "unused_modules": analysis.unused_modules,
        "warnings": list(notes),
    }


if __name__ == "__main__":
    sys.exit(main())
