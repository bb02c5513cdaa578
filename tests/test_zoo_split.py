"""Every zoo model (torchvision families, torch-rechub, the example models) is traced,
cut and split, and its chained stages reproduce it."""

import pytest
import torch

import fxfuse
from fxfuse.split import chain
from tools.zoo import all_models

MODELS = {entry.name: entry for entry in all_models()}
# The slowest models to trace and run on 2 CPU cores.
SLOW = {"maxvit_t", "vit_b_16", "densenet121", "wide_resnet50_2", "resnext50_32x4d"}


def test_the_zoo_covers_every_required_family():
    families = {entry.family for entry in MODELS.values()}
    required = {"resnet", "resnext", "wide_resnet", "mobilenet_v2", "mobilenet_v3"}
    required |= {"efficientnet", "efficientnet_v2", "regnet", "convnext", "vit"}
    required |= {"swin", "maxvit", "densenet", "squeezenet", "shufflenet", "mnasnet"}
    required |= {"googlenet", "inception", "alexnet", "vgg", "rechub"}
    assert required <= families, required - families
    torchvision = [e for e in MODELS.values() if e.family not in ("rechub",)]
    torchvision = [e for e in torchvision if not e.name.startswith("multifashion")]
    assert len(torchvision) >= 25


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in MODELS],
)
def test_chained_stages_reproduce_the_model(name):
    entry = MODELS[name]
    model, inputs = entry.build(), entry.example_inputs()
    report = fxfuse.inspect(model, inputs, levels=3)

    assert len(report.stages) == len(report.chosen) + 1
    assert report.chosen, "no cut chosen"
    with torch.no_grad():
        want = model(*inputs)
        got = chain(report.stages, *inputs)
    assert (got - want).abs().max().item() <= 1e-6
    # Stages keep the original parameter names.
    names = {n for stage in report.stages for n, _ in stage.named_parameters()}
    assert names <= {n for n, _ in model.named_parameters()}


def test_rechub_models_need_a_later_tier():
    for entry in MODELS.values():
        if entry.family == "rechub":
            report = fxfuse.inspect(entry.build(), entry.example_inputs())
            assert report.tier == "export", entry.name
