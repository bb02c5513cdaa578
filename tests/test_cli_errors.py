"""Command lines fxfuse must refuse: one line on stderr, exit code 2, before any
work is done and without touching what the user already has."""

import os
import stat

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.cli import main
from fxfuse.errors import FuseError, InputError
from fxfuse.load import parse_example_inputs
from fxfuse.train import TrainConfig, evaluate, fit
from tests.test_safety import _fused, _split


def _refused(capsys, argv, *fragments):
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert lines[-1].startswith("fxfuse: error:"), captured.err
    assert sum(line.startswith("fxfuse: error:") for line in lines) == 1
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return captured


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["fuse", "--task", "t=m.pt2", "-o", "x", "--levels", "0"], ["--levels"]),
        (["fuse", "--task", "t=m.pt2", "-o", "x", "--width", "0"], ["--width"]),
        (["fuse", "--task", "t=m.pt2", "-o", "x", "--heads", "-2"], ["--heads"]),
        (["inspect", "m.pt2", "--levels", "-1"], ["--levels", "at least 0, not -1"]),
        (["train", "a", "--data", "census-income", "--lr", "nan"], ["--lr"]),
        (["train", "a", "--data", "census-income", "--lr", "0"], ["--lr"]),
        (["train", "a", "--data", "census-income", "--subset", "0"], ["--subset"]),
        (["train", "a", "--data", "census-income", "--patience", "0"], ["--patience"]),
        (["train", "a", "--data", "census-income", "--epochs", "1.5"], ["--epochs"]),
        (["export", "a", "-o", "f.onnx", "--tolerance", "-1e-3"], ["--tolerance"]),
        (["export", "a", "-o", "f.onnx", "--tolerance", "inf"], ["--tolerance"]),
    ],
)
def test_out_of_range_settings_are_refused_by_name(capsys, argv, fragments):
    command = argv[0]
    _refused(capsys, argv, *fragments, f"fxfuse {command} --help")


def test_an_unknown_flag_points_at_the_help_of_its_command(capsys):
    argv = ["train", "a", "--data", "census-income", "--rounds", "3"]
    _refused(capsys, argv, "--rounds", "'fxfuse train --help'")


def test_no_command_prints_the_usage_on_stderr(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: fxfuse")


def test_fuse_refuses_a_file_as_its_output_and_leaves_it_alone(tmp_path, capsys):
    target = tmp_path / "fused"
    target.write_text("my notes")
    # The model does not exist either: the output is checked first.
    argv = ["fuse", "--task", "t=missing.pt2", "-o", str(target)]
    _refused(capsys, argv, "is a file")
    assert target.read_text() == "my notes"


def test_fuse_refuses_an_existing_artifact_before_loading_any_model(tmp_path, capsys):
    target = tmp_path / "fused"
    fxfuse.save(_fused(), target)
    before = (target / "manifest.json").read_text()
    argv = ["fuse", "--task", "t=missing.pt2", "-o", str(target)]
    _refused(capsys, argv, "already exists", "--force")
    assert (target / "manifest.json").read_text() == before


def test_an_artifact_given_as_a_file_is_named_a_file(tmp_path, capsys):
    path = tmp_path / "fused.onnx"
    path.write_bytes(b"onnx")
    _refused(capsys, ["evaluate", str(path), "--data", "census-income"], "is a file")


@pytest.mark.parametrize(
    "entry, fragment",
    [("t_tiny", "is not MODEL=PATH"), ("t_tiny=", "is not MODEL=PATH"), ("=a", "")],
)
def test_malformed_cuts_are_refused(tmp_path, capsys, entry, fragment):
    model = _tiny_archive(tmp_path)
    argv = ["fuse", "--task", f"t={model}", "--cuts", entry, "-o", str(tmp_path / "o")]
    _refused(capsys, argv, "--cuts", fragment)
    assert not (tmp_path / "o").exists()


def test_cuts_given_twice_for_one_model_are_refused(tmp_path, capsys):
    model = _tiny_archive(tmp_path)
    argv = ["fuse", "--task", f"t={model}", "-o", str(tmp_path / "o")]
    argv += ["--cuts", "tiny=a", "--cuts", f"{model}=b"]
    _refused(capsys, argv, "gives model 't_tiny' twice")


def test_export_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    artifact = tmp_path / "fused"
    fxfuse.save(_fused(), artifact)
    output = tmp_path / "fused.onnx"
    output.write_bytes(b"an earlier export")
    _refused(capsys, ["export", str(artifact), "-o", str(output)], "--force")
    assert output.read_bytes() == b"an earlier export"

    assert main(["export", str(artifact), "-o", str(output), "--force"]) == 0
    assert output.read_bytes()[:4] != b"an e"
    assert "parity" in capsys.readouterr().out.lower()


def test_a_width_that_is_not_a_multiple_of_the_heads_is_a_fuse_error():
    with pytest.raises(FuseError, match="width=10 is not a multiple of heads=4"):
        fxfuse.fuse({"t": [nn.Linear(4, 1)]}, (torch.randn(2, 4),), width=10, heads=4)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("2x3x0", "dimension of 0"),
        ("100000x3x224x224", "more than"),
        ("shop=int0,price=float", "empty vocabulary"),
    ],
)
def test_example_inputs_that_cannot_be_made_are_refused(spec, fragment):
    with pytest.raises(InputError, match=fragment):
        parse_example_inputs(spec)


def test_a_picture_goes_into_a_new_folder_readable_by_others(tmp_path, capsys):
    model = _tiny_archive(tmp_path)
    picture = tmp_path / "new" / "folder" / "tiny.dot"
    assert main(["inspect", model, "--graph", str(picture)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(picture.stat().st_mode) == 0o666 & ~umask
    assert picture.read_text().startswith("digraph")


def test_a_multiclass_kind_for_a_one_value_head_is_refused():
    fused, rows = _fused(), _split(32)
    with pytest.raises(
        InputError, match="'t' is multiclass but the model predicts one"
    ):
        evaluate(fused, rows, {"t": "multiclass", "u": "binary"})
    with pytest.raises(InputError, match="'t' is multiclass"):
        fit(fused, rows, rows, {"t": "multiclass"}, TrainConfig(epochs=1))


def test_resuming_with_other_rows_is_refused_until_restarted(tmp_path):
    config = TrainConfig(epochs=1, batch_size=16, progress=False)

    def train(rows: int, restart: bool = False):
        return fit(
            _fused(),
            _split(rows),
            _split(32),
            {"t": "binary"},
            config,
            checkpoint_dir=tmp_path / "run",
            restart=restart,
        )

    train(64)
    with pytest.raises(fxfuse.FxfuseError, match="64 training and 32 validation rows"):
        train(48)
    assert len(train(48, restart=True).history) == 1


def _tiny_archive(folder) -> str:
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.b = nn.Linear(8, 1)

        def forward(self, x):
            return self.b(self.a(x))

    program = torch.export.export(
        Tiny().eval(),
        (torch.randn(4, 4),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    path = folder / "tiny.pt2"
    torch.export.save(program, path)
    return str(path)
