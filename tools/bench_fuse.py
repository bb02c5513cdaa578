"""Benchmark fusion: time to fuse, and what the fusion modules cost at inference.

For four resnet50s (two tasks of two models) and four census MLPs (the paper's
single-task models) it measures:

- the time `fxfuse.fuse` takes (trace, analyse, split and generate, all models);
- the fused model's forward latency divided by the summed latency of its models run
  one after the other at the same batch (target: at most 1.15);
- the share of parameters and FLOPs that AKF modules and head mixers add (target:
  FLOPs at most 10%).

Each row says whether it meets both targets. The census MLPs are smaller than one
AKF layer of the default width (64), so they are also measured with width 8 (three
levels and one) and width 4 (one level): the targets are about large members, and
the table shows what fusion costs small ones.

Writes ``bench/fuse.json`` and prints a table. Run from the repository root:

    .venv/bin/python tools/bench_fuse.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fxfuse  # noqa: E402
from examples.census.models import TabularMLP  # noqa: E402
from fxfuse.files import write_text  # noqa: E402

CENSUS = ROOT.parent / "shared" / "data" / "census-income-kdd"


def _alternating_medians(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of two calls timed in turn, so that a change in the machine's
    load during the run affects both alike."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


TARGETS = {"latency_ratio_max": 1.15, "akf_flops_share_max": 0.10}


def measure(
    name: str,
    tasks: dict,
    inputs: tuple,
    batch_inputs: tuple,
    repeats: int,
    width: int = 64,
    levels: int = 3,
):
    """Fuse `tasks` and compare the fused model with its models run one by one."""
    members = [m for models in tasks.values() for m in models]
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fxfuse.fuse(
            tasks, inputs, levels=levels, width=width, heads=min(4, width)
        )
    fuse_seconds = time.perf_counter() - start

    def fused_call():
        with torch.no_grad():
            fused(*batch_inputs)

    def members_call():
        with torch.no_grad():
            for model in members:
                model(*batch_inputs)

    fused_flops, member_flops = _flops(fused_call), _flops(members_call)
    fused_s, members_s = _alternating_medians(fused_call, members_call, repeats)
    fusion_params = sum(
        p.numel()
        for n, p in fused.named_parameters()
        if n.startswith(("fusion", "mix_"))
    )
    member_params = sum(p.numel() for m in members for p in m.parameters())
    ratio = fused_s / members_s
    flops_share = (fused_flops - member_flops) / member_flops
    return {
        "name": name,
        "akf_width": width,
        "levels": levels,
        "models": len(members),
        "batch": _batch(batch_inputs),
        "fuse_seconds": round(fuse_seconds, 3),
        "fused_ms": round(1000 * fused_s, 3),
        "members_ms": round(1000 * members_s, 3),
        "latency_ratio": round(ratio, 4),
        "akf_flops_share": round(flops_share, 5),
        "akf_params": fusion_params,
        "akf_params_share": round(fusion_params / member_params, 5),
        "targets_met": ratio <= TARGETS["latency_ratio_max"]
        and flops_share <= TARGETS["akf_flops_share_max"],
    }


def _batch(inputs: tuple) -> int:
    leaves = torch.utils._pytree.tree_leaves(inputs)
    return next(t.shape[0] for t in leaves if isinstance(t, torch.Tensor))


def resnet_case(quick: bool, repeats: int) -> dict:
    size, batch = (64, 8) if quick else (224, 16)
    torch.manual_seed(0)
    models = [torchvision.models.resnet50(num_classes=10).eval() for _ in range(4)]
    tasks = {"task_a": models[:2], "task_b": models[2:]}
    example = (torch.randn(2, 3, size, size),)
    batch_inputs = (torch.randn(batch, 3, size, size),)
    return measure("4 x resnet50", tasks, example, batch_inputs, repeats)


def census_case(quick: bool, repeats: int) -> dict:
    if CENSUS.is_dir() and not quick:
        data = fxfuse.data.census_income(CENSUS)
        sparse, dense = data.sparse, data.dense
        rows = data.test.take(torch.arange(1024)).inputs
    else:
        sparse = {f"s{i}": 20 for i in range(30)}
        dense = [f"d{i}" for i in range(7)]
        rows = {k: torch.randint(0, 20, (1024,)) for k in sparse}
        rows.update({k: torch.rand(1024) for k in dense})
    torch.manual_seed(0)
    models = [
        TabularMLP(sparse, dense, blocks).eval() for blocks in [(8, 8), (16, 8)] * 2
    ]
    tasks = {"income": models[:2], "never_married": models[2:]}
    example = ({k: v[:8] for k, v in rows.items()},)
    return [
        measure("4 x census MLP", tasks, example, (rows,), repeats, width, levels)
        for width, levels in ((64, 3), (8, 3), (8, 1), (4, 1))
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, few runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "fuse.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    repeats = 3 if args.quick else 10

    load_before = os.getloadavg()[0]
    rows = [resnet_case(args.quick, repeats), *census_case(args.quick, repeats)]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_before_and_after": [load_before, os.getloadavg()[0]],
        },
        "targets": TARGETS,
        "rows": rows,
    }
    out = write_text(Path(args.out), json.dumps(result, indent=2) + "\n")

    print(
        f"{'case':16} {'batch':>5} {'fuse s':>7} {'fused ms':>9} {'sum ms':>8} "
        f"{'ratio':>6} {'AKF FLOPs':>9} {'AKF params':>10} {'width':>5} "
        f"{'levels':>6} targets"
    )
    for r in rows:
        print(
            f"{r['name']:16} {r['batch']:>5} {r['fuse_seconds']:>7.2f} "
            f"{r['fused_ms']:>9.1f} {r['members_ms']:>8.1f} {r['latency_ratio']:>6.3f} "
            f"{100 * r['akf_flops_share']:>8.2f}% {r['akf_params']:>10,} "
            f"{r['akf_width']:>5} {r['levels']:>6} "
            f"{'met' if r['targets_met'] else 'missed'}"
        )
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
