"""Files that would run code, break half-way or do not fit: refused in one line,
nothing run, nothing lost."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.artifact import save_weights
from fxfuse.data import Split
from fxfuse.errors import ArtifactError, InputError, LoadError
from fxfuse.load import load_model
from fxfuse.train import TrainConfig, fit
from tests.test_reliability import _archive, _one_line_error, fxfuse_cli


def _code_running_bytes(marker: Path, module: str) -> bytes:
    """Bytes written by ``pickle.dumps`` or ``torch.save`` (`module`) whose loading,
    without weights_only, creates `marker`. Written by another process, so that no
    class of this test is needed to build it."""
    out = marker.with_suffix(f".{module}")
    script = (
        f"import {module}, io\n"
        "class M:\n"
        f"    def __reduce__(self): return (open, ({str(marker)!r}, 'w'))\n"
        "buffer = io.BytesIO()\n"
        + (
            "buffer.write(pickle.dumps(M()))\n"
            if module == "pickle"
            else "torch.save(M(), buffer)\n"
        )
        + f"open({str(out)!r}, 'wb').write(buffer.getvalue())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    return out.read_bytes()


def _rewrite_archive(path: Path, replace: dict[str, bytes], add: dict[str, bytes]):
    """Copy the zip at `path` with entries (matched by suffix) replaced or added."""
    with zipfile.ZipFile(path) as source:
        entries = [(info.filename, source.read(info)) for info in source.infolist()]
    prefix = entries[0][0].split("/", 1)[0]
    with zipfile.ZipFile(path, "w") as target:
        for name, data in entries:
            for suffix, new in replace.items():
                if name.endswith(suffix):
                    data = new
            target.writestr(name, data)
        for suffix, data in add.items():
            target.writestr(f"{prefix}/{suffix}", data)


def test_an_archive_whose_sample_inputs_are_a_pickle_runs_no_code(tmp_path):
    # torch.export.load falls back to weights_only=False when a tensor file does
    # not load safely; fxfuse must not let it.
    path = Path(_archive(tmp_path, "a"))
    marker = tmp_path / "code-ran"
    _rewrite_archive(
        path, {"sample_inputs/model.pt": _code_running_bytes(marker, "torch")}, add={}
    )

    _one_line_error(fxfuse_cli("inspect", str(path)), "--allow-pickle")
    assert not marker.exists()


def test_an_archive_holding_a_pickled_object_constant_is_refused(tmp_path):
    path = Path(_archive(tmp_path, "a"))
    marker = tmp_path / "code-ran"
    _rewrite_archive(
        path,
        {},
        add={"data/constants/opaque_obj_0": _code_running_bytes(marker, "pickle")},
    )

    with pytest.raises(LoadError, match="opaque_obj_0.*allow-pickle"):
        load_model(str(path))
    assert not marker.exists()
    result = fxfuse_cli("inspect", str(path))
    _one_line_error(result, "pickled Python object", "pickled-models")
    assert not marker.exists()


def test_an_artifact_stage_holding_a_pickle_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "fused"
    fxfuse.save(_fused(), folder)
    marker = tmp_path / "code-ran"
    stage = next((folder / "stages").glob("*.pt2"))
    _rewrite_archive(
        stage,
        {},
        add={"data/constants/opaque_obj_0": _code_running_bytes(marker, "pickle")},
    )

    with pytest.raises(ArtifactError, match="damaged"):
        fxfuse.load(folder)
    assert not marker.exists()


def test_an_ordinary_archive_still_loads_with_its_example_inputs(tmp_path):
    loaded = load_model(_archive(tmp_path, "a"))
    (inputs,) = loaded.example_inputs
    assert inputs.shape == (4, 4)
    assert loaded.model(inputs).shape == (4, 3)


def test_inputs_that_do_not_fit_an_archive_name_the_shape_it_takes(tmp_path):
    result = fxfuse_cli("inspect", _archive(tmp_path, "a"), "--example-inputs", "2x5")
    _one_line_error(result, "input 0 2x5", "x Nx4")


# The command line


def test_a_factory_that_raises_names_its_line(tmp_path):
    (tmp_path / "models.py").write_text(
        "def build():\n    raise ValueError('no weights for this size')\n"
    )
    result = fxfuse_cli(
        "inspect", f"{tmp_path}/models.py:build", "--example-inputs", "2x4"
    )
    _one_line_error(result, "ValueError", "models.py:2", "no weights for this size")


def test_a_module_that_does_not_import_names_its_line(tmp_path):
    (tmp_path / "models.py").write_text("import torch\ndef build(:\n    pass\n")
    result = fxfuse_cli(
        "inspect", f"{tmp_path}/models.py:build", "--example-inputs", "2x4"
    )
    _one_line_error(result, "SyntaxError", "models.py:2")


def test_unreadable_arguments_are_one_line_naming_the_command():
    result = fxfuse_cli("inspect", "--levels", "three", "model.pt2")
    _one_line_error(result, "--levels", "not a whole number", "fxfuse inspect --help")


def test_verbose_after_the_command_shows_the_traceback(tmp_path):
    result = fxfuse_cli("inspect", str(tmp_path / "missing.pt2"), "-v")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "LoadError: model file" in result.stderr


# Artifacts


class _Tiny(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.b = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.b(self.a(x))).squeeze(1)


def _fused():
    return fxfuse.fuse(
        {"t": [_Tiny(0), _Tiny(1)], "u": [_Tiny(2)]},
        (torch.randn(4, 4),),
        levels=1,
        width=8,
    )


def _split(rows: int, features: int = 4) -> Split:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, features, generator=generator)
    return Split(x, {"t": (x[:, 0] > 0).float(), "u": (x[:, 1] > 0).float()})


@pytest.mark.parametrize(
    "damage",
    [
        "weights",
        "weights of another width",
        "stage",
        "stage outside",
        "manifest key",
        "example inputs",
    ],
)
def test_a_damaged_artifact_is_one_error_that_says_so(tmp_path, damage):
    folder = tmp_path / "fused"
    fxfuse.save(_fused(), folder)
    if damage == "weights":
        (folder / "fusion.safetensors").unlink()
    elif damage == "weights of another width":
        other = fxfuse.fuse(
            {"t": [_Tiny(0), _Tiny(1)], "u": [_Tiny(2)]},
            (torch.randn(4, 4),),
            levels=1,
            width=16,
        )
        fxfuse.save(other, tmp_path / "other")
        (tmp_path / "other" / "fusion.safetensors").replace(
            folder / "fusion.safetensors"
        )
    elif damage == "stage":
        next((folder / "stages").iterdir()).write_bytes(b"not an archive")
    elif damage == "stage outside":  # a readable stage, but not the artifact's
        manifest = json.loads((folder / "manifest.json").read_text())
        stage = manifest["stages"]["u__tiny"][0]
        shutil.copy(folder / stage, tmp_path / "elsewhere.pt2")
        manifest["stages"]["u__tiny"][0] = "../elsewhere.pt2"
        (folder / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "manifest key":
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["stages"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        (folder / "example_inputs.pt").write_bytes(b"not a tensor file")

    with pytest.raises(ArtifactError, match="damaged, fuse again") as caught:
        fxfuse.load(folder)
    assert "torch.export.save" not in str(caught.value)  # advice for a user's file
    _one_line_error(
        fxfuse_cli("evaluate", str(folder), "--data", "census-income"), "damaged"
    )


def test_new_weights_and_manifest_are_swapped_in_together(tmp_path):
    folder = tmp_path / "fused"
    fused = _fused()
    fxfuse.save(fused, folder)
    # A folder left by a killed save beside the artifact.
    stale = tmp_path / ".fused.fxfuse-partial-killed"
    stale.mkdir()
    (stale / "fusion.safetensors").write_bytes(b"half")
    before = (folder / "stages").stat().st_ino

    with torch.no_grad():
        fused.get_submodule("mix_t").logits.copy_(torch.tensor([0.9, 0.1]).log())
    save_weights(fused, folder, {"best_epoch": 3})

    reloaded = fxfuse.load(folder)
    assert torch.allclose(
        reloaded.get_submodule("mix_t").logits.softmax(0), torch.tensor([0.9, 0.1])
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["training"] == {"best_epoch": 3}
    assert not stale.exists()
    assert (folder / "stages").stat().st_ino != before  # a new folder took its place
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]


def test_new_weights_stay_in_place_when_the_old_folder_cannot_be_removed(
    tmp_path, monkeypatch
):
    folder = tmp_path / "fused"
    fused = _fused()
    fxfuse.save(fused, folder)
    remove = shutil.rmtree

    def remove_all_but_the_old_artifact(path, ignore_errors=False):
        if ignore_errors:  # the removals that may fail: pretend a file is immutable
            return
        remove(path)

    monkeypatch.setattr(shutil, "rmtree", remove_all_but_the_old_artifact)
    with torch.no_grad():
        fused.get_submodule("mix_t").logits.copy_(torch.tensor([0.9, 0.1]).log())
    with pytest.warns(UserWarning, match="could not be removed entirely; delete"):
        save_weights(fused, folder, {"best_epoch": 3})

    reloaded = fxfuse.load(folder)
    assert torch.allclose(
        reloaded.get_submodule("mix_t").logits.softmax(0), torch.tensor([0.9, 0.1])
    )


def test_data_that_do_not_fit_the_fused_model_name_both_inputs():
    fused = _fused()
    wrong = _split(16, features=5)
    with pytest.raises(InputError, match=r"input 0 2x5.*built for input 0 4x4"):
        fit(fused, wrong, wrong, {"t": "binary"}, TrainConfig(epochs=1))
