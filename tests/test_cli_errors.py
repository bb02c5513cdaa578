"""Command lines fxfuse must refuse: one line on stderr, exit code 2, before any
work is done and without touching what the user already has."""

import os
import stat

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.cli import main
from fxfuse.errors import ArtifactError, ExportError, FuseError, InputError
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


def test_no_command_is_one_line_naming_the_commands(capsys):
    captured = _refused(capsys, [], "inspect, fuse, train, evaluate or export")
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1


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
        ("shop=int99999999999999999999", "vocabulary above"),
        ("shop=int5,price=float,shop=int9", "'shop' is given twice"),
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


def test_a_loss_that_turns_nan_stops_training_with_a_way_out():
    rows = _split(32)
    rows.inputs[3, 0] = float("nan")  # one bad row poisons the first batch's loss
    config = TrainConfig(epochs=1, batch_size=32, progress=False)
    with pytest.raises(fxfuse.FxfuseError, match=r"loss is nan at epoch 1.*--lr"):
        fit(_fused(), rows, _split(16), {"t": "binary"}, config)


def test_export_refuses_a_model_whose_own_outputs_are_nan(tmp_path):
    fused = _fused()
    with torch.no_grad():
        fused.get_submodule("mix_t").logits.fill_(float("nan"))
    with pytest.raises(ExportError, match="outputs NaN or infinity"):
        fxfuse.export_onnx(fused, None, tmp_path / "fused.onnx")


def test_export_keeps_an_existing_side_file_unless_forced(tmp_path, capsys):
    artifact = tmp_path / "fused"
    fxfuse.save(_fused(), artifact)
    side = tmp_path / "fused.onnx.json"
    side.write_text("my notes")
    _refused(capsys, ["export", str(artifact), "-o", str(tmp_path / "fused.onnx")])
    assert side.read_text() == "my notes"


def test_inspect_keeps_an_existing_picture_unless_forced(tmp_path, capsys):
    model = _tiny_archive(tmp_path)
    picture = tmp_path / "tiny.dot"
    picture.write_text("my picture")
    _refused(capsys, ["inspect", model, "--graph", str(picture)], "--force")
    assert picture.read_text() == "my picture"
    assert main(["inspect", model, "--graph", str(picture), "--force"]) == 0
    assert picture.read_text().startswith("digraph")


def test_a_path_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys):
    model = _tiny_archive(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["fuse", "--task", f"t={model}", "--levels", "1"]
    _refused(capsys, [*argv, "-o", str(blocker / "fused")], "cannot use", "a_file")


def test_a_picture_that_cannot_replace_a_folder_names_the_folder(tmp_path, capsys):
    model = _tiny_archive(tmp_path)
    folder = tmp_path / "picture.dot"
    folder.mkdir()
    argv = ["inspect", model, "--graph", str(folder), "--force"]
    captured = _refused(capsys, argv, f"cannot use '{folder}'")
    assert ".tmp" not in captured.err


@pytest.mark.parametrize(
    "name, spec, fragment",
    [
        ("models.py", "{path}", "Python source"),
        ("fused.onnx", "{path}", "ONNX model"),
        ("models.py", ":SmallResNet", "give both parts"),
    ],
)
def test_model_specs_of_the_wrong_kind_say_what_to_give(
    tmp_path, capsys, name, spec, fragment
):
    path = tmp_path / name
    path.write_text("x = 1\n")
    _refused(capsys, ["inspect", spec.format(path=path)], fragment)


def test_unknown_leaf_modules_are_refused(tmp_path, capsys):
    _refused(capsys, ["inspect", _tiny_archive(tmp_path), "--leaf", "nope"], "nope")


def test_a_seed_too_large_for_torch_is_refused(capsys):
    argv = ["train", "a", "--data", "census-income", "--seed", str(2**70)]
    _refused(capsys, argv, "--seed", "must be below")


def test_a_width_far_too_large_is_refused_before_any_allocation():
    with pytest.raises(FuseError, match="above 4096"):
        fxfuse.fuse({"t": [nn.Linear(4, 1)]}, (torch.randn(2, 4),), width=10**6)


def test_a_damaged_run_record_points_at_restart(tmp_path):
    config = TrainConfig(epochs=1, batch_size=16, progress=False)
    folder = tmp_path / "run"
    fit(
        _fused(), _split(32), _split(16), {"t": "binary"}, config, checkpoint_dir=folder
    )
    (folder / "done.json").write_text("[]")
    with pytest.raises(fxfuse.FxfuseError, match="damaged.*--restart"):
        fit(
            _fused(),
            _split(32),
            _split(16),
            {"t": "binary"},
            config,
            checkpoint_dir=folder,
        )


def test_a_manifest_that_is_not_a_record_is_not_an_artifact(tmp_path):
    folder = tmp_path / "fused"
    fxfuse.save(_fused(), folder)
    (folder / "manifest.json").write_text("[]")
    with pytest.raises(ArtifactError, match="not an fxfuse manifest"):
        fxfuse.load(folder)


def test_save_never_replaces_a_folder_of_other_files_and_fills_an_empty_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="never replaces it"):
        fxfuse.save(_fused(), mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"

    empty = tmp_path / "empty"
    empty.mkdir()
    fxfuse.save(_fused(), empty)
    weights = empty / "fusion.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask


class _DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, features):
        return self.b(torch.relu(self.a(features["price"].unsqueeze(1))))


def test_archives_of_other_input_structures_name_what_each_takes(tmp_path, capsys):
    batch = torch.export.Dim("batch")
    program = torch.export.export(
        _DictInput().eval(),
        ({"price": torch.rand(4)},),
        dynamic_shapes=({"price": {0: batch}},),
    )
    torch.export.save(program, tmp_path / "by_key.pt2")
    argv = ["fuse", "--task", f"a={tmp_path / 'by_key.pt2'}"]
    argv += ["--task", f"b={_tiny_archive(tmp_path)}", "--levels", "1"]
    _refused(capsys, [*argv, "-o", str(tmp_path / "o")], "which takes x Nx4")
