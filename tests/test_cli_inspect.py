"""`fxfuse inspect` on the command line."""

import json
import subprocess
import sys

import torch
from torch import nn

from fxfuse.cli import main

DYNAMIC = torch.export.Dim.AUTO


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _archive(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "small.pt2"
    program = torch.export.export(
        Small().eval(), (torch.randn(4, 4),), dynamic_shapes=({0: DYNAMIC},)
    )
    torch.export.save(program, path)
    return path


def test_inspect_prints_tier_cut_table_and_stages(tmp_path, capsys):
    assert main(["inspect", str(_archive(tmp_path)), "--levels", "2"]) == 0
    out = capsys.readouterr().out
    assert "tier: export" in out
    assert "idx  node" in out and "module path" in out and "FLOPs %" in out
    assert "stages: 3 (levels=2)" in out
    assert "max abs diff 0" in out


def test_inspect_json_lists_cut_points_with_ranks_and_shapes(tmp_path, capsys):
    assert main(["inspect", str(_archive(tmp_path)), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    closes = {c["closes"]: c for c in data["cut_points"]}
    assert closes["body"]["rank"] == 1
    assert closes["body"]["shape"] == [4, 8]
    assert closes["body.0"]["rank"] == 2
    assert len(data["chosen"]) == 3
    assert data["cut_points"][-1]["flops_fraction"] < 1.0


def test_inspect_of_a_factory_with_shapes(capsys):
    spec = "torchvision.models:squeezenet1_1"
    assert main(["inspect", spec, "--example-inputs", "2x3x64x64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tier"] == "fx"
    assert data["output_shape"] == [2, 1000]


def test_bad_input_is_one_line_with_exit_code_2(tmp_path):
    missing = tmp_path / "missing.pt2"
    result = subprocess.run(
        [sys.executable, "-m", "fxfuse", "inspect", str(missing)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fxfuse", "-v", "inspect", str(tmp_path / "x.pt2")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fxfuse: error: ") and "does not exist" in last


def test_missing_example_inputs_are_asked_for():
    code = main(["inspect", "torchvision.models:resnet18"])
    assert code == 2


def test_fuse_writes_an_artifact_and_refuses_to_overwrite(tmp_path, capsys):
    torch.manual_seed(0)
    paths = []
    for name in ("a", "b", "c"):
        program = torch.export.export(
            Small().eval(), (torch.randn(4, 4),), dynamic_shapes=({0: DYNAMIC},)
        )
        torch.export.save(program, tmp_path / f"{name}.pt2")
        paths.append(str(tmp_path / f"{name}.pt2"))
    out = tmp_path / "fused"
    args = ["fuse", "--task", f"t1={paths[0]},{paths[1]}", "--task", f"t2={paths[2]}"]
    args += ["--levels", "2", "-o", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "2 tasks, 3 models, 2 levels" in text
    assert (out / "manifest.json").is_file()
    assert len(list((out / "stages").glob("*.pt2"))) == 9
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


def test_fuse_refuses_the_same_file_twice(tmp_path, capsys):
    path = _archive(tmp_path)
    code = main(["fuse", "--task", f"t={path},{path}", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "given twice" in capsys.readouterr().err
