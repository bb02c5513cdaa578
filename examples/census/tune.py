"""Tuning runs for the Census-Income fused models (see bench/census_tuning.md).

Members are trained once per seed, exactly as `tools/bench_census.py` trains them, and
cached; each tuning run then fuses a seed's cached members with one setting, trains
the fusion and appends one JSON line per seed to the log: validation and test AUC of
the fused model and of the plain average of the same members.

    python examples/census/tune.py members --seeds 0 1 2
    python examples/census/tune.py fuse --name w32 --members mlp8 mlp16 --width 32
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import multiprocessing
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fxfuse.files import write_atomically  # noqa: E402
from tools import bench_census as bench  # noqa: E402

# Trained members and the log of tuning runs stay beside the other runs (not in git).
RUNS = ROOT / "runs" / "census-tuning"
CACHE = RUNS / "members"
LOG = RUNS / "tuning.jsonl"


def _members_job(seed: int, kind: str, task: str, budget: bench.Budget) -> dict:
    return bench.train_member(kind, task, seed, budget)


def train_members(args) -> None:
    budget = bench.Budget()
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(
        args.jobs,
        mp_context=context,
        initializer=bench._init_worker,
        initargs=(args.data_root, False, 1),
    ) as pool:
        jobs = {
            pool.submit(_members_job, seed, kind, task, budget): (seed, kind, task)
            for seed in args.seeds
            for kind in args.kinds
            for task in bench.TASKS
        }
        for job in futures.as_completed(jobs):
            seed, kind, task = jobs[job]
            result = job.result()
            write_atomically(
                CACHE / f"{seed}-{kind}-{task}.pt", partial(torch.save, result)
            )
            print(
                seed,
                kind,
                task,
                result["test"],
                result["best_epoch"],
                f"{result['seconds']:.0f}s",
                flush=True,
            )


def _fuse_job(name: str, fusion: bench.Fusion, seed: int, epochs: int) -> dict:
    states = {}
    for kind in fusion.members:
        for task in bench.TASKS:
            states[(kind, task)] = torch.load(
                CACHE / f"{seed}-{kind}-{task}.pt", weights_only=True
            )["state"]
    started = time.perf_counter()
    result = bench.train_fused(name, fusion, seed, states, bench.Budget(epochs=epochs))
    result.pop("state")
    result["wall"] = time.perf_counter() - started
    return result


def fuse(args) -> None:
    cuts = {}
    for item in args.cuts or []:
        kind, _, names = item.partition("=")
        cuts[kind] = names.split(",") if names else []
    fusion = bench.Fusion(
        members=tuple(args.members),
        levels=args.levels,
        cuts=cuts,
        width=args.width,
        heads=args.heads,
        lr=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        task_weights=json.loads(args.task_weights) if args.task_weights else None,
        unfreeze=args.unfreeze,
        head_start=args.head_start,
    )
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(
        args.jobs,
        mp_context=context,
        initializer=bench._init_worker,
        initargs=(args.data_root, False, 1),
    ) as pool:
        jobs = [
            pool.submit(_fuse_job, args.name, fusion, s, args.epochs)
            for s in args.seeds
        ]
        for job in futures.as_completed(jobs):
            r = job.result()
            line = {
                "name": args.name,
                "seed": r["seed"],
                "fusion": r["fusion"],
                "epochs_budget": args.epochs,
                "val": r["val"],
                "test": r["test"],
                "average_val": r["average_val"],
                "average_test": r["average_test"],
                "plain_average_test": r["plain_average_test"],
                "average_finetune_seconds": r["average_finetune_seconds"],
                "diff_test": {
                    t: r["test"][t] - r["average_test"][t] for t in bench.TASKS
                },
                "diff_val": {t: r["val"][t] - r["average_val"][t] for t in bench.TASKS},
                "best_epoch": r["best_epoch"],
                "history": r["history"],
                "seconds": r["seconds"],
                "trainable": r["trainable"],
            }
            line["diff_test"]["mean"] = sum(line["diff_test"].values()) / 2
            line["diff_val"]["mean"] = sum(line["diff_val"].values()) / 2
            with LOG.open("a") as file:
                file.write(json.dumps(line) + "\n")
            d, v = line["diff_test"], line["diff_val"]
            print(
                f"{args.name} seed {r['seed']}: test {r['test']['income']:.4f}/"
                f"{r['test']['never_married']:.4f} diff test {d['income']:+.4f}/"
                f"{d['never_married']:+.4f} mean {d['mean']:+.4f} | val diff "
                f"{v['income']:+.4f}/{v['never_married']:+.4f} | best epoch "
                f"{r['best_epoch']} {r['seconds']:.0f}s",
                flush=True,
            )


def report(args) -> None:
    """A markdown table of every logged run: paired test (and validation) differences
    from the plain average, per seed, and their mean."""
    runs: dict[str, list[dict]] = {}
    for line in LOG.read_text().splitlines():
        r = json.loads(line)
        runs.setdefault(r["name"], []).append(r)
    print(
        "| setting | members | seeds | test Δ income per seed | test Δ mean per seed "
        "| mean test Δ income / mean | val Δ income per seed | best epochs | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        members = "hetero" if "dcn" in rs[0]["fusion"]["members"] else "4 MLPs"
        di = [r["diff_test"]["income"] for r in rs]
        dm = [r["diff_test"]["mean"] for r in rs]
        vi = [r["diff_val"]["income"] for r in rs]
        print(
            f"| {name} | {members} | {','.join(str(r['seed']) for r in rs)} "
            f"| {' '.join(f'{x:+.4f}' for x in di)} | {' '.join(f'{x:+.4f}' for x in dm)} "
            f"| {sum(di) / len(di):+.4f} / {sum(dm) / len(dm):+.4f} "
            f"| {' '.join(f'{x:+.4f}' for x in vi)} "
            f"| {','.join(str(r['best_epoch']) for r in rs)} "
            f"| {sum(r['seconds'] for r in rs) / len(rs):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(bench.DEFAULT_DATA))
    parser.add_argument("--jobs", type=int, default=2)
    sub = parser.add_subparsers(dest="command", required=True)
    members = sub.add_parser("members")
    members.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    members.add_argument("--kinds", nargs="+", default=list(bench.MEMBERS))
    run = sub.add_parser("fuse")
    run.add_argument("--name", required=True)
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--members", nargs="+", default=["mlp8", "mlp16"])
    run.add_argument("--levels", type=int, default=3)
    run.add_argument("--cuts", nargs="*", help="kind=node,node (or kind=<last>)")
    run.add_argument("--width", type=int, default=64)
    run.add_argument("--heads", type=int, default=4)
    run.add_argument("--lr", type=float, default=1e-3)
    run.add_argument("--schedule", default="constant")
    run.add_argument("--weight-decay", type=float, default=0.01)
    run.add_argument("--task-weights")
    run.add_argument("--unfreeze")
    run.add_argument(
        "--head-start", choices=("fit", "scores", "uniform"), default="fit"
    )
    run.add_argument("--epochs", type=int, default=10)
    sub.add_parser("report")
    args = parser.parse_args()
    {"members": train_members, "fuse": fuse, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
