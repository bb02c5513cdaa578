"""The ``fxfuse`` command line: a thin layer over the Python API.

Every error fxfuse raises on purpose is printed as one line on stderr with exit code
2; ``-v`` adds the traceback and progress logs.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from ._version import __version__
from .errors import FxfuseError

log = logging.getLogger("fxfuse")
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class _UsageError(Exception):
    """A command line argparse cannot read; `main` prints it as one line."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (with the command's name) and
    exit code 2, instead of a usage block; ``-v`` works before or after the
    command."""

    def error(self, message: str):
        raise _UsageError(f"{message}; see '{self.prog} --help'")


def _at_least(low: int, below: int | None = None):
    """An argparse type: an integer of at least `low` (and under `below`)."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"'{text}' is not a whole number"
            ) from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, not {value}")
        return value

    return integer


def _finite(*, positive: bool):
    """An argparse type: a finite number, above 0 if `positive`, else at least 0."""

    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "above 0" if positive else "0 or more"
            raise argparse.ArgumentTypeError(
                f"must be a finite number {bound}, not {text}"
            )
        return value

    return number


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            # Point at the command's own help, where its flags are listed.
            command = getattr(args, "command_parser", parser)
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
    except _UsageError as error:
        print(f"fxfuse: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _configure_logging(args.verbose)
    if not getattr(args, "command", None):
        print(
            "fxfuse: error: give a command (inspect, fuse, train, evaluate or "
            "export); see 'fxfuse --help'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    try:
        return args.run(args) or 0
    except FxfuseError as error:
        return _failed(args, str(error), EXIT_BAD_INPUT)
    except BrokenPipeError:
        # The reader of our output went away (`fxfuse inspect ... | head`): not an
        # error. Point stdout at nothing so that Python's exit does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as error:
        # A path fxfuse cannot read or write: permissions, a read-only file system,
        # a file where a folder should be.
        where = f" '{error.filename}'" if error.filename else ""
        message = (
            f"cannot use{where}: {error.strerror or error}; check the path and that "
            "you may write there"
        )
        return _failed(args, message, EXIT_BAD_INPUT)
    except Exception as error:
        # Not an error fxfuse raises on purpose: still one line, with the way to
        # see where it came from.
        first = (str(error).strip().splitlines() or [""])[0][:300]
        hint = (
            "the traceback is above"
            if args.verbose
            else "run again with -v for the traceback"
        )
        message = f"{type(error).__name__}: {first} (unexpected; {hint})"
        return _failed(args, message, EXIT_INTERNAL)
    except KeyboardInterrupt:
        if args.command == "train":
            note = "the same command resumes from the last checkpoint"
        else:
            note = "no output was written or changed"
        print(f"fxfuse: interrupted; {note}", file=sys.stderr)
        return 130


def _plural(number: int, noun: str) -> str:
    """'1 task', '2 tasks'."""
    return f"{number} {noun}{'s' * (number != 1)}"


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """Report a failure as one line (after its traceback with -v) and return the
    exit code: -v shows more, and changes nothing else."""
    if args.verbose:
        traceback.print_exc()
    print(f"fxfuse: error: {message}", file=sys.stderr)
    return code


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
    parser = _Parser(
        prog="fxfuse",
        description="Fuse trained single-task PyTorch models into one multi-task model.",
    )
    parser.add_argument("--version", action="version", version=f"fxfuse {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="progress logs; tracebacks"
    )
    # The same flag is accepted after the command too.
    verbose = _Parser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="progress logs; tracebacks",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=_Parser
    )
    add_parser = functools.partial(commands.add_parser, parents=[verbose])

    def add_command(*args, **kwargs):
        command = add_parser(*args, **kwargs)
        command.set_defaults(command_parser=command)
        return command

    commands.add_parser = add_command
    _add_inspect(commands)
    _add_fuse(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_export(commands)
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
    command.add_argument(
        "--levels", type=_at_least(0), default=3, help="cuts in the split (3)"
    )
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
    command.add_argument(
        "--force", action="store_true", help="replace an existing --graph file"
    )
    command.set_defaults(run=_run_inspect)


def _run_inspect(args) -> int:
    from pathlib import Path

    from .errors import InputError
    from .load import load_model
    from .report import inspect

    if args.graph and Path(args.graph).exists() and not args.force:
        raise InputError(
            f"'{args.graph}' already exists; pass --force to replace it, or choose "
            "another file"
        )
    loaded = load_model(args.model, allow_pickle=args.allow_pickle)
    inputs = _example_inputs(args.example_inputs, loaded)
    modules = dict(loaded.model.named_modules())
    unknown = [leaf for leaf in args.leaf if leaf not in modules or not leaf]
    if unknown:
        raise InputError(
            f"--leaf {unknown[0]!r} is not a submodule of {loaded.name}; give a "
            "module path from the 'module path' column of fxfuse inspect"
        )
    cuts = None
    if args.cuts is not None:
        cuts = [c.strip() for c in args.cuts.split(",") if c.strip()]
        if not cuts:
            raise InputError(
                f"--cuts '{args.cuts}' names no cut; give module paths or node "
                "names, comma-separated"
            )
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
    command.add_argument(
        "--levels", type=_at_least(1), default=3, help="fusion levels (3)"
    )
    command.add_argument(
        "--cuts",
        action="append",
        default=[],
        metavar="MODEL=PATH[,PATH...]",
        help="cut a model at these module paths or nodes instead of choosing (MODEL "
        "as fxfuse fuse lists it, e.g. income_mlp8, or the model's file or spec)",
    )
    command.add_argument(
        "--input-map",
        action="append",
        default=[],
        metavar="MODEL:ITS_KEY=FUSED_KEY[,...]",
        help="a model reads dict input FUSED_KEY under its own key ITS_KEY (repeat "
        "per model; MODEL as fxfuse fuse lists it, e.g. income_mlp8)",
    )
    command.add_argument(
        "--width", type=_at_least(1), default=64, help="AKF token width (64)"
    )
    command.add_argument(
        "--heads",
        type=_at_least(1),
        default=4,
        help="AKF attention heads (4); the width must be a multiple of it",
    )
    command.add_argument(
        "--seed",
        type=_at_least(0, below=2**63),
        default=0,
        help="seed of the fusion modules' random start (0)",
    )
    command.add_argument("-o", "--output", required=True, help="artifact folder")
    command.add_argument(
        "--force", action="store_true", help="replace an existing artifact"
    )
    command.set_defaults(run=_run_fuse)


def _run_fuse(args) -> int:
    from pathlib import Path

    import torch

    from .artifact import check_target, save
    from .errors import InputError
    from .generate import fuse
    from .load import load_model

    check_target(Path(args.output), overwrite=args.force)  # before any work

    tasks: dict[str, dict] = {}
    given: list[tuple[str, str, str]] = []  # (task, key in tasks[task], spec)
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
            key = _unique_key(loaded.name, tasks[task])
            tasks[task][key] = loaded
            given.append((task, key, spec))
    by_key = _model_names(tasks, given)
    first = next(m for models in tasks.values() for m in models.values())
    inputs = _example_inputs(args.example_inputs, first)
    cuts = _fuse_cuts(args.cuts, by_key)
    input_map = _input_map(args.input_map, by_key)

    with (
        warnings.catch_warnings(record=True) as caught,
        torch.random.fork_rng(devices=[]),
    ):
        warnings.simplefilter("always")
        torch.manual_seed(args.seed)
        fused = fuse(
            {t: dict(m) for t, m in tasks.items()},
            inputs,
            levels=args.levels,
            cuts=cuts,
            width=args.width,
            heads=args.heads,
            input_map=input_map,
        )
    for note in _unique(str(w.message) for w in caught):
        print(f"fxfuse: warning: {note}", file=sys.stderr)
    save(fused, args.output, overwrite=args.force)
    print(format_fused(fused))
    print(f"\nwritten: {args.output}")
    return 0


def _fuse_cuts(entries: Sequence[str], by_key: dict[str, str]) -> dict:
    """``--cuts MODEL=PATH[,PATH...]`` entries as ``fuse``'s `cuts`."""
    from .errors import InputError

    cuts: dict[str, list[str]] = {}
    for entry in entries:
        key, _, paths = (part.strip() for part in entry.partition("="))
        chosen = [p.strip() for p in paths.split(",") if p.strip()]
        if not key or not chosen:
            raise InputError(
                f"--cuts '{entry}' is not MODEL=PATH[,PATH...]; for example "
                "--cuts income_mlp8=mlp.0,mlp.3"
            )
        if key not in by_key:
            raise InputError(
                f"--cuts names model '{key}', which no --task gives; the models are "
                f"{sorted(set(by_key.values()))}"
            )
        if by_key[key] in cuts:
            raise InputError(
                f"--cuts gives model '{by_key[key]}' twice; give all its cuts in one "
                "entry, comma-separated"
            )
        cuts[by_key[key]] = chosen
    return cuts


def _model_names(tasks: dict[str, dict], given: list[tuple[str, str, str]]) -> dict:
    """The name `fuse` gives each model (``income_mlp8``), by every way --cuts and
    --input-map may call it: that name, or else the spec, the file name, the file
    stem or ``TASK_STEM`` of the first model called so."""
    from pathlib import Path

    from .generate import member_names

    names = member_names(tasks)
    by_key = {name: name for name in names}
    for (task, key, spec), name in zip(given, names, strict=True):
        stem = tasks[task][key].name
        file_name = Path(spec).name if Path(spec).is_file() else spec
        for alias in (spec, file_name, stem, key, f"{task}_{key}"):
            by_key.setdefault(alias, name)
    return by_key


def _input_map(entries: Sequence[str], by_key: dict[str, str]) -> dict:
    """``--input-map MODEL:ITS_KEY=FUSED_KEY[,...]`` entries as ``fuse``'s
    `input_map`. MODEL may also be a model's spec or file name, as for --cuts;
    `fuse` checks the names and keys."""
    from .errors import InputError

    input_map: dict[str, dict[str, str]] = {}
    for entry in entries:
        model, _, pairs = entry.rpartition(":")
        renames = [pair.partition("=") for pair in pairs.split(",") if pair.strip()]
        complete = [
            own.strip() and sep and fused.strip() for own, sep, fused in renames
        ]
        if not model.strip() or not renames or not all(complete):
            raise InputError(
                f"--input-map '{entry}' is not MODEL:ITS_KEY=FUSED_KEY[,...]; for "
                "example --input-map income_mlp8:years=age"
            )
        model = by_key.get(model.strip(), model.strip())
        for own, _, fused in renames:
            keys = input_map.setdefault(model, {})
            if own.strip() in keys:
                raise InputError(
                    f"--input-map maps key '{own.strip()}' of model {model} twice; "
                    "map each of its keys once"
                )
            keys[own.strip()] = fused.strip()
    return input_map


def _data_options(command: argparse.ArgumentParser) -> None:
    from .data import LOADERS

    command.add_argument(
        "--data", required=True, choices=sorted(LOADERS), help="the data set"
    )
    command.add_argument(
        "--data-root",
        metavar="FOLDER",
        help="folder with the data files (multifashion defaults to Debian's "
        "dataset-fashion-mnist)",
    )
    command.add_argument(
        "--subset",
        type=_at_least(1),
        metavar="N",
        help="use N training rows and N/4 validation and test rows (quick runs)",
    )
    command.add_argument(
        "--task-kind",
        action="append",
        default=[],
        metavar="TASK=KIND",
        help="binary, multiclass or regression; by default read from the task's "
        "head (several outputs: multiclass; a sigmoid: binary) and labels",
    )


def _dataset(args):
    from .data import load_dataset

    data = load_dataset(args.data, args.data_root)
    if args.subset:
        data = data.subset(args.subset, max(args.subset // 4, 64), seed=0)
    return data


def _fused_tasks(fused, data, overrides: Sequence[str] = ()) -> dict[str, str]:
    """Each task's kind: read from the fused model's heads and the labels, unless
    ``--task-kind TASK=KIND`` says otherwise."""
    from .errors import InputError
    from .metrics import KINDS
    from .train import check_kinds, infer_kinds

    tasks = fused.fusion_info.tasks
    missing = [t for t in tasks if t not in data.tasks]
    if missing:
        raise InputError(
            f"the fused model's tasks {missing} are not tasks of --data (which has "
            f"{sorted(data.tasks)}); fuse with task names of the data set"
        )
    given = {}
    for item in overrides:
        task, _, kind = item.partition("=")
        if task not in tasks or kind not in KINDS:
            raise InputError(
                f"--task-kind '{item}' is not TASK=KIND with a task of the model "
                f"({', '.join(tasks)}) and a kind of {', '.join(KINDS)}"
            )
        given[task] = kind
    inferred = infer_kinds(fused, [t for t in tasks if t not in given], data.val)
    kinds = {t: given.get(t) or inferred[t] for t in tasks}
    check_kinds(fused, data.val, kinds)
    return kinds


def _add_train(commands) -> None:
    command = commands.add_parser(
        "train",
        help="train the fusion modules of an artifact",
        description="Train AKF modules and head mixers (members stay frozen). "
        "Running the same command again resumes from the last checkpoint.",
    )
    command.add_argument("artifact", help="folder written by fxfuse fuse")
    _data_options(command)
    command.add_argument("--epochs", type=_at_least(1), default=10)
    command.add_argument("--batch-size", type=_at_least(1), default=1024)
    command.add_argument("--lr", type=_finite(positive=True), default=1e-3)
    command.add_argument(
        "--patience",
        type=_at_least(1),
        default=3,
        help="stop after this many epochs without a better validation score (3)",
    )
    command.add_argument("--seed", type=_at_least(0, below=2**63), default=0)
    command.add_argument(
        "--max-steps", type=_at_least(1), help="at most this many steps per epoch"
    )
    command.add_argument(
        "--unfreeze",
        choices=["heads", "all"],
        help="also train each model's last stage that holds weights (its head), or "
        "every stage",
    )
    command.add_argument(
        "--head-start",
        choices=["fit", "scores", "uniform"],
        default="fit",
        help="start each task's head mixing from the weights that minimise its loss "
        "on validation rows (fit), from its models' validation scores (scores), or "
        "equal (uniform)",
    )
    command.add_argument(
        "--restart", action="store_true", help="discard checkpoints and start anew"
    )
    command.add_argument("--no-progress", action="store_true", help="no progress bar")
    command.set_defaults(run=_run_train)


def _run_train(args) -> int:
    from pathlib import Path

    from .artifact import load, save_weights
    from .generate import unfreeze
    from .heads import weigh_heads
    from .train import TrainConfig, fit

    fused = load(args.artifact)
    data = _dataset(args)
    tasks = _fused_tasks(fused, data, args.task_kind)
    if args.unfreeze:
        unfreeze(fused, args.unfreeze)
    folder = Path(args.artifact) / "train"
    finished = (folder / "done.json").exists() and not args.restart
    resuming = (folder / "last.pt").exists() and not args.restart
    if args.head_start != "uniform" and not resuming:
        weights = weigh_heads(fused, data.val, tasks, method=args.head_start)
        for task, by_model in weights.items():
            shown = ", ".join(f"{n} {w:.2f}" for n, w in by_model.items())
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"head mixing of {task} starts at: {shown}")
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        seed=args.seed,
        max_steps=args.max_steps,
        progress=not args.no_progress,
    )
    result = fit(
        fused,
        data.train,
        data.val,
        tasks,
        config,
        checkpoint_dir=folder,
        metrics_path=folder / "metrics.jsonl",
        restart=args.restart,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 alone writes the artifact
    if finished:
        print(
            f"training in {folder} had already finished; nothing was trained (run "
            "with --restart to train anew)"
        )
    elif resuming:
        print(f"resumed the interrupted training in {folder}")
    record = {
        "data": args.data,
        "best_epoch": result.best_epoch,
        "val": result.best_metrics,
        "epochs_run": len(result.history),
        "seconds": round(result.seconds, 1),
    }
    save_weights(fused, args.artifact, record)
    print(json.dumps({"best_epoch": result.best_epoch, "val": result.best_metrics}))
    if finished:
        print(
            f"the weights of epoch {result.best_epoch} of that run are in {args.artifact}"
        )
    elif result.best_epoch == 0:
        print(
            "no epoch improved on the starting weights, so those are saved into "
            f"{args.artifact}"
        )
    else:
        print(f"weights of epoch {result.best_epoch} saved into {args.artifact}")
    return 0


def _add_evaluate(commands) -> None:
    command = commands.add_parser(
        "evaluate",
        help="score a fused model and each of its models alone",
        description="Per-task metrics (AUC, accuracy or RMSE) of the fused model, "
        "the plain average of its models, and each model alone.",
    )
    command.add_argument("artifact", help="folder written by fxfuse fuse")
    _data_options(command)
    command.add_argument(
        "--split", choices=["val", "test"], default="test", help="rows to score"
    )
    command.add_argument("--json", action="store_true", help="machine-readable output")
    command.set_defaults(run=_run_evaluate)


def evaluation_rows(fused, split, tasks) -> list[tuple[str, dict[str, float]]]:
    """(name, {task: metric}) for the fused model, the average and each model."""
    from .generate import Average, members_alone
    from .train import evaluate

    kinds = {t: fused.fusion_info.output_kind(t) for t in tasks}
    rows = [("fused", evaluate(fused, split, tasks, kinds))]
    rows.append(
        ("average of its models", evaluate(Average(fused), split, tasks, kinds))
    )
    for name, member in members_alone(fused).items():
        own = {member.task: tasks[member.task]}
        rows.append((name, evaluate(member, split, own, kinds)))
    return rows


def _run_evaluate(args) -> int:
    from .artifact import load
    from .metrics import metric_name

    fused = load(args.artifact)
    data = _dataset(args)
    tasks = _fused_tasks(fused, data, args.task_kind)
    split = data.val if args.split == "val" else data.test
    rows = evaluation_rows(fused, split, tasks)
    if args.json:
        print(json.dumps({name: metrics for name, metrics in rows}, indent=2))
        return 0
    header = ("model", *[f"{t} {metric_name(k)}" for t, k in tasks.items()])
    table = [
        (name, *[f"{m[t]:.4f}" if t in m else "" for t in tasks]) for name, m in rows
    ]
    print(f"{args.split} rows: {len(split)}")
    print("\n".join(_table([header, *table])))
    return 0


def _add_export(commands) -> None:
    command = commands.add_parser(
        "export",
        help="export a fused model to ONNX or torch.export",
        description="Export to ONNX (.onnx) or a torch.export archive (.pt2), then "
        "check the result against PyTorch at two new batch sizes.",
    )
    command.add_argument("artifact", help="folder written by fxfuse fuse")
    command.add_argument(
        "-o", "--output", required=True, help="fused.onnx or fused.pt2"
    )
    command.add_argument(
        "--tolerance",
        type=_finite(positive=False),
        default=1e-4,
        help="largest absolute difference allowed (1e-4)",
    )
    command.add_argument(
        "--force", action="store_true", help="replace an existing output file"
    )
    command.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from .artifact import load
    from .errors import ExportError, InputError
    from .export import export

    output = Path(args.output)
    if output.is_dir():
        raise InputError(f"'{output}' is a folder; give a file such as fused.onnx")
    for path in (output, output.with_name(output.name + ".json")):
        if path.exists() and not args.force:
            raise InputError(
                f"'{path}' already exists; pass --force to replace it, or choose "
                "another file"
            )
    fused = load(args.artifact)
    try:
        report = export(fused, None, args.output, tolerance=args.tolerance)
    except ExportError as error:
        report = getattr(error, "report", None)
        if report is not None:
            print(report.summary())
        raise
    print(report.summary())
    return 0


def format_fused(fused) -> str:
    """A summary of a fused model: tasks, models, cuts and sizes."""
    info = fused.fusion_info
    trainable = sum(p.numel() for p in fused.parameters() if p.requires_grad)
    total = sum(p.numel() for p in fused.parameters())
    lines = [
        f"fused model: {_plural(len(info.tasks), 'task')}, "
        f"{_plural(len(info.models), 'model')}, {_plural(info.levels, 'level')}, "
        f"AKF width {info.width}",
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
    header = ("", "idx", "node", "module path", "closes", "rank", "shape")
    header += ("FLOPs %", "params")
    rows = [
        (
            "*" if c.node in chosen else "",
            str(c.index),
            c.node,
            c.module_path or "<root>",
            c.closes or "-",
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
