"""The model zoo: every model builds, runs and is reproducible; the MultiFashion
examples trace whole with torch.fx."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from tools.zoo import (
    SYNTHETIC_SPARSE,
    ZooModel,
    all_models,
    census_rechub_features,
    multifashion_models,
    rechub_models,
    torchvision_models,
)

ZOO = all_models()
BY_NAME = {entry.name: entry for entry in ZOO}


def _params(entries: list[ZooModel]) -> list:
    return [
        pytest.param(
            entry, id=entry.name, marks=[pytest.mark.slow] if entry.slow else []
        )
        for entry in entries
    ]


@pytest.mark.parametrize("entry", _params(ZOO))
def test_model_builds_in_eval_mode_and_gives_finite_batch_output(entry):
    model = entry.build()
    inputs = entry.example_inputs()

    with torch.no_grad():
        output = model(*inputs)

    assert not model.training
    assert isinstance(inputs, tuple)
    assert output.shape[0] == 2
    assert torch.isfinite(output).all()


def test_zoo_covers_every_torchvision_family_with_unique_names():
    families = {entry.family for entry in torchvision_models()}
    expected = {
        "resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3",
        "efficientnet", "efficientnet_v2", "regnet", "convnext", "vit", "swin",
        "maxvit", "densenet", "squeezenet", "shufflenet", "mnasnet", "googlenet",
        "inception", "alexnet", "vgg",
    }  # fmt: skip

    assert expected <= families
    assert len(torchvision_models()) >= 28
    assert len(BY_NAME) == len(ZOO)


def test_build_is_reproducible_and_seed_gives_other_weights():
    entry = BY_NAME["multifashion_resnet"]

    first = entry.build().state_dict()
    again = entry.build().state_dict()
    other = entry.build(seed=1).state_dict()

    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_build_leaves_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)

    torch.manual_seed(123)
    BY_NAME["squeezenet1_1"].build()
    actual = torch.rand(3)

    assert torch.equal(actual, expected)


def test_rechub_models_built_twice_do_not_share_embedding_tables():
    entry = BY_NAME["mmoe"]
    first, second = entry.build(), entry.build()

    table_a = first.embedding.embed_dict["sparse_0"].weight
    table_b = second.embedding.embed_dict["sparse_0"].weight

    assert table_a is not table_b
    assert torch.equal(table_a, table_b)  # same seed, separate storage
    with torch.no_grad():
        table_a.add_(1.0)
    assert not torch.equal(table_a, table_b)


def test_census_rechub_features_returns_new_objects_each_call():
    sparse_a, dense_a = census_rechub_features(SYNTHETIC_SPARSE, ["age"], embed_dim=3)
    sparse_b, _ = census_rechub_features(SYNTHETIC_SPARSE, ["age"], embed_dim=3)

    assert [f.name for f in sparse_a] == list(SYNTHETIC_SPARSE)
    assert [f.vocab_size for f in sparse_a] == list(SYNTHETIC_SPARSE.values())
    assert {f.embed_dim for f in sparse_a} == {3}
    assert [f.name for f in dense_a] == ["age"]
    assert sparse_a[0].get_embedding_layer() is not sparse_b[0].get_embedding_layer()


def test_rechub_inputs_are_a_dict_of_batch_vectors_within_vocabulary():
    (inputs,) = rechub_models()[0].example_inputs()

    for name, vocab in SYNTHETIC_SPARSE.items():
        assert inputs[name].dtype == torch.int64
        assert inputs[name].shape == (2,)
        assert 0 <= inputs[name].min() and inputs[name].max() < vocab
    dense = [value for name, value in inputs.items() if name.startswith("dense")]
    assert dense and all(value.dtype == torch.float32 for value in dense)


@pytest.mark.parametrize("entry", _params(multifashion_models()))
def test_multifashion_model_traces_whole_and_matches_in_channels_last(entry):
    model = entry.build()
    (images,) = entry.example_inputs()

    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(images)
        from_graph = traced(images)
        channels_last = model.to(memory_format=torch.channels_last)(
            images.to(memory_format=torch.channels_last)
        )

    assert expected.shape == (2, 10)
    torch.testing.assert_close(from_graph, expected)
    torch.testing.assert_close(channels_last, expected, atol=1e-5, rtol=1e-4)
