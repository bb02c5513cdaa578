"""MultiFashion, end to end: train single-task models, fuse them with fxfuse, compare.

The main job (``bash tools/run.sh main``) does what a user of fxfuse would do:

1. Build MultiFashion from Debian's Fashion-MNIST files (`fxfuse.data.multifashion`).
2. Train four single-task models of three families with `fxfuse.train.fit`:
   SmallResNet and SmallViT for task ``left``, SmallResNet and SmallMobileNet for
   task ``right``. Save each as a ``.pt2`` archive with a dynamic batch, one folder
   per task (``left/resnet.pt2``, ...).
3. Train the classic multi-task baseline with the same budget (the same epochs as
   each single-task model): one SmallResNet trunk shared by a ``left`` and a
   ``right`` head.
4. Run the command line on the archives: ``fxfuse inspect`` (report and graph),
   ``fxfuse fuse``, ``fxfuse train``, ``fxfuse evaluate`` and ``fxfuse export``
   (ONNX, with an ONNX Runtime parity check).
5. Print one table of test accuracies per task: each single-task model, the uniform
   average of a task's models, the shared trunk and the fused model, and whether the
   fused model reaches both its best model and the shared trunk on each task; write
   it with the wall time of every step to ``results.json``.

``--quick`` runs the same flow on a few hundred images in about a minute. Everything
is seeded, so a run gives the same numbers on the same machine.

Example::

    python examples/main.py --out runs/multifashion
    python examples/main.py --quick --out /tmp/mf
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from examples.multifashion.models import SmallMobileNet, SmallResNet, SmallViT
from examples.multifashion.training import SharedTrunk, TaskModel, export_archive
from fxfuse.cli import main as fxfuse_main
from fxfuse.data import Dataset, Split, multifashion
from fxfuse.files import write_text
from fxfuse.train import TrainConfig, evaluate, fit

SEED = 0
TASKS = {"left": "multiclass", "right": "multiclass"}


@dataclass(frozen=True)
class Member:
    """One single-task model of the demo.

    Attributes:
        name: File stem of its archive, e.g. ``"resnet"`` for ``resnet.pt2``.
        task: The task it is trained for.
        build: Its class; called with ``num_classes=10``.
        lr: Peak AdamW learning rate (with a cosine schedule).
        channels_last: Train it in ``torch.channels_last`` (convolutional models).
    """

    name: str
    task: str
    build: type
    lr: float
    channels_last: bool

    @property
    def label(self) -> str:
        """Its row in the final table, e.g. ``"resnet (left)"``."""
        return f"{self.name} ({self.task})"

    def archive(self, out: Path) -> Path:
        """Where its ``.pt2`` archive goes: one folder per task."""
        return out / self.task / f"{self.name}.pt2"


# Each task has a model of the strongest family (the residual CNN) and one of
# another family: fusion mixes models that err differently. The ViT is much weaker
# at this budget; the head mixing gives it almost no say.
MEMBERS = (
    Member("resnet", "left", SmallResNet, lr=2e-3, channels_last=True),
    Member("vit", "left", SmallViT, lr=1e-3, channels_last=False),
    Member("resnet", "right", SmallResNet, lr=2e-3, channels_last=True),
    Member("mobilenet", "right", SmallMobileNet, lr=1e-2, channels_last=True),
)
# The shared trunk's learning rate: the ResNets' own.
SHARED_TRUNK_LR = 2e-3


@dataclass(frozen=True)
class Budget:
    """How much data and training each step gets.

    Attributes:
        train_rows: Training images for the single-task models and the shared
            trunk, drawn with a fixed seed from the 50,000 (None: all of them).
        eval_rows: Validation and test images (None: all 10,000 of each).
        epochs: Epochs of every single-task model and of the shared trunk.
        batch_size: Their batch size (each has its own learning rate, with a
            cosine schedule).
        fuse_epochs: ``fxfuse train --epochs``.
        fuse_steps: ``fxfuse train --max-steps`` (steps per epoch).
        fuse_batch_size: ``fxfuse train --batch-size``.
        fuse_lr: ``fxfuse train --lr``.
        fuse_width: ``fxfuse fuse --width`` (AKF token width).
        fuse_levels: ``fxfuse fuse --levels``.
        cli_subset: ``--subset`` for ``fxfuse train`` and ``evaluate`` (None: the
            whole data set). The quick run uses the same rows as `train_rows`.
    """

    train_rows: int | None
    eval_rows: int | None
    epochs: int
    batch_size: int
    fuse_epochs: int
    fuse_steps: int | None
    fuse_batch_size: int
    fuse_lr: float
    fuse_width: int = 64
    fuse_levels: int = 3
    cli_subset: int | None = None


FULL = Budget(
    train_rows=None,
    eval_rows=None,
    epochs=2,
    batch_size=256,
    fuse_epochs=1,
    fuse_steps=50,
    fuse_batch_size=256,
    fuse_lr=1e-3,
)

QUICK_ROWS = 400
QUICK = Budget(
    train_rows=QUICK_ROWS,
    eval_rows=max(QUICK_ROWS // 4, 64),
    epochs=1,
    batch_size=64,
    fuse_epochs=1,
    fuse_steps=3,
    fuse_batch_size=64,
    fuse_lr=1e-3,
    cli_subset=QUICK_ROWS,
)


@dataclass
class Timings:
    """Wall and CPU time of each step of the run, in seconds, in the order they ran.

    CPU time (all threads of this process) tells how much work a step was even on
    a machine shared with other jobs, where wall time says little.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 1)
            self.cpu_seconds[name] = round(time.process_time() - cpu_started, 1)
            print(
                f"== {name}: {self.seconds[name]:.1f} s "
                f"(CPU {self.cpu_seconds[name]:.1f} s)",
                flush=True,
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 on success, the failing command's exit code else."""
    args = _parser().parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    timings = Timings()
    started, cpu_started = time.perf_counter(), time.process_time()

    with timings.step("build MultiFashion"):
        data = _demo_data(args.data, budget)
        print(
            f"train {len(data.train)}, validation {len(data.val)}, "
            f"test {len(data.test)} images"
        )

    batch = data.test.take(slice(0, 8)).inputs
    scores: dict[str, dict[str, float]] = {}
    for member in MEMBERS:
        with timings.step(f"train {member.label}"):
            model = _train_member(member, data, budget)
            export_archive(model, batch, member.archive(out))
            scores[member.label] = evaluate(
                TaskModel(model, member.task), data.test, {member.task: "multiclass"}
            )

    with timings.step("train shared trunk (left, right)"):
        shared = _train_shared(data, budget)
        export_archive(shared, batch, out / "shared_trunk.pt2")
        scores["shared trunk"] = evaluate(shared, data.test, TASKS)

    fused = out / "fused"
    data_options = _data_options(args.data, budget)
    commands = {
        "fxfuse inspect": [
            "inspect",
            str(MEMBERS[0].archive(out)),
            "--graph",
            str(out / "resnet.svg"),
            "--force",
        ],
        "fxfuse fuse": [
            "fuse",
            *_task_options(out),
            "--levels",
            str(budget.fuse_levels),
            "--width",
            str(budget.fuse_width),
            "-o",
            str(fused),
            "--force",
        ],
        "fxfuse train": [
            "train",
            str(fused),
            *data_options,
            "--epochs",
            str(budget.fuse_epochs),
            "--batch-size",
            str(budget.fuse_batch_size),
            "--lr",
            str(budget.fuse_lr),
            "--seed",
            str(SEED),
            *(["--max-steps", str(budget.fuse_steps)] if budget.fuse_steps else []),
        ],
    }
    for name, command in commands.items():
        with timings.step(name):
            code = _fxfuse(command)
        if code:
            return code

    with timings.step("fxfuse evaluate"):
        code, text = _fxfuse_output(["evaluate", str(fused), *data_options, "--json"])
        if code:
            return code
        rows = json.loads(text)
        _write_json(out / "evaluation.json", rows)
        scores["fused"] = rows["fused"]
        scores["average"] = rows["average of its models"]

    with timings.step("fxfuse export"):
        code = _fxfuse(["export", str(fused), "-o", str(out / "fused.onnx"), "--force"])
        if code:
            return code

    timings.seconds["total"] = round(time.perf_counter() - started, 1)
    timings.cpu_seconds["total"] = round(time.process_time() - cpu_started, 1)
    results = _results(scores, budget, timings, data, args.quick)
    _write_json(out / "results.json", results)
    if args.bench:
        _write_json(Path(args.bench), results)
    print()
    print(format_table(results))
    print(f"\nfiles in {out}/:")
    for line in _file_listing(out, args.bench):
        print(f"  {line}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="examples/main.py",
        description="MultiFashion: train single-task models, fuse them with fxfuse, "
        "and compare with a shared-trunk multi-task model.",
    )
    parser.add_argument(
        "--out", default="runs/multifashion", help="output folder (runs/multifashion)"
    )
    parser.add_argument(
        "--data",
        metavar="FOLDER",
        help="folder with the Fashion-MNIST files (default: Debian's "
        "dataset-fashion-mnist)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_ROWS} training images, one short epoch: checks the flow",
    )
    parser.add_argument(
        "--bench", metavar="FILE", help="also write the results JSON to FILE"
    )
    return parser


# Data


def _demo_data(root: str | None, budget: Budget) -> Dataset:
    """MultiFashion, cut to the budget's rows with the same draw as ``--subset``."""
    data = multifashion(root, seed=SEED)
    if budget.cli_subset:
        # The command line's --subset draws these very rows, so fxfuse trains and
        # scores on the images the models were trained and scored on.
        return data.subset(budget.cli_subset, budget.eval_rows, seed=SEED)
    if budget.train_rows is not None:
        data.train = _first_of_permutation(data.train, budget.train_rows)
    if budget.eval_rows is not None:
        data.val = _first_of_permutation(data.val, budget.eval_rows)
        data.test = _first_of_permutation(data.test, budget.eval_rows)
    return data


def _first_of_permutation(split: Split, rows: int) -> Split:
    generator = torch.Generator().manual_seed(SEED)
    return split.take(torch.randperm(len(split), generator=generator)[:rows])


def _data_options(root: str | None, budget: Budget) -> list[str]:
    options = ["--data", "multifashion"]
    if root:
        options += ["--data-root", root]
    if budget.cli_subset:
        options += ["--subset", str(budget.cli_subset)]
    return options


# Training before fxfuse


def _train_config(budget: Budget, lr: float) -> TrainConfig:
    return TrainConfig(
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        lr=lr,
        schedule="cosine",
        seed=SEED,
        patience=budget.epochs,
    )


def _train_member(member: Member, data: Dataset, budget: Budget) -> torch.nn.Module:
    """Train one single-task model; return the plain model (``x -> logits``)."""
    torch.manual_seed(SEED)
    wrapped = TaskModel(member.build(num_classes=10), member.task, member.channels_last)
    result = fit(
        wrapped,
        data.train,
        data.val,
        {member.task: "multiclass"},
        _train_config(budget, member.lr),
    )
    print(f"{member.label}: validation {_shown(result.best_metrics)}")
    return wrapped.model


def _train_shared(data: Dataset, budget: Budget) -> SharedTrunk:
    torch.manual_seed(SEED)
    model = SharedTrunk(tuple(TASKS), channels_last=True)
    result = fit(
        model, data.train, data.val, TASKS, _train_config(budget, SHARED_TRUNK_LR)
    )
    print(f"shared trunk: validation {_shown(result.best_metrics)}")
    return model


def _shown(metrics: dict[str, float]) -> str:
    return ", ".join(f"{task} {value:.4f}" for task, value in metrics.items())


# The command line


def _task_options(out: Path) -> list[str]:
    options = []
    for task in TASKS:
        archives = [str(m.archive(out)) for m in MEMBERS if m.task == task]
        options += ["--task", f"{task}={','.join(archives)}"]
    return options


def _fxfuse(argv: list[str]) -> int:
    print("$ fxfuse " + " ".join(argv), flush=True)
    code = fxfuse_main(argv)
    sys.stdout.flush()
    return code


def _fxfuse_output(argv: list[str]) -> tuple[int, str]:
    print("$ fxfuse " + " ".join(argv), flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = fxfuse_main(argv)
    return code, buffer.getvalue()


# Results


def _results(
    scores: dict[str, dict[str, float]],
    budget: Budget,
    timings: Timings,
    data: Dataset,
    quick: bool,
) -> dict:
    """Everything the table shows, plus the budget, data sizes and timings."""
    rows = [{"model": m.label, "kind": "single", **scores[m.label]} for m in MEMBERS]
    rows.append({"model": "uniform average", "kind": "average", **scores["average"]})
    rows.append({"model": "shared trunk", "kind": "shared", **scores["shared trunk"]})
    rows.append({"model": "fused (fxfuse)", "kind": "fused", **scores["fused"]})
    return {
        "dataset": "multifashion",
        "metric": "test accuracy",
        "quick": quick,
        "images": {
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
        },
        "budget": asdict(budget),
        "rows": rows,
        "goal": _goal(scores),
        "seconds": timings.seconds,
        "cpu_seconds": timings.cpu_seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }


def _goal(scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per task: is the fused model at least as good as its best model and as the
    shared trunk?"""
    goal = {}
    for task in TASKS:
        best = max(scores[m.label][task] for m in MEMBERS if m.task == task)
        fused = scores["fused"][task]
        shared = scores["shared trunk"][task]
        goal[task] = {
            "fused_minus_best_model": round(fused - best, 4),
            "fused_minus_shared_trunk": round(fused - shared, 4),
            "reached": fused >= best and fused >= shared,
        }
    return goal


def format_table(results: dict) -> str:
    """The final table: one row per model, one column per task."""
    tasks = list(TASKS)
    header = ("model", *tasks)
    lines = [
        (row["model"], *[f"{row[t]:.4f}" if t in row else "-" for t in tasks])
        for row in results["rows"]
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = [
        f"MultiFashion {results['metric']} ({results['images']['test']} images)",
        *(
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in [header, *lines]
        ),
    ]
    for task, verdict in results["goal"].items():
        text.append(
            f"{task}: fused {verdict['fused_minus_best_model']:+.4f} vs its best "
            f"model, {verdict['fused_minus_shared_trunk']:+.4f} vs the shared trunk"
            f" -> goal {'reached' if verdict['reached'] else 'NOT reached'}"
        )
    return "\n".join(text)


def _file_listing(out: Path, bench: str | None) -> list[str]:
    described = {
        "left/, right/": "single-task models per task, .pt2 (dynamic batch)",
        "shared_trunk.pt2": "shared-trunk baseline",
        "resnet.svg": "graph of left/resnet.pt2 from fxfuse inspect",
        "fused/": "fused artifact (manifest.json, stages, fusion weights, train/)",
        "evaluation.json": "fxfuse evaluate --json",
        "fused.onnx, fused.onnx.json": "ONNX export and its parity report",
        "results.json": "the table, budget and wall times",
    }
    lines = [f"{name:36s} {what}" for name, what in described.items()]
    if bench:
        lines.append(f"{bench} (copy of results.json)")
    return lines


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
