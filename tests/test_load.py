"""Loading models and example inputs: safe by default, clear errors otherwise."""

import pickle

import pytest
import torch
from torch import nn

from fxfuse.errors import InputError, LoadError
from fxfuse.load import load_model, parse_example_inputs

DYNAMIC = torch.export.Dim.AUTO


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build_tiny():
    return Tiny()


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pt2_archive_loads_with_its_example_inputs(tmp_path):
    model = Tiny().eval()
    inputs = (torch.randn(3, 4),)
    path = tmp_path / "tiny.pt2"
    program = torch.export.export(model, inputs, dynamic_shapes=({0: DYNAMIC},))
    torch.export.save(program, path)
    loaded = load_model(str(path))
    assert loaded.name == "tiny"
    assert loaded.example_inputs[0].shape == (3, 4)
    assert torch.allclose(loaded.model(*inputs), model(*inputs))


def test_pt2_archive_with_a_fixed_batch_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(Tiny().eval(), (torch.randn(3, 4),)), path)
    with pytest.raises(LoadError, match="fixed batch size of 3.*Dim.AUTO"):
        load_model(str(path))


def test_factory_with_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    model = Tiny()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    spec = f"{__file__}:build_tiny@{tmp_path / 'w.safetensors'}"
    loaded = load_model(spec)
    x = torch.randn(2, 4)
    assert torch.equal(loaded.model(x), model.eval()(x))


def test_factory_with_mismatched_weights_names_the_keys(tmp_path):
    torch.save({"a.weight": torch.zeros(8, 4)}, tmp_path / "w.pt")
    with pytest.raises(LoadError, match="do not fit Tiny.*Missing key"):
        load_model(f"{__file__}:build_tiny@{tmp_path / 'w.pt'}")


def test_whole_module_pickle_is_refused_without_opt_in_and_runs_no_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Marker(str(marker))}, path)
    with pytest.raises(LoadError, match="--allow-pickle"):
        load_model(str(path))
    assert not marker.exists()


def test_whole_module_pickle_loads_with_opt_in(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(Tiny(), path)
    loaded = load_model(str(path), allow_pickle=True)
    assert isinstance(loaded.model, Tiny)


def test_state_dict_alone_asks_for_the_factory(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(Tiny().state_dict(), path)
    with pytest.raises(LoadError, match="state dict.*module:factory@"):
        load_model(str(path))


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"hello\n", "not a PyTorch file"), (None, "does not exist")],
)
def test_files_that_are_not_models(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LoadError, match=message):
        load_model(str(path))


def test_truncated_archive(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(Tiny().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(LoadError, match="damaged or truncated"):
        load_model(str(path))


def test_example_inputs_from_shapes_features_and_files(tmp_path):
    (x,) = parse_example_inputs("2x3x8x8")
    assert x.shape == (2, 3, 8, 8)
    (features,) = parse_example_inputs("shop=int10,price=float")
    assert features["shop"].dtype == torch.int64 and features["shop"].max() < 10
    assert features["price"].dtype == torch.float32
    torch.save({"a": torch.zeros(4, 2)}, tmp_path / "in.pt")
    (loaded,) = parse_example_inputs(str(tmp_path / "in.pt"))
    assert loaded["a"].shape == (4, 2)
    with open(tmp_path / "bad.pt", "wb") as f:
        pickle.dump(_Marker(str(tmp_path / "ran")), f)
    with pytest.raises(InputError):
        parse_example_inputs(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "ran").exists()


def test_a_batch_of_one_is_refused():
    with pytest.raises(InputError, match="batch smaller than 2"):
        parse_example_inputs("1x3x8x8")
