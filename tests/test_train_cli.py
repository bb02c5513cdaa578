"""``fxfuse train`` itself under ``torchrun``: the same command trains with two ranks,
rank 0 alone writes, and ``--restart`` starts anew without a race between ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxfuse
from examples.census.models import TabularMLP
from tests.test_data import CENSUS, needs_census

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2


def _torchrun_train(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fxfuse",
        "train",
        str(folder),
        "--data",
        "census-income",
        "--data-root",
        str(CENSUS),
        "--subset",
        "2048",
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        "256",
        "--patience",
        str(EPOCHS),
        "--no-progress",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@needs_census
def test_fxfuse_train_under_torchrun_writes_once_and_restarts_cleanly(tmp_path):
    data = fxfuse.data.census_income(CENSUS).subset(64, 16)
    torch.manual_seed(0)
    members = {
        task: [
            TabularMLP(data.sparse, data.dense, (8, 8)),
            TabularMLP(data.sparse, data.dense, (16, 8)),
        ]
        for task in data.tasks
    }
    batch = (data.train.take(slice(0, 4)).inputs,)
    folder = tmp_path / "fused"
    fxfuse.save(fxfuse.fuse(members, batch, levels=2, width=8), folder)

    first = _torchrun_train(folder)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = (folder / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["training"]["epochs_run"] == EPOCHS
    # One line "weights of epoch ... saved" means one rank wrote the artifact.
    assert first.stdout.count("saved into") == 1, first.stdout

    again = _torchrun_train(folder, "--restart")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = (folder / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2]
    fxfuse.load(folder)  # the artifact is whole after the second run
