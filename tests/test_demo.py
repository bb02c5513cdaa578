"""The MultiFashion demo (`examples/main.py --quick`): every step leaves its file and
the final table has a number for every model and task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fxfuse.data.multifashion import CONTENT_SHA256, DEBIAN_ROOT, cache_folder

ROOT = Path(__file__).resolve().parents[1]

# Each file and the step of the demo that writes it.
WRITTEN_BY = {
    "left/resnet.pt2": "training and export of the single-task models",
    "left/vit.pt2": "training and export of the single-task models",
    "right/resnet.pt2": "training and export of the single-task models",
    "right/mobilenet.pt2": "training and export of the single-task models",
    "shared_trunk.pt2": "training of the shared-trunk baseline",
    "resnet.svg": "fxfuse inspect --graph",
    "fused/manifest.json": "fxfuse fuse",
    "fused/fusion.safetensors": "fxfuse fuse / fxfuse train",
    "fused/train/done.json": "fxfuse train",
    "evaluation.json": "fxfuse evaluate --json",
    "fused.onnx": "fxfuse export",
    "fused.onnx.json": "fxfuse export (parity report)",
    "results.json": "the final table",
}

# The tasks each row of the final table must score.
ROW_TASKS = {
    "resnet (left)": ["left"],
    "vit (left)": ["left"],
    "resnet (right)": ["right"],
    "mobilenet (right)": ["right"],
    "uniform average": ["left", "right"],
    "shared trunk": ["left", "right"],
    "fused (fxfuse)": ["left", "right"],
}


def _fashion_mnist_installed() -> bool:
    def complete(folder: Path) -> bool:
        return all(
            (folder / f"{name}.gz").is_file() or (folder / name).is_file()
            for name in CONTENT_SHA256
        )

    return complete(DEBIAN_ROOT) or complete(cache_folder())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, str]:
    """Run the quick demo once in a fresh process; return its folder and stdout."""
    if not _fashion_mnist_installed():
        pytest.skip("Fashion-MNIST is not installed (Debian's dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("multifashion")
    env = dict(os.environ)
    jemalloc = sorted(Path("/usr/lib").glob("*/libjemalloc.so.2"))
    if jemalloc and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = str(jemalloc[0])
        env["MALLOC_CONF"] = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
    done = subprocess.run(
        [sys.executable, "examples/main.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


@pytest.mark.slow
def test_quick_demo_writes_the_file_of_every_step(quick_run):
    out, _ = quick_run
    missing = {
        name: step for name, step in WRITTEN_BY.items() if not (out / name).is_file()
    }
    assert not missing, f"steps that left no file: {missing}"
    manifest = json.loads((out / "fused" / "manifest.json").read_text())
    assert manifest["fusion"]["tasks"] == ["left", "right"]
    report = json.loads((out / "fused.onnx.json").read_text())
    assert report["passed"] is True


@pytest.mark.slow
def test_quick_demo_table_scores_every_model_on_its_tasks(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    rows = {row["model"]: row for row in results["rows"]}
    assert set(rows) == set(ROW_TASKS)
    for model, tasks in ROW_TASKS.items():
        for task in tasks:
            assert 0.0 <= rows[model][task] <= 1.0, (model, task)

    # The printed table shows the same numbers, one row per model.
    table = stdout[stdout.index("MultiFashion test accuracy") :]
    for model, tasks in ROW_TASKS.items():
        line = next(line for line in table.splitlines() if line.startswith(model))
        shown = line[len(model) :].split()
        expected = [
            f"{rows[model][t]:.4f}" if t in tasks else "-" for t in ("left", "right")
        ]
        assert shown == expected, line
