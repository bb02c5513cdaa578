"""The Census-Income benchmark runs end to end on a few thousand rows."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import bench_census  # noqa: E402

EXPECTED_ROWS = {
    "MLP [8, 8] (income)",
    "MLP [8, 8] (never_married)",
    "MLP [16, 8] (income)",
    "MLP [16, 8] (never_married)",
    "DCN (income)",
    "DCN (never_married)",
    "DeepFM (income)",
    "DeepFM (never_married)",
    "Shared-Bottom",
    "MMoE",
    "PLE",
    "average of (4 MLPs)",
    "fxfuse (4 MLPs)",
    "average of (4 MLPs, fitted heads)",
    "fxfuse (4 MLPs, fitted heads)",
    "average of (heterogeneous)",
    "fxfuse (heterogeneous)",
}


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_a_useful_auc(shared, tmp_path):
    data_root = shared / "data" / "census-income-kdd"
    out = tmp_path / "census"
    bench_census.main(
        ["--quick", "--data-root", str(data_root), "--out", str(out), "--jobs", "1"]
    )

    results = json.loads(out.with_suffix(".json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    assert set(rows) == EXPECTED_ROWS
    for name, row in rows.items():
        for seed, scores in row["seeds"].items():
            for task, auc in scores["test"].items():
                assert 0.5 < auc <= 1.0, f"{name} seed {seed} {task}: AUC {auc}"
        assert row["total_params"] > 0
        assert row["rows_per_second"] > 0
    fused = rows["fxfuse (4 MLPs)"]["seeds"]["0"]
    assert set(fused["difference"]) == {"income", "never_married", "mean"}

    table = out.with_suffix(".md").read_text()
    assert "| **fxfuse (heterogeneous)** |" in table
    assert "paired by seed" in table
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"
