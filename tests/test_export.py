"""Export to ONNX and .pt2: names, dynamic batch, parity, side file, eval mode.

Each fused model is built and exported once per module (fixtures); the tests then
read the written files back with onnx, ONNX Runtime and torch.export, independently
of the report the exporter returns.
"""

import errno
import importlib.util
import json
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import fxfuse
from fxfuse.cli import main
from fxfuse.errors import ExportError
from fxfuse.export import ExportReport, export, export_onnx, export_pt2
from fxfuse.load import load_model
from tools.bench_export import census_fused, vision_fused

from .conftest import SHARED

# Fixtures fuse models whose fallback to the export tier is expected.
pytestmark = pytest.mark.filterwarnings("ignore::fxfuse.trace.FallbackWarning")

TOLERANCE = 1e-4

# A few Census-Income columns, with the names (and one hyphen) the data set uses.
SPARSE = {"class_of_worker": 9, "education": 17, "migration_code-change_in_msa": 10}
DENSE = ["age", "wage_per_hour"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the small models here run faster that way, and the
    tests stay quick on a busy machine where threads wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------- models


def census_inputs(batch: int = 8, seed: int = 0) -> tuple[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        name: torch.randint(vocab, (batch,), generator=generator)
        for name, vocab in SPARSE.items()
    }
    inputs.update({name: torch.rand(batch, generator=generator) for name in DENSE})
    return (inputs,)


class ShopTower(nn.Module):
    """A plain dict model that torch.fx traces, to fuse with the shared case."""

    def __init__(self):
        super().__init__()
        self.shop = nn.Embedding(10, 4)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        h = torch.cat([self.shop(x["shop"]), x["price"].unsqueeze(1)], dim=1)
        return torch.sigmoid(self.head(self.body(h)))


def shared_case(name: str):
    path = SHARED / "cases" / "cases.py"
    if not path.exists():
        pytest.skip("../shared/cases is not there")
    spec = importlib.util.spec_from_file_location("shared_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["shared_cases"] = module
    spec.loader.exec_module(module)
    return module.CASES[name].build()


def branch_fused() -> tuple[torch.fx.GraphModule, tuple]:
    """The `dense_branch` case (captured by the export tier) fused with a plain model.

    The case's example batch of 4 is resampled to 8 rows: export-tier stages are
    split on those inputs.
    """
    torch.manual_seed(0)
    model, (inputs,) = shared_case("dense_branch")
    rows = torch.arange(8) % 4
    inputs = ({key: value[rows] for key, value in inputs.items()},)
    models = {"buy": {"branch": model.eval(), "tower": ShopTower().eval()}}
    return fxfuse.fuse(models, inputs, levels=2).eval(), inputs


class ImageTower(nn.Module):
    """A small model whose forward calls its input `image`."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 8), nn.ReLU()
        )
        self.head = nn.Linear(8, 2)

    def forward(self, image):
        return self.head(self.body(image))


def image_fused(tmp_path) -> torch.fx.GraphModule:
    """An ImageTower and one read back from a .pt2 archive, fused at one level, with
    fusion weights that change the outputs."""
    torch.manual_seed(0)
    archive = tmp_path / "tower.pt2"
    program = torch.export.export(
        ImageTower(16).eval(),
        (torch.randn(6, 4),),
        dynamic_shapes=({0: torch.export.Dim.AUTO},),
    )
    torch.export.save(program, archive)
    models = {"left": [ImageTower(8).eval(), load_model(str(archive))]}
    fused = fxfuse.fuse(models, (torch.randn(6, 4),), levels=1)
    with torch.no_grad():
        for p in fused.fusion1.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return fused


class Tampered(nn.Module):
    """Adds 1e-3 only while being exported: the exported file differs from eager
    PyTorch by exactly that much, on every run."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x):
        y = self.linear(x)
        if torch.compiler.is_exporting():
            y = y + 1e-3
        return {"score": y}


# --------------------------------------------------------------------- helpers


def resample(inputs: tuple, size: int, seed: int) -> tuple:
    """`size` rows drawn with replacement from the example batch."""
    batch = pytree.tree_leaves(inputs)[0].shape[0]
    rows = torch.randint(batch, (size,), generator=torch.Generator().manual_seed(seed))
    return pytree.tree_map(lambda t: t[rows], inputs)


def onnxruntime_outputs(path, inputs: tuple) -> dict[str, np.ndarray]:
    """Run the file with its inputs fed by name: the dict keys, or "x"."""
    (value,) = inputs
    named = value if isinstance(value, dict) else {"x": value}
    session = onnxruntime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]
    )
    feeds = {name: tensor.numpy() for name, tensor in named.items()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_matches_eager(model, path, inputs: tuple) -> None:
    with torch.no_grad():
        want = model(*inputs)
    got = onnxruntime_outputs(path, inputs)
    assert list(got) == list(want)
    for task, value in want.items():
        assert got[task].shape == tuple(value.shape), task
        assert np.abs(got[task] - value.numpy()).max() <= TOLERANCE, task


def graph_names(path) -> tuple[list[str], list[str]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


# ------------------------------------------- export tier, dict inputs (quick)


@pytest.fixture(scope="module")
def branch(tmp_path_factory):
    """The fused `dense_branch` case, exported to ONNX once."""
    fused, inputs = branch_fused()
    path = tmp_path_factory.mktemp("branch") / "fused.onnx"
    return fused, inputs, path, export_onnx(fused, inputs, path)


def test_stage_captured_by_the_export_tier_exports_to_onnx(branch):
    fused, inputs, path, report = branch

    assert {m.name: m.tier for m in fused.fusion_info.models}["buy_branch"] == "export"
    assert graph_names(path) == (["shop", "price"], ["buy"])
    assert (report.input_names, report.output_names) == (["shop", "price"], ["buy"])


def test_onnx_batch_dimension_is_dynamic_and_named_batch(branch):
    _, _, path, _ = branch
    graph = onnx.load(str(path), load_external_data=False).graph
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


@pytest.mark.parametrize("size", [3, 17])
def test_onnx_runtime_matches_eager_at_other_batch_sizes(branch, size):
    fused, inputs, path, _ = branch
    assert_matches_eager(fused, path, resample(inputs, size, seed=size))


def test_report_records_a_passed_check_per_batch_size(branch):
    _, _, path, report = branch

    assert isinstance(report, ExportReport)
    assert (report.path, report.format, report.passed) == (path, "onnx", True)
    assert report.tolerance == TOLERANCE
    assert [c.batch_size for c in report.checks] == [3, 17]
    for check in report.checks:
        assert list(check.max_abs_diff) == ["buy"]
        assert check.max_abs_diff["buy"] <= TOLERANCE
        assert check.torch_ms > 0 and check.runtime_ms > 0
    summary = report.summary()
    assert "batch  17: buy" in summary and "onnxruntime" in summary


def test_side_file_names_inputs_outputs_and_the_batch_dimension(branch):
    _, _, path, _ = branch
    side = json.loads(path.with_name("fused.onnx.json").read_text())

    assert side["inputs"] == [
        {"name": "shop", "dtype": "int64", "shape": ["batch"]},
        {"name": "price", "dtype": "float32", "shape": ["batch"]},
    ]
    assert side["outputs"] == [
        {"name": "buy", "dtype": "float32", "shape": ["batch", 1]}
    ]
    assert side["tolerance"] == TOLERANCE and side["passed"] is True
    assert [c["batch_size"] for c in side["checks"]] == [3, 17]


def test_export_leaves_no_temporary_files(branch):
    _, _, path, _ = branch
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "fused.onnx",
        "fused.onnx.json",
    ]


def test_model_loaded_from_an_artifact_exports_to_onnx(branch, tmp_path):
    fused, inputs, _, _ = branch
    fxfuse.save(fused, tmp_path / "artifact")
    loaded = fxfuse.load(tmp_path / "artifact").eval()  # stages read from .pt2

    export_onnx(loaded, None, tmp_path / "fused.onnx")

    assert graph_names(tmp_path / "fused.onnx") == (["shop", "price"], ["buy"])
    assert_matches_eager(fused, tmp_path / "fused.onnx", resample(inputs, 3, 3))


def test_onnx_input_is_named_after_the_models_forward_argument(tmp_path):
    fused = image_fused(tmp_path)  # forward(self, image), in Python and in a .pt2

    export_onnx(fused, None, tmp_path / "fused.onnx")

    session = onnxruntime.InferenceSession(
        str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert "def forward(self, image):" in fused.code


def test_models_that_name_their_input_differently_give_the_input_x():
    class Other(ImageTower):
        def forward(self, features):
            return self.head(self.body(features))

    models = {"left": [ImageTower(8).eval()], "right": [Other(8).eval()]}
    fused = fxfuse.fuse(models, (torch.randn(6, 4),), levels=1)

    assert fused.fusion_info.input_names == ["x"]


def test_cli_export_above_the_tolerance_exits_2_with_one_line(tmp_path, capsys):
    fxfuse.save(image_fused(tmp_path), tmp_path / "art")
    export_args = ["export", str(tmp_path / "art"), "-o"]

    # ONNX Runtime rounds differently from PyTorch: differences about 1e-7.
    code = main([*export_args, str(tmp_path / "tight.onnx"), "--tolerance", "1e-12"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fxfuse: error: ")
    assert "over the tolerance 1e-12" in err and "parity FAILED" in out

    assert main([*export_args, str(tmp_path / "fused.onnx")]) == 0
    out, err = capsys.readouterr()
    assert "parity passed (tolerance 1e-04)" in out and not err


# ---------------------------------------------------------------- census (slow)


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    # Per task a torch-rechub DCN and a small MLP on the same dict of features.
    fused = census_fused(SPARSE, DENSE, census_inputs())
    path = tmp_path_factory.mktemp("census") / "fused.onnx"
    return fused, path, export_onnx(fused, census_inputs(), path)


@pytest.mark.slow
def test_census_onnx_inputs_are_the_dict_keys_and_match_eager(census):
    fused, path, report = census
    inputs, outputs = graph_names(path)

    assert inputs == list(census_inputs()[0])  # "migration_code-change_in_msa" too
    assert outputs == ["income", "never_married"]
    assert report.passed
    for size in (3, 17):
        assert_matches_eager(fused, path, resample(census_inputs(), size, seed=size))
    side = json.loads(path.with_name("fused.onnx.json").read_text())
    assert [s["name"] for s in side["inputs"]] == inputs
    assert [s["shape"] for s in side["outputs"]] == [["batch"], ["batch"]]


@pytest.mark.slow
def test_census_pt2_round_trip_gives_the_same_outputs(census, tmp_path):
    fused, _, _ = census
    path = tmp_path / "fused.pt2"
    report = export(fused, None, path)  # the inputs the model was fused with

    module = torch.export.load(str(path)).module()
    inputs = resample(census_inputs(), 5, seed=1)
    with torch.no_grad():
        want, got = fused(*inputs), module(*inputs)
    assert list(got) == ["income", "never_married"]
    for task in want:
        assert torch.allclose(got[task], want[task], atol=TOLERANCE), task
    assert report.format == "pt2" and report.passed
    side = json.loads((tmp_path / "fused.pt2.json").read_text())
    assert [s["name"] for s in side["outputs"]] == ["income", "never_married"]


# ---------------------------------------------------------------- vision (slow)


@pytest.fixture(scope="module")
def vision(tmp_path_factory):
    fused = vision_fused()
    path = tmp_path_factory.mktemp("vision") / "fused.onnx"
    return fused, path, export_onnx(fused, fused.example_inputs, path)


@pytest.mark.slow
def test_vision_onnx_is_named_x_and_matches_eager(vision):
    fused, path, report = vision
    inputs, outputs = graph_names(path)

    assert inputs == ["x"] and outputs == ["left", "right"]
    assert report.passed
    for size in (3, 17):
        assert_matches_eager(fused, path, resample(fused.example_inputs, size, size))
    side = json.loads(path.with_name("fused.onnx.json").read_text())
    assert side["inputs"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 1, 36, 36]}
    ]
    assert side["outputs"][0]["shape"] == ["batch", 10]


@pytest.mark.slow
def test_vision_pt2_round_trip_gives_the_same_outputs(vision, tmp_path):
    fused, _, _ = vision
    export_pt2(fused, fused.example_inputs, tmp_path / "fused.pt2")

    module = torch.export.load(str(tmp_path / "fused.pt2")).module()
    inputs = resample(fused.example_inputs, 3, seed=3)
    with torch.no_grad():
        want, got = fused(*inputs), module(*inputs)
    for task in ("left", "right"):
        assert torch.allclose(got[task], want[task], atol=TOLERANCE), task


# ------------------------------------------------------------------ eval mode


def test_model_in_train_mode_is_exported_in_eval_mode_and_restored(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5))
    model.train()

    with pytest.warns(UserWarning, match="exported in eval mode; the model was in"):
        report = export_pt2(model, (torch.randn(6, 4),), tmp_path / "m.pt2")

    # Dropout and batch statistics would make the exported model disagree.
    assert report.passed
    assert model.training and all(m.training for m in model.modules())


def test_module_loaded_from_pt2_exports_without_a_mode_warning(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)).eval()
    export_pt2(model, (torch.randn(6, 4),), tmp_path / "a.pt2")
    loaded = torch.export.load(str(tmp_path / "a.pt2")).module()
    assert loaded.training  # its mode cannot be switched; it was fixed at export

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = export_pt2(loaded, (torch.randn(6, 4),), tmp_path / "b.pt2")
    assert report.passed


# ---------------------------------------------------------------------- errors


def test_unknown_suffix_raises_export_error_naming_it(tmp_path):
    with pytest.raises(ExportError, match=r"'\.bin'.*\.onnx.*\.pt2"):
        export(nn.Linear(2, 2), (torch.randn(2, 2),), tmp_path / "model.bin")
    assert not list(tmp_path.iterdir())


def test_parity_failure_raises_naming_the_output_and_keeps_the_report(tmp_path):
    path = tmp_path / "tampered.onnx"
    with pytest.raises(ExportError) as caught:
        export(Tampered().eval(), (torch.randn(4, 3),), path)

    message = str(caught.value)
    assert "'score'" in message and "batch 3" in message and "--tolerance" in message
    assert "0.001" in message
    report = caught.value.report
    assert not report.passed
    assert report.checks[0].max_abs_diff["score"] == pytest.approx(1e-3, rel=1e-2)
    assert graph_names(path) == (["input_0"], ["score"])
    side = json.loads(path.with_name("tampered.onnx.json").read_text())
    assert side["passed"] is False


def test_a_larger_tolerance_accepts_the_same_difference(tmp_path):
    report = export(
        Tampered().eval(), (torch.randn(4, 3),), tmp_path / "t.pt2", tolerance=1e-2
    )
    assert report.passed and report.tolerance == 1e-2


def test_an_output_folder_that_cannot_be_written_is_named_not_its_temporary(
    tmp_path, monkeypatch
):
    def read_only_folder(suffix=None, prefix=None, dir=None):
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/{prefix}abc123")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_folder)
    target = tmp_path / "fused.onnx"
    with pytest.raises(OSError) as caught:
        fxfuse.export._write_atomically(target, lambda path: path.write_text("x"))
    assert caught.value.filename == str(target)
    assert caught.value.errno == errno.EROFS
