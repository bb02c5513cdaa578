"""One rank of the DistributedDataParallel test in ``test_train.py``.

Launched as ``python -m torch.distributed.run --nproc_per_node=2 _ddp_worker.py OUT``
after the test has saved `tiny_model()` as an artifact in ``OUT/fused``, as
``fxfuse train`` would find it. Every rank loads that artifact, trains it on
`tiny_data()` with `fxfuse.train.fit` and saves its final weights to
``OUT/rank{RANK}.pt``; rank 0 also writes ``OUT/metrics.jsonl`` and the checkpoints
under ``OUT/checkpoint``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxfuse import fuse, load  # noqa: E402
from fxfuse.data._split import Split  # noqa: E402
from fxfuse.train import TrainConfig, fit  # noqa: E402

TASKS = {"sign": "binary", "level": "regression"}
CONFIG = TrainConfig(epochs=2, batch_size=128, lr=5e-3, patience=5, progress=False)


def tiny_data() -> tuple[Split, Split]:
    """512 training and 256 validation rows for the tasks in `TASKS`."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(768, 6, generator=generator)
    labels = {
        "sign": (inputs[:, 0] * inputs[:, 1] > 0).float(),
        "level": inputs[:, 2] - inputs[:, 3] ** 2,
    }
    rows = Split(inputs, labels)
    return rows.take(slice(0, 512)), rows.take(slice(512, None))


def tiny_model() -> nn.Module:
    """A fused model of two small MLPs, the same on every call."""
    torch.manual_seed(0)

    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 1)
        )

    return fuse(
        {"sign": [mlp()], "level": [mlp()]},
        (torch.randn(4, 6),),
        levels=1,
        width=8,
        heads=2,
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    fused = load(out / "fused")
    train, val = tiny_data()
    fit(
        fused,
        train,
        val,
        TASKS,
        CONFIG,
        checkpoint_dir=out / "checkpoint",
        metrics_path=out / "metrics.jsonl",
    )
    rank = int(os.environ["RANK"])
    torch.save(fused.state_dict(), out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
