"""fuse(input_map=...) and `fxfuse fuse --input-map`: a model reads a fused dict
input under its own key name; the mapping is in the generated code, survives
save/load, and every mismatch names both sides."""

import pytest
import torch

import fxfuse
from examples.census.models import TabularMLP
from fxfuse.cli import _input_map, main
from fxfuse.errors import FuseError, InputError

SPARSE = {"shop": 11, "city": 7}


def _features(batch: int = 6, seed: int = 0, age: str = "age") -> dict:
    """Census-like features; the age column under the key `age`."""
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randint(0, v, (batch,), generator=g) for k, v in SPARSE.items()}
    x.update(
        {"price": torch.rand(batch, generator=g), age: torch.rand(batch, generator=g)}
    )
    return x


def _as_years(features: dict) -> dict:
    """The same features with the age column under the key "years"."""
    renamed = {k: v for k, v in features.items() if k != "age"}
    return renamed | {"years": features["age"]}


def _models() -> tuple[TabularMLP, TabularMLP]:
    """Two models of one task: one reads "age", the other the same column as "years"."""
    torch.manual_seed(0)
    ages = TabularMLP(SPARSE, ["price", "age"], (8, 8)).eval()
    years = TabularMLP(SPARSE, ["price", "years"], (16, 8)).eval()
    return ages, years


def _mean_on_own_keys(ages, years, features: dict) -> torch.Tensor:
    with torch.no_grad():
        return (ages(features) + years(_as_years(features))) / 2


def test_models_reading_a_column_under_different_names_start_as_their_mean(tmp_path):
    ages, years = _models()
    fused = fxfuse.fuse(
        {"income": {"ages": ages, "years": years}},
        (_features(),),
        levels=2,
        input_map={"income_years": {"years": "age"}},
    )
    other = _features(9, seed=3)
    want = _mean_on_own_keys(ages, years, other)

    with torch.no_grad():
        got = fused(other)["income"]
    assert (got - want).abs().max() <= 1e-6
    renaming = "income_years_x = fxfuse_inputs_rename_keys(x, {'years': 'age'})"
    assert renaming in fused.code
    assert "years" not in other  # the caller's dict is not written into
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(fused)(other)["income"], got)
    assert fused.fusion_info.models[1].inputs == {"years": "age"}

    fxfuse.save(fused, tmp_path / "art")
    loaded = fxfuse.load(tmp_path / "art")
    with torch.no_grad():
        assert (loaded(other)["income"] - want).abs().max() <= 1e-6
    assert loaded.fusion_info == fused.fusion_info


def test_without_the_map_the_error_names_the_models_key_and_the_fused_keys():
    ages, years = _models()
    with pytest.raises(
        InputError,
        match=r"reads input 'years'.*they have: shop.*age.*--input-map "
        r"income_years:ITS_KEY=FUSED_KEY",
    ):
        fxfuse.fuse({"income": {"ages": ages, "years": years}}, (_features(),))


def test_a_map_to_a_fused_key_that_is_not_there_names_both_sides():
    ages, years = _models()
    with pytest.raises(
        InputError,
        match=r"income_years expects 'years' from fused input 'agee'.*"
        r"they have: shop, city, price, age",
    ):
        fxfuse.fuse(
            {"income": {"ages": ages, "years": years}},
            (_features(),),
            input_map={"income_years": {"years": "agee"}},
        )


def test_a_map_for_an_unknown_model_lists_the_models():
    ages, years = _models()
    with pytest.raises(
        FuseError,
        match=r"unknown models \['years'\].*\['income_ages', 'income_years'\]",
    ):
        fxfuse.fuse(
            {"income": {"ages": ages, "years": years}},
            (_features(),),
            input_map={"years": {"years": "age"}},
        )


def _archive(model, features: dict, path) -> str:
    dynamic = ({k: {0: torch.export.Dim.AUTO} for k in features},)
    program = torch.export.export(model, (features,), dynamic_shapes=dynamic)
    torch.export.save(program, path)
    return str(path)


def test_cli_fuse_with_input_map_gives_the_mean_of_the_models(tmp_path, capsys):
    ages, years = _models()
    inputs = _features()
    first = _archive(ages, inputs, tmp_path / "ages.pt2")  # stores the fused inputs
    second = _archive(years, _as_years(inputs), tmp_path / "years.pt2")
    fuse = ["fuse", "--task", f"income={first},{second}", "--levels", "2"]

    code = main(
        [*fuse, "--input-map", "income_years:years=age", "-o", str(tmp_path / "art")]
    )
    assert code == 0
    assert "income_years" in capsys.readouterr().out
    fused = fxfuse.load(tmp_path / "art")
    other = _features(5, seed=7)
    with torch.no_grad():
        got = fused(other)["income"]
    assert (got - _mean_on_own_keys(ages, years, other)).abs().max() <= 1e-6

    assert (
        main([*fuse, "--input-map", "income_years=age", "-o", str(tmp_path / "b")]) == 2
    )
    assert "is not MODEL:ITS_KEY=FUSED_KEY" in capsys.readouterr().err


def test_a_key_mapped_twice_for_one_model_is_refused():
    with pytest.raises(InputError, match="maps key 'years' of model m twice"):
        _input_map(["m:years=age,years=shop"], {"m": "m"})
