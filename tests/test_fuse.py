"""fuse(): at initialisation each task predicts the mean of its models; frozen stages
stay frozen; the generated code reads like a forward; artifacts round-trip."""

import warnings

import pytest
import torch
from torch import nn

import fxfuse
from examples.census.models import TabularMLP
from examples.multifashion.models import SmallResNet, SmallViT
from fxfuse.errors import ArtifactError, FuseError, InputError
from fxfuse.generate import LargeFusionWarning
from fxfuse.load import load_model
from tools.zoo import census_rechub_features

SPARSE = {"shop": 11, "city": 7, "brand": 13}
DENSE = ["price", "age"]


def _features(batch: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {k: torch.randint(0, v, (batch,), generator=g) for k, v in SPARSE.items()}
    x.update({k: torch.rand(batch, generator=g) for k in DENSE})
    return x


def _trained_like(model: nn.Module, seed: int) -> nn.Module:
    """Random but non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_features(64, seed))
    return model.eval()


def _mean_of(models, inputs):
    with torch.no_grad():
        return torch.stack([m(*inputs) for m in models]).mean(0)


def test_two_mlps_of_different_widths_per_task_start_as_their_mean():
    models = {
        "income": [
            _trained_like(TabularMLP(SPARSE, DENSE, (8, 8)), 0),
            _trained_like(TabularMLP(SPARSE, DENSE, (16, 8)), 1),
        ],
        "married": [
            _trained_like(TabularMLP(SPARSE, DENSE, (8, 8)), 2),
            _trained_like(TabularMLP(SPARSE, DENSE, (16, 8)), 3),
        ],
    }
    inputs = (_features(),)
    fused = fxfuse.fuse(models, inputs, levels=3)
    other = (_features(9, seed=5),)
    with torch.no_grad():
        out = fused(*other)
    for task, members in models.items():
        assert (out[task] - _mean_of(members, other)).abs().max() <= 1e-5


def test_a_cnn_and_a_vit_on_the_same_image_start_as_their_mean():
    torch.manual_seed(0)
    cnn, vit = SmallResNet(num_classes=10).eval(), SmallViT(num_classes=10).eval()
    image = (torch.rand(4, 1, 36, 36),)
    fused = fxfuse.fuse({"left": [cnn, vit]}, image, levels=3)
    akf = fused.fusion1
    layouts = {m.name: m.channel_dim for m in akf.members}
    assert layouts == {"left_smallresnet": 1, "left_smallvit": -1}
    other = (torch.rand(5, 1, 36, 36),)
    with torch.no_grad():
        assert (fused(*other)["left"] - _mean_of([cnn, vit], other)).abs().max() <= 1e-5


def test_rechub_dcn_and_deepfm_on_the_same_features_start_as_their_mean():
    from torch_rechub.models.ranking import DCN, DeepFM

    sparse, dense = census_rechub_features(SPARSE, DENSE)
    torch.manual_seed(0)
    dcn = DCN(sparse + dense, n_cross_layers=2, mlp_params={"dims": [16, 8]}).eval()
    sparse2, dense2 = census_rechub_features(SPARSE, DENSE)
    deepfm = DeepFM(dense2 + sparse2, sparse2, mlp_params={"dims": [16, 8]}).eval()
    inputs = (_features(),)
    # DeepFM's wide and deep branches meet only at its logit: its one cut point,
    # named, makes it join the last level only.
    (logit,) = fxfuse.inspect(deepfm, inputs).cut_points
    fused = fxfuse.fuse(
        {"income": {"dcn": dcn, "deepfm": deepfm}},
        inputs,
        levels=2,
        cuts={"income_deepfm": [logit.node]},
    )
    assert [m.levels for m in fused.fusion_info.models] == [[1, 2], [2]]
    assert len(fused.fusion1.members) == 1 and len(fused.fusion2.members) == 2
    other = (_features(7, seed=3),)
    with torch.no_grad():
        want = _mean_of([dcn, deepfm], other)
        assert (fused(*other)["income"] - want).abs().max() <= 1e-5


def test_three_tasks_with_one_two_and_three_models():
    def mlp(seed, width):
        return _trained_like(TabularMLP(SPARSE, DENSE, (width, 8)), seed)

    models = {
        "a": [mlp(0, 8)],
        "b": [mlp(1, 8), mlp(2, 16)],
        "c": [mlp(3, 8), mlp(4, 12), mlp(5, 16)],
    }
    fused = fxfuse.fuse(models, (_features(),), levels=2)
    other = (_features(8, seed=9),)
    with torch.no_grad():
        out = fused(*other)
        assert torch.equal(out["a"], models["a"][0](*other))
    for task in "bc":
        assert (out[task] - _mean_of(models[task], other)).abs().max() <= 1e-5
    assert sorted(out) == ["a", "b", "c"]


def test_training_step_changes_akf_but_not_frozen_weights_or_batchnorm_stats():
    models = {
        "t": [
            _trained_like(TabularMLP(SPARSE, DENSE, (8, 8)), 0),
            _trained_like(TabularMLP(SPARSE, DENSE, (16, 8)), 1),
        ],
        "u": [_trained_like(TabularMLP(SPARSE, DENSE, (8, 8)), 2)],
    }
    fused = fxfuse.fuse(models, (_features(),), levels=2)
    frozen = {k: v.clone() for k, v in fused.state_dict().items() if k.startswith("t_")}
    fused.fusion2.writers[0].weight.data.normal_()  # let gradients reach everything
    akf_before = {k: v.clone() for k, v in fused.named_parameters() if "fusion" in k}

    fused.train()
    optimizer = torch.optim.SGD([p for p in fused.parameters() if p.requires_grad], 0.1)
    batch = _features(32, seed=4)
    out = fused(batch)
    loss = sum(o.sum() for o in out.values())
    loss.backward()
    optimizer.step()

    after = fused.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any("running_mean" in k for k in frozen)
    changed = [
        k
        for k, v in fused.named_parameters()
        if "fusion" in k and not torch.equal(v, akf_before[k])
    ]
    assert len(changed) > 10
    assert not fused.t_tabularmlp1.training and fused.fusion1.training


def test_fusion_larger_than_its_models_is_warned_about_with_its_size():
    models = {
        "a": [TabularMLP(SPARSE, DENSE, (8, 8)).eval()],
        "b": [TabularMLP(SPARSE, DENSE, (16, 8)).eval()],
    }
    with pytest.warns(LargeFusionWarning) as caught:
        fused = fxfuse.fuse(models, (_features(),), levels=2, width=64)

    fusion = sum(
        p.numel() for n, p in fused.named_parameters() if n.startswith("fusion")
    )
    text = str(caught[0].message)
    assert f"add {fusion:,} parameters" in text
    assert "--width" in text and "--levels" in text

    with pytest.warns(LargeFusionWarning) as caught:
        fxfuse.fuse(models, (_features(),), levels=1, width=64)
    assert "--width" in str(caught[0].message)
    assert "--levels" not in str(caught[0].message)  # one level is the fewest


def test_fusion_smaller_than_its_models_gives_no_size_warning():
    def wide() -> nn.Module:
        return nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 1)).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("error", LargeFusionWarning)
        inputs = (torch.randn(4, 32),)
        fused = fxfuse.fuse({"a": [wide()], "b": [wide()]}, inputs, levels=1, width=8)
    fusion = sum(p.numel() for n, p in fused.named_parameters() if "fusion" in n)
    assert 0 < fusion < sum(p.numel() for p in fused.parameters()) - fusion


def test_generated_code_reads_like_a_forward():
    models = {
        "income": {
            "small": TabularMLP(SPARSE, DENSE, (8, 8)).eval(),
            "wide": TabularMLP(SPARSE, DENSE, (16, 8)).eval(),
        }
    }
    fused = fxfuse.fuse(models, (_features(),), levels=2)
    code = fused.code
    assert "income_small_cut1 = self.income_small.stage0(x)" in code
    assert "fusion1 = self.fusion1(income_small_cut1, income_wide_cut1)" in code
    assert "income = self.mix_income(income_small_out, income_wide_out)" in code
    assert "return {'income': income}" in code
    assert "getattr" not in code


def test_unmatched_inputs_name_both_sides():
    model = TabularMLP({**SPARSE, "coupon": 4}, DENSE).eval()
    with pytest.raises(InputError, match="reads input 'coupon'.*they have: shop"):
        fxfuse.fuse({"t": [model]}, (_features(),), levels=2)


def test_predictions_of_one_task_must_match_in_shape():
    torch.manual_seed(0)
    a = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    b = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    )
    with pytest.raises(FuseError, match="predict different shapes"):
        fxfuse.fuse({"t": [a.eval(), b.eval()]}, (torch.randn(4, 4),), levels=2)


def test_empty_task_and_repeated_model_are_refused():
    model = TabularMLP(SPARSE, DENSE).eval()
    with pytest.raises(FuseError, match="task 'b' has no model"):
        fxfuse.fuse({"a": [model], "b": []}, (_features(),))
    with pytest.raises(FuseError, match="given twice"):
        fxfuse.fuse({"a": [model], "b": [model]}, (_features(),))


@pytest.mark.parametrize("spelling", ["./a.pt2", "{folder}/a.pt2", "../{name}/a.pt2"])
def test_the_same_model_file_spelled_another_way_is_refused(
    tmp_path, monkeypatch, spelling
):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    dynamic = ({0: torch.export.Dim.AUTO},)
    program = torch.export.export(model, (torch.randn(4, 4),), dynamic_shapes=dynamic)
    torch.export.save(program, tmp_path / "a.pt2")
    monkeypatch.chdir(tmp_path)
    other = spelling.format(folder=tmp_path, name=tmp_path.name)

    tasks = {"a": [load_model("a.pt2")], "b": [load_model(other)]}
    with pytest.raises(
        FuseError, match=r"a\.pt2' is given twice \(tasks 'a' and 'b'\)"
    ):
        fxfuse.fuse(tasks, (torch.randn(4, 4),), levels=1)


def _small_mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 8), nn.ReLU(), nn.Linear(8, 1)
    ).eval()


def test_fused_model_is_traced_again_by_fx_symbolic_trace():
    torch.manual_seed(0)
    models = {"a": [_small_mlp(8), _small_mlp(16)], "b": [_small_mlp(8)]}
    fused = fxfuse.fuse(models, (torch.randn(6, 4),), levels=2)
    with torch.no_grad():  # let the fusion and the mixing change the outputs
        for p in [*fused.fusion1.parameters(), *fused.mix_a.parameters()]:
            p.add_(0.1 * torch.randn_like(p))

    traced = torch.fx.symbolic_trace(fused)

    assert any(n.target is torch.stack for n in traced.graph.nodes)  # AKF inlined
    other = torch.randn(5, 4)
    with torch.no_grad():
        want, got = fused(other), traced(other)
    assert list(got) == ["a", "b"]
    for task in want:
        assert torch.equal(got[task], want[task]), task
    assert (want["a"] - _mean_of(models["a"], (other,))).abs().max() > 1e-3


def test_levels_above_the_cut_points_say_how_many_there_are():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)).eval()
    with pytest.raises(
        FuseError, match="has 2 cut points.*--levels 2 or fewer.*--cuts"
    ):
        fxfuse.fuse({"t": [model]}, (torch.randn(4, 4),), levels=3)


def test_artifact_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    models = {
        "left": [SmallResNet(num_classes=10).eval(), SmallViT(num_classes=10).eval()]
    }
    fused = fxfuse.fuse(models, (torch.rand(4, 1, 36, 36),), levels=2)
    with torch.no_grad():
        for p in fused.fusion1.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fxfuse.save(fused, tmp_path / "art")
    loaded = fxfuse.load(tmp_path / "art")
    other = torch.rand(3, 1, 36, 36)
    with torch.no_grad():
        assert torch.equal(fused(other)["left"], loaded(other)["left"])
    assert loaded.fusion_info == fused.fusion_info
    with pytest.raises(ArtifactError, match="already exists.*--force"):
        fxfuse.save(fused, tmp_path / "art")


def test_fxfuse_fuse_starts_the_fusion_modules_from_its_seed(tmp_path, capsys):
    from safetensors.torch import load_file

    from fxfuse.cli import main
    from tests.test_cli_errors import _tiny_archive

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = _tiny_archive(tmp_path / "a"), _tiny_archive(tmp_path / "b")

    def fusion_weights(*extra: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"fused{len(list(tmp_path.iterdir()))}"
        argv = ["fuse", "--task", f"a={a}", "--task", f"b={b}", "-o", str(out)]
        assert main([*argv, "--levels", "1", "--width", "8", *extra]) == 0
        return load_file(out / "fusion.safetensors")

    first, again, other = (
        fusion_weights(),
        fusion_weights(),
        fusion_weights("--seed", "1"),
    )
    readers = [k for k in first if "readers" in k]
    assert readers and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in readers)


def test_unfreeze_heads_trains_the_head_even_when_the_last_cut_is_the_logit():
    models = {
        "a": [TabularMLP(SPARSE, DENSE, (8, 8)).eval()],
        "b": [TabularMLP(SPARSE, DENSE, (16, 8)).eval()],
    }
    fused = fxfuse.fuse(models, (_features(),), levels=3, width=8)
    names = [m.name for m in fused.fusion_info.models]
    last_stages = [fxfuse.generate.stages_of(fused, n)[-1] for n in names]
    assert not any(p.numel() for s in last_stages for p in s.parameters())

    fxfuse.unfreeze(fused, "heads")
    for name in names:
        trainable = {
            n.split(".", 1)[1]
            for n, p in fused.get_submodule(name).named_parameters()
            if p.requires_grad
        }
        assert "head.weight" in trainable and "head.bias" in trainable
        assert not any(n.startswith("embeddings") for n in trainable)

    fxfuse.unfreeze(fused, "all")
    assert all(p.requires_grad for p in fused.parameters())
