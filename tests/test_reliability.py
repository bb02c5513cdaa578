"""Bad input on the command line: one line on stderr, exit code 2, nothing lost."""

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fxfuse
from fxfuse.errors import FxfuseError, LimitationWarning
from fxfuse.load import load_model
from fxfuse.split import chain
from fxfuse.trace import FrozenAttributeWarning, ModeDependentGraphWarning, trace
from tools.zoo import torchvision_models

ROOT = Path(__file__).resolve().parents[1]
DYNAMIC = torch.export.Dim.AUTO


class Small(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _archive(folder: Path, name: str, width: int = 8) -> str:
    torch.manual_seed(len(name))
    program = torch.export.export(
        Small(width).eval(), (torch.randn(4, 4),), dynamic_shapes=({0: DYNAMIC},)
    )
    torch.export.save(program, folder / f"{name}.pt2")
    return str(folder / f"{name}.pt2")


def fxfuse_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fxfuse", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("fxfuse: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"just some text\n", "not a PyTorch file"),
    ],
)
def test_files_that_are_not_models(tmp_path, content, fragment):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    _one_line_error(fxfuse_cli("inspect", str(path)), fragment)


def test_truncated_archive(tmp_path):
    path = Path(_archive(tmp_path, "a"))
    path.write_bytes(path.read_bytes()[:300])
    _one_line_error(fxfuse_cli("inspect", str(path)), "not a readable torch.export")


def test_pickle_without_opt_in_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    payload = tmp_path / "model.pt"
    script = (
        "import torch\n"
        "class M:\n"
        f"    def __reduce__(self): return (open, ({str(marker)!r}, 'w'))\n"
        f"torch.save(M(), {str(payload)!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    _one_line_error(fxfuse_cli("inspect", str(payload)), "--allow-pickle")
    assert not marker.exists()


def test_inputs_that_do_not_fit_name_the_input_and_both_shapes(tmp_path):
    path = _archive(tmp_path, "a")
    result = fxfuse_cli("inspect", path, "--example-inputs", "2x5")
    _one_line_error(result, "input 0 2x5")


def test_inputs_that_do_not_fit_a_factory_model_name_the_layer(tmp_path):
    spec = "torchvision.models:resnet18"
    result = fxfuse_cli("inspect", spec, "--example-inputs", "2x4x32x32")
    _one_line_error(result, "2x4x32x32", "'conv1'", "expects 3 channels")


def test_task_without_models(tmp_path):
    _one_line_error(
        fxfuse_cli("fuse", "--task", "t=", "-o", str(tmp_path / "o")), "no model"
    )


def test_levels_above_the_cut_points(tmp_path):
    path = _archive(tmp_path, "a")
    result = fxfuse_cli(
        "fuse", "--task", f"t={path}", "--levels", "9", "-o", str(tmp_path / "o")
    )
    _one_line_error(result, "has 4 cut points", "--levels 4 or fewer")


def test_an_existing_output_is_kept_unless_forced(tmp_path):
    a, b = _archive(tmp_path, "a"), _archive(tmp_path, "b", 16)
    out = tmp_path / "fused"
    assert fxfuse_cli("fuse", "--task", f"t={a},{b}", "-o", str(out)).returncode == 0
    before = (out / "manifest.json").read_text()
    _one_line_error(fxfuse_cli("fuse", "--task", f"t={a}", "-o", str(out)), "--force")
    assert (out / "manifest.json").read_text() == before


def test_a_failed_save_leaves_the_old_artifact_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    fused = fxfuse.fuse(
        {"t": [Small(8).eval(), Small(16).eval()]}, (torch.randn(4, 4),)
    )
    out = tmp_path / "fused"
    fxfuse.save(fused, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    calls = {"n": 0}
    real_save = torch.export.save

    def dies_half_way(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the process were stopped here
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch.export, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        fxfuse.save(fused, out, overwrite=True)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fused")]
    fxfuse.load(out)


def test_a_killed_save_leaves_the_old_artifact_loadable(tmp_path):
    """SIGKILL at a random moment of a save: the folder is the old or the new one."""
    torch.manual_seed(0)
    fused = fxfuse.fuse(
        {"t": [Small(8).eval(), Small(16).eval()]}, (torch.randn(4, 4),)
    )
    out = tmp_path / "fused"
    fxfuse.save(fused, out)
    script = (
        "import fxfuse, sys\n"
        f"fused = fxfuse.load({str(out)!r})\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        f"    fxfuse.save(fused, {str(out)!r}, overwrite=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout.readline().strip() == b"ready"
    time.sleep(1.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    loaded = fxfuse.load(out)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(loaded(x)["t"], fused(x)["t"])


class _FrozenAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.tensor(2.0)  # neither parameter nor buffer
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x) * self.scale))


def test_a_plain_tensor_attribute_is_reported_as_frozen():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxfuse.inspect(_FrozenAttribute(), (torch.randn(3, 4),))
    messages = [str(w.message) for w in caught if w.category is FrozenAttributeWarning]
    assert messages and "'scale'" in messages[0] and "register_buffer" in messages[0]


class _LibraryNorm(nn.LayerNorm):
    """A user subclass of a torch.nn layer: its ``eps`` is configuration."""

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + self.eps)


class _ScaledByAttributes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.norm = _LibraryNorm(4)
        self.b = nn.Linear(4, 1)
        self.scale = 0.5  # frozen, and reported
        self.groups = 2  # an int: a size as often as a factor, not reported
        self.shift = True  # a bool: a switch, not reported

    def forward(self, x):
        h = self.norm(torch.relu(self.a(x))) * self.scale
        h = h.reshape(-1, self.groups, 2).flatten(1) * self.groups
        return self.b(h + 1.0 if self.shift else h)


def test_a_float_attribute_used_in_arithmetic_is_reported_once_and_is_frozen():
    model, x = _ScaledByAttributes().eval(), torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fxfuse.inspect(model, (x,))
    messages = [str(w.message) for w in caught if w.category is FrozenAttributeWarning]
    assert len(messages) == 1
    assert messages[0].startswith("float attribute 'scale' (0.5) frozen")
    assert "register_buffer" in messages[0]
    assert any("'scale'" in note for note in report.notes)

    with torch.no_grad():
        before = model(x)
        model.scale = 3.0
        assert torch.equal(chain(report.stages, x), before)
        assert not torch.allclose(model(x), before)


def _torchvision_model(name):
    if name == "vit_b_16":
        return torchvision.models.vit_b_16(image_size=32), 32
    if name == "maxvit_small":  # its attention scales are float attributes
        entry = next(e for e in torchvision_models() if e.name == name)
        return entry.build(), 64
    return getattr(torchvision.models, name)(), 64


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16", "maxvit_small"])
def test_torchvision_models_raise_no_frozen_attribute_warning(name):
    model, size = _torchvision_model(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = trace(model.eval(), (torch.randn(2, 3, size, size),))
    assert traced.tier == "fx"
    assert [w for w in caught if w.category is FrozenAttributeWarning] == []


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.training:
            h = h + 0.1 * torch.randn_like(h)
        return self.b(h)


def test_a_graph_that_differs_between_train_and_eval_is_reported():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxfuse.inspect(_ModeDependent(), (torch.randn(3, 4),))
    assert any(w.category is ModeDependentGraphWarning for w in caught)


class _ValueBranchAtRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        if h.mean() > 0:
            h = -h
        return self.out(h)


class _ValueClamp(nn.Module):
    def forward(self, x):
        if (x > 10).any():
            return x.clamp(max=10)
        return x


class _ValueBranchInside(nn.Module):
    """Kept opaque while tracing; torch.export cannot capture it later."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), _ValueClamp(), nn.Linear(8, 8)
        )
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.body(x))


class _TwoHeads(Small):
    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


def _trace_a_value_branch(tmp_path):
    fxfuse.inspect(_ValueBranchAtRoot(), (torch.randn(3, 4),))


def _split_at_more_levels_than_cuts(tmp_path):
    fxfuse.split(Small(), (torch.randn(3, 4),), levels=9)


def _fuse_at_more_levels_than_cuts(tmp_path):
    fxfuse.fuse({"t": [Small(), Small(16)]}, (torch.randn(3, 4),), levels=9)


def _load_a_pickle(tmp_path):
    torch.save(Small(), tmp_path / "model.pt")
    load_model(str(tmp_path / "model.pt"))


def _load_a_fixed_batch_archive(tmp_path):
    program = torch.export.export(Small().eval(), (torch.randn(4, 4),))
    torch.export.save(program, tmp_path / "fixed.pt2")
    load_model(str(tmp_path / "fixed.pt2"))


def _fuse_a_model_with_two_outputs(tmp_path):
    fxfuse.fuse({"t": [_TwoHeads(), _TwoHeads(16)]}, (torch.randn(3, 4),))


def _export_a_member_kept_opaque(tmp_path):
    torch.manual_seed(0)
    members = [_ValueBranchInside().eval(), _ValueBranchInside().eval()]
    fused = fxfuse.fuse({"t": members}, (torch.randn(3, 4),), levels=2)
    fxfuse.export_pt2(fused, (torch.randn(3, 4),), tmp_path / "fused.pt2")


LIMITATION_TRIGGERS = {
    "tracing": [_trace_a_value_branch],
    "few-cut-points": [_split_at_more_levels_than_cuts, _fuse_at_more_levels_than_cuts],
    "pickled-models": [_load_a_pickle],
    "static-archives": [_load_a_fixed_batch_archive],
    "outputs": [_fuse_a_model_with_two_outputs],
    "export": [_export_a_member_kept_opaque],
}


def _fuse_models_smaller_than_one_fusion_layer(tmp_path):
    fxfuse.fuse({"a": [Small()], "b": [Small(16)]}, (torch.randn(3, 4),), levels=1)


# Limitations that fxfuse warns about and works through, rather than refuses.
LIMITATION_WARNINGS = {
    "small-models": [_fuse_models_smaller_than_one_fusion_layer],
}


def _limitation_entries() -> list[str]:
    text = (ROOT / "docs" / "limitations.md").read_text()
    return re.findall(r"^## (\S+)$", text, flags=re.MULTILINE)


def _each_trigger(triggers: dict):
    """Parametrize a test with (entry, trigger) for every trigger of every entry."""
    return pytest.mark.parametrize(
        "entry, trigger",
        [(e, t) for e, functions in triggers.items() for t in functions],
        ids=lambda v: v if isinstance(v, str) else v.__name__.strip("_"),
    )


@_each_trigger(LIMITATION_TRIGGERS)
def test_an_error_from_a_limitation_points_to_its_entry(tmp_path, entry, trigger):
    with pytest.raises(FxfuseError) as caught:
        trigger(tmp_path)
    assert caught.value.limitation == entry
    assert str(caught.value).endswith(f"(see docs/limitations.md#{entry})")
    assert entry in _limitation_entries()


@_each_trigger(LIMITATION_WARNINGS)
def test_a_warning_from_a_limitation_points_to_its_entry(tmp_path, entry, trigger):
    with pytest.warns(LimitationWarning) as caught:
        trigger(tmp_path)
    (warning,) = [w.message for w in caught if isinstance(w.message, LimitationWarning)]
    assert warning.limitation == entry
    assert str(warning).endswith(f"(see docs/limitations.md#{entry})")
    assert entry in _limitation_entries()


def test_every_limitation_has_an_entry_the_code_names_and_a_test():
    named = set()
    for path in (ROOT / "fxfuse").rglob("*.py"):
        named |= set(re.findall(r'limitation="([^"]+)"', path.read_text()))
    entries = _limitation_entries()
    tested = set(LIMITATION_TRIGGERS) | set(LIMITATION_WARNINGS)
    assert named == set(entries) == tested


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
        )

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_ctrl_c_during_training_leaves_a_checkpoint_the_next_run_resumes(tmp_path):
    paths = []
    for name in ("left", "right"):
        torch.manual_seed(len(name))
        program = torch.export.export(
            _TinyCNN().eval(),
            (torch.rand(4, 1, 36, 36),),
            dynamic_shapes=({0: DYNAMIC},),
        )
        torch.export.save(program, tmp_path / f"{name}.pt2")
        paths.append(tmp_path / f"{name}.pt2")
    out = tmp_path / "fused"
    fused = fxfuse_cli(
        "fuse",
        "--task",
        f"left={paths[0]}",
        "--task",
        f"right={paths[1]}",
        "--levels",
        "2",
        "-o",
        str(out),
    )
    assert fused.returncode == 0, fused.stderr
    train = [
        sys.executable,
        "-m",
        "fxfuse",
        "-v",
        "train",
        str(out),
        "--data",
        "multifashion",
        "--subset",
        "1024",
        # Enough epochs (each takes well under a second) that the interrupt
        # lands while training, not after it.
        "--epochs",
        "400",
        "--patience",
        "400",
        "--max-steps",
        "10",
        "--batch-size",
        "32",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(train, stderr=subprocess.PIPE, text=True, env=env)
    checkpoint = out / "train" / "last.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), "no checkpoint was written"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "the same command resumes from the last checkpoint" in err
    assert checkpoint.exists()

    resumed = subprocess.run(train, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stderr.lower()
    assert (out / "train" / "done.json").exists()

    # Running the finished command again trains nothing and says so.
    again = subprocess.run(train, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert "had already finished" in again.stdout
    assert "--restart" in again.stdout
    assert "saved into" not in again.stdout

    # ... and says so when it is given other settings, which it does not use.
    other_lr = subprocess.run(
        train + ["--lr", "0.5"], capture_output=True, text=True, env=env
    )
    assert other_lr.returncode == 0, other_lr.stderr
    assert "already finished with other settings (lr)" in other_lr.stderr

    # Other data than the run was trained on: refused, pointing at --restart.
    other = ["512" if arg == "1024" else arg for arg in train if arg != "-v"]
    refused = subprocess.run(other, capture_output=True, text=True, env=env)
    assert refused.returncode == 2, refused.stderr
    assert "1024 training and 256 validation rows" in refused.stderr
    assert "this run has 512 and 128" in refused.stderr
    assert "--restart" in refused.stderr
