"""Latency of exported fused models: ONNX Runtime against eager PyTorch.

Two fused models, with untrained weights (latency does not depend on them):

- ``census``: Census-Income (KDD) with its real feature set (31 sparse columns with
  their vocabulary sizes, 7 dense ones), one dict input; per task (income, never
  married) a torch-rechub DCN and an MLP on the same features, fused at two levels.
- ``vision``: the MultiFashion example models on ``[B, 1, 36, 36]`` images: a ResNet
  and a ViT for the left item, a MobileNet for the right one, fused at three levels.

Each is exported with `fxfuse.export.export_onnx` (which checks parity), then both
runtimes are timed at batch 1, 64 and 1024 on the same inputs (real test rows for
census, random images for vision). Timed calls alternate between the two runtimes,
so that a change in machine load hits both alike; each cell stops after ``--runs``
calls or ``--budget`` seconds. Results go to
``bench/export.json`` (written atomically) and are printed as a table.

Usage::

    .venv/bin/python -m tools.bench_export              # torch's default threads
    .venv/bin/python -m tools.bench_export --threads 1 2 --runs 30 --budget 20
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch_rechub.basic.layers import MLP, EmbeddingLayer
from torch_rechub.models.ranking import DCN

import fxfuse
from fxfuse.data import census_income
from fxfuse.export import export_onnx
from fxfuse.files import write_text
from fxfuse.trace import FallbackWarning
from tools.zoo import census_rechub_features, multifashion_models

ROOT = Path(__file__).resolve().parents[1]
CENSUS = ROOT.parent / "shared" / "data" / "census-income-kdd"
BATCHES = (1, 64, 1024)
TASKS = ("income", "never_married")
MIN_ROUNDS = 3


class DictMLP(nn.Module):
    """A single-task MLP on a dict of tabular features, as a user would write it.

    Args:
        features: torch-rechub sparse and dense features; the dict keys it reads.
        dims: hidden widths.
    """

    def __init__(self, features: list, dims: Sequence[int] = (16, 8)):
        super().__init__()
        self.features = features
        self.embedding = EmbeddingLayer(features)
        width = sum(f.embed_dim for f in features)
        self.mlp = MLP(width, output_layer=True, dims=list(dims))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embedding(x, self.features, squeeze_dim=True)
        return torch.sigmoid(self.mlp(h).squeeze(1))


def census_fused(
    sparse: dict[str, int],
    dense: list[str],
    example_inputs: tuple,
    embed_dim: int = 4,
    dims: Sequence[int] = (16, 8),
    tasks: Sequence[str] = TASKS,
) -> torch.fx.GraphModule:
    """Per task a DCN and a `DictMLP` on the same dict of features, fused.

    Every model has its own embedding tables and seed.

    Args:
        sparse: vocabulary size per sparse feature.
        dense: dense feature names.
        example_inputs: ``(dict,)`` with a batch of at least 2.
        embed_dim: embedding width of every sparse feature.
        dims: hidden widths of the MLPs (DCN's deep part and `DictMLP`).
        tasks: task names.

    Returns:
        The fused model, in eval mode.
    """
    models = {}
    for seed, task in enumerate(tasks):
        torch.manual_seed(seed)
        features = sum(census_rechub_features(sparse, dense, embed_dim), [])
        dcn = DCN(features, n_cross_layers=2, mlp_params={"dims": list(dims)})
        features = sum(census_rechub_features(sparse, dense, embed_dim), [])
        models[task] = {"dcn": dcn.eval(), "mlp": DictMLP(features, dims).eval()}
    return fxfuse.fuse(models, example_inputs, levels=2).eval()


def vision_fused(batch: int = 4) -> torch.fx.GraphModule:
    """ResNet + ViT (task left) and MobileNet (task right) on 1x36x36 images."""
    zoo = {entry.name: entry for entry in multifashion_models()}
    models = {
        "left": {
            "resnet": zoo["multifashion_resnet"].build(),
            "vit": zoo["multifashion_vit"].build(),
        },
        "right": {"mobilenet": zoo["multifashion_mobilenet"].build()},
    }
    images = torch.randn(batch, 1, 36, 36, generator=torch.Generator().manual_seed(0))
    return fxfuse.fuse(models, (images,), levels=3).eval()


# ----------------------------------------------------------------------- timing


def rows(inputs: tuple, size: int, seed: int = 0) -> tuple:
    """`size` rows drawn with replacement from a pool of inputs."""
    pool = torch.utils._pytree.tree_leaves(inputs)[0].shape[0]
    index = torch.randint(pool, (size,), generator=torch.Generator().manual_seed(seed))
    return torch.utils._pytree.tree_map(lambda t: t[index].contiguous(), inputs)


def onnx_runner(path: Path, threads: int) -> Callable[[tuple], list]:
    """An ONNX Runtime session on the CPU with `threads` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # Threads that spin between calls would take the CPU from the torch calls
    # timed in between.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]

    def run(inputs: tuple) -> list:
        tensors = torch.utils._pytree.tree_leaves(inputs)
        feeds = {n: t.numpy() for n, t in zip(names, tensors, strict=True)}
        return session.run(None, feeds)

    return run


def time_both(
    model: nn.Module,
    run_onnx: Callable[[tuple], list],
    inputs: tuple,
    runs: int,
    budget_s: float,
) -> tuple[float, float, int]:
    """Median ms of eager PyTorch and of ONNX Runtime, in alternating calls.

    Stops after `runs` rounds, or earlier once `budget_s` seconds are spent and at
    least `MIN_ROUNDS` rounds are done.

    Returns:
        The two medians and the number of rounds timed.
    """

    def eager() -> None:
        with torch.no_grad():
            model(*inputs)

    def onnx() -> None:
        run_onnx(inputs)

    for warm_up in (eager, onnx):
        warm_up()
    times: dict[str, list[float]] = {"torch": [], "onnx": []}
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    try:
        for done in range(runs):
            if done >= MIN_ROUNDS and time.perf_counter() - started > budget_s:
                break
            for name, call in (("torch", eager), ("onnx", onnx)):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1000)
    finally:
        gc.enable()
    medians = statistics.median(times["torch"]), statistics.median(times["onnx"])
    return *medians, len(times["torch"])


# ---------------------------------------------------------------------- the bench


def build_models(data: Path) -> dict[str, tuple[torch.fx.GraphModule, tuple]]:
    """Each fused model and a pool of inputs to draw batches from."""
    dataset = census_income(data)
    pool = dataset.test.take(slice(0, 4096)).args()
    census = census_fused(
        dataset.sparse,
        dataset.dense,
        rows(pool, 8),
        embed_dim=16,
        dims=(256, 128),
        tasks=list(dataset.tasks),
    )
    images = (torch.randn(2048, 1, 36, 36, generator=torch.Generator().manual_seed(1)),)
    return {"census": (census, pool), "vision": (vision_fused(), images)}


def bench(args: argparse.Namespace) -> dict:
    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "load_average_before": list(os.getloadavg()),
    }
    models = build_models(Path(args.data))
    results, exports = [], {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (model, pool) in models.items():
            path = Path(folder) / f"{name}.onnx"
            print(f"exporting {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            report = export_onnx(model, model.example_inputs, path)
            exports[name] = {
                "seconds": round(time.perf_counter() - started, 1),
                "inputs": len(report.input_names),
                "outputs": report.output_names,
                "max_abs_diff": max(
                    d for c in report.checks for d in c.max_abs_diff.values()
                ),
                "megabytes": round(path.stat().st_size / 2**20, 2),
            }
            for threads in args.threads:
                torch.set_num_threads(threads)
                run_onnx = onnx_runner(path, threads)
                for batch in BATCHES:
                    inputs = rows(pool, batch, seed=batch)
                    torch_ms, onnx_ms, rounds = time_both(
                        model, run_onnx, inputs, args.runs, args.budget
                    )
                    results.append(
                        {
                            "model": name,
                            "threads": threads,
                            "batch": batch,
                            "torch_ms": round(torch_ms, 3),
                            "onnxruntime_ms": round(onnx_ms, 3),
                            "ratio": round(torch_ms / onnx_ms, 2),
                            "rounds": rounds,
                        }
                    )
                    print(
                        f"{name} threads={threads} batch={batch}: torch "
                        f"{torch_ms:.2f} ms, onnxruntime {onnx_ms:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    machine["load_average_after"] = list(os.getloadavg())
    return {
        "machine": machine,
        "versions": versions(),
        "runs": args.runs,
        "budget_s": args.budget,
        "exports": exports,
        "results": results,
    }


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "fxfuse": fxfuse.__version__,
    }


def table(document: dict) -> str:
    """The results as a text table; ratio = torch time / ONNX Runtime time."""
    lines = [
        f"{'model':<8} {'threads':>7} {'batch':>6} {'torch ms':>10} "
        f"{'onnxrt ms':>10} {'ratio':>6}"
    ]
    for r in document["results"]:
        lines.append(
            f"{r['model']:<8} {r['threads']:>7} {r['batch']:>6} {r['torch_ms']:>10.2f} "
            f"{r['onnxruntime_ms']:>10.2f} {r['ratio']:>6.2f}"
        )
    machine = document["machine"]
    lines.append(
        f"{machine['cpu_count']} CPUs, load {machine['load_average_before'][0]:.1f} "
        f"before / {machine['load_average_after'][0]:.1f} after; torch "
        f"{document['versions']['torch']}, onnxruntime "
        f"{document['versions']['onnxruntime']}"
    )
    return "\n".join(lines)


def write_json(document: dict, path: Path) -> None:
    """Write `document` to `path` in one rename, never half-way."""
    write_text(path, json.dumps(document, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(CENSUS), help="Census-Income folder")
    parser.add_argument("--out", default=str(ROOT / "bench" / "export.json"))
    parser.add_argument(
        "--runs", type=int, default=20, help="most timed calls per runtime and batch"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help="seconds per runtime pair and batch after which timing stops (at "
        f"least {MIN_ROUNDS} calls each)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[torch.get_num_threads()],
        help="intra-op threads for both runtimes; several values run in turn",
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FallbackWarning)  # rechub models need export

    document = bench(args)
    write_json(document, Path(args.out))
    print(table(document))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
