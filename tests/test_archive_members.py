""".pt2 archives as models: each takes exactly the dict keys it was exported with, so
it is given only its own keys of the fused dict (the union of the models' keys), in
the generated code, after save/load, alone and in exports; the command line names it
as `fuse` does, whatever the case of its file name."""

import onnxruntime
import pytest
import torch

import fxfuse
from examples.census.models import TabularMLP
from fxfuse.cli import main
from fxfuse.errors import InputError
from fxfuse.generate import Average, members_alone
from fxfuse.load import load_model

SHOPS = 11


def _features(keys, batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """A column per key: shop ids, other columns dense."""
    g = torch.Generator().manual_seed(seed)
    return {
        key: (
            torch.randint(0, SHOPS, (batch,), generator=g)
            if key == "shop"
            else torch.rand(batch, generator=g)
        )
        for key in keys
    }


def _archive(model, keys, path) -> str:
    """`model` exported on a dict of exactly `keys`, with a dynamic batch."""
    inputs = _features(keys)
    dynamic = ({key: {0: torch.export.Dim.AUTO} for key in inputs},)
    program = torch.export.export(model, (inputs,), dynamic_shapes=dynamic)
    torch.export.save(program, path)
    return str(path)


def _models() -> tuple[TabularMLP, TabularMLP]:
    """One model reads age and shop, the other shop and price."""
    torch.manual_seed(0)
    ages = TabularMLP({"shop": SHOPS}, ["age"], (8, 8)).eval()
    prices = TabularMLP({"shop": SHOPS}, ["price"], (16, 8)).eval()
    return ages, prices


UNION = ["age", "shop", "price"]


def _own_outputs(ages, prices, features: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {
            "income": ages({k: features[k] for k in ("age", "shop")}),
            "married": prices({k: features[k] for k in ("shop", "price")}),
        }


def _assert_own_outputs(model, ages, prices, features: dict) -> None:
    with torch.no_grad():
        got = model(features)
    for task, want in _own_outputs(ages, prices, features).items():
        assert (got[task] - want).abs().max() <= 1e-6, task


def test_archives_reading_different_keys_each_get_their_own_keys(tmp_path):
    ages, prices = _models()
    one = load_model(_archive(ages, ["age", "shop"], tmp_path / "one.pt2"))
    two = load_model(_archive(prices, ["shop", "price"], tmp_path / "two.pt2"))

    fused = fxfuse.fuse(
        {"income": [one], "married": [two]}, (_features(UNION),), levels=2
    )
    other = _features(UNION, batch=9, seed=3)

    _assert_own_outputs(fused, ages, prices, other)
    assert "income_one_x = fxfuse_inputs_select_keys(x, ['age', 'shop'])" in (
        fused.code
    )
    assert [m.selected_keys for m in fused.fusion_info.models] == [
        [["age", "shop"]],
        [["shop", "price"]],
    ]
    assert list(other) == UNION  # the caller's dict is not written into
    alone = members_alone(fused)
    with torch.no_grad():
        assert torch.equal(alone["income_one"](other)["income"], fused(other)["income"])
        assert torch.equal(Average(fused)(other)["married"], fused(other)["married"])

    fxfuse.save(fused, tmp_path / "art")
    loaded = fxfuse.load(tmp_path / "art")
    assert loaded.fusion_info == fused.fusion_info
    _assert_own_outputs(loaded, ages, prices, other)


def test_python_models_keep_the_whole_dict():
    ages, prices = _models()
    fused = fxfuse.fuse({"income": [ages], "married": [prices]}, (_features(UNION),))

    assert "select_keys" not in fused.code
    assert all(m.selected_keys == [] for m in fused.fusion_info.models)
    _assert_own_outputs(fused, ages, prices, _features(UNION, batch=5, seed=1))


def test_an_archive_with_a_renamed_key_is_renamed_then_cut_to_its_keys(tmp_path):
    torch.manual_seed(0)
    years = TabularMLP({"shop": SHOPS}, ["years"], (8, 8)).eval()
    archive = load_model(_archive(years, ["shop", "years"], tmp_path / "years.pt2"))

    fused = fxfuse.fuse(
        {"income": [archive]},
        (_features(UNION),),
        levels=1,
        input_map={"income_years": {"years": "age"}},
    )

    code = fused.code
    assert "income_years_x_renamed = fxfuse_inputs_rename_keys(x, {'years'" in code
    assert "income_years_x = fxfuse_inputs_select_keys(income_years_x_renamed" in (code)
    other = _features(UNION, batch=7, seed=2)
    with torch.no_grad():
        want = years({"shop": other["shop"], "years": other["age"]})
        assert torch.equal(fused(other)["income"], want)
        assert torch.equal(torch.fx.symbolic_trace(fused)(other)["income"], want)


def test_an_archive_missing_a_key_names_the_key_and_the_fused_keys(tmp_path):
    ages, _ = _models()
    archive = load_model(_archive(ages, ["age", "shop"], tmp_path / "one.pt2"))

    with pytest.raises(
        InputError,
        match=r"income_one .*takes dict input keys age, shop, but the fused inputs "
        r"lack age \(they have: shop, price\).*--input-map income_one:age=FUSED_KEY",
    ):
        fxfuse.fuse({"income": [archive]}, (_features(["shop", "price"]),), levels=1)


def test_exports_of_archives_reading_different_keys_match_eager(tmp_path):
    ages, prices = _models()
    one = load_model(_archive(ages, ["age", "shop"], tmp_path / "one.pt2"))
    two = load_model(_archive(prices, ["shop", "price"], tmp_path / "two.pt2"))
    fused = fxfuse.fuse(
        {"income": [one], "married": [two]}, (_features(UNION),), levels=1
    )

    report = fxfuse.export_onnx(fused, None, tmp_path / "fused.onnx")
    assert report.passed and report.input_names == UNION
    features = _features(UNION, batch=5, seed=4)
    session = onnxruntime.InferenceSession(str(tmp_path / "fused.onnx"))
    income, married = session.run(
        ["income", "married"], {k: v.numpy() for k, v in features.items()}
    )
    want = _own_outputs(ages, prices, features)
    assert abs(income - want["income"].numpy()).max() <= 1e-5
    assert abs(married - want["married"].numpy()).max() <= 1e-5
    assert fxfuse.export_pt2(fused, None, tmp_path / "fused.pt2").passed


def test_cli_fuses_archives_reading_different_keys(tmp_path, capsys):
    ages, prices = _models()
    one = _archive(ages, ["age", "shop"], tmp_path / "one.pt2")
    two = _archive(prices, ["shop", "price"], tmp_path / "two.pt2")
    inputs = tmp_path / "inputs.pt"
    torch.save(_features(UNION), inputs)

    code = main(
        [
            *("fuse", "--task", f"income={one}", "--task", f"married={two}"),
            *("--example-inputs", str(inputs), "-o", str(tmp_path / "art")),
        ]
    )

    assert code == 0, capsys.readouterr().err
    fused = fxfuse.load(tmp_path / "art")
    _assert_own_outputs(fused, ages, prices, _features(UNION, batch=4, seed=8))


@pytest.mark.parametrize("absolute", [False, True], ids=["file", "absolute-path"])
def test_cli_cuts_name_an_upper_case_file_as_fuse_names_its_model(
    tmp_path, monkeypatch, capsys, absolute
):
    ages, _ = _models()
    torch.manual_seed(1)
    wide = TabularMLP({"shop": SHOPS}, ["age"], (16, 8)).eval()
    _archive(ages, ["age", "shop"], tmp_path / "one.pt2")
    _archive(wide, ["age", "shop"], tmp_path / "MLP8.pt2")
    monkeypatch.chdir(tmp_path)
    folder = f"{tmp_path}/" if absolute else ""
    fuse = ["fuse", "--task", f"income={folder}one.pt2,{folder}MLP8.pt2"]

    code = main([*fuse, "--levels", "1", "--cuts", "MLP8.pt2=mlp.0", "-o", "art"])

    assert code == 0, capsys.readouterr().err
    models = fxfuse.load("art").fusion_info.models
    assert [(m.name, m.cut_modules) for m in models] == [
        ("income_one", ["mlp"]),
        ("income_mlp8", ["mlp.0"]),
    ]
