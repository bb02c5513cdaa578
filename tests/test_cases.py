"""The failure cases in ../shared/cases behave as their README says, and so does the
class of failure behind each."""

import collections
import importlib.util
import sys
import warnings

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import FxfuseError, PlanError, TraceFailure
from fxfuse.split import chain
from fxfuse.trace import FallbackWarning

from .conftest import SHARED


def _cases():
    path = SHARED / "cases" / "cases.py"
    if not path.exists():
        pytest.skip("../shared/cases is not there", allow_module_level=True)
    spec = importlib.util.spec_from_file_location("shared_cases", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["shared_cases"] = module
    spec.loader.exec_module(module)
    return module


cases = _cases()


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_shared_case_contract(name):
    cases.check_case(name, fxfuse.inspect, FxfuseError)


EXPECTED_TIERS = {
    "dense_branch": "export",
    "subclassed_leaf": "fx+leaves",
    "sized_constructor": "export",
    "star_args": "export",
    "slice_assign": "export",
    "tuple_middle": "fx",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TIERS))
def test_each_case_is_captured_by_the_expected_tier(name):
    model, inputs = cases.CASES[name].build()
    report = fxfuse.inspect(model.eval(), inputs)
    assert report.tier == EXPECTED_TIERS[name]


def test_a_subclassed_leaf_becomes_a_leaf_and_is_named():
    model, inputs = cases.CASES["subclassed_leaf"].build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fxfuse.inspect(model.eval(), inputs)
    assert report.leaves == ["a.1", "b.1"]
    fallback = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert fallback and "a.1" in str(fallback[0].message)


def test_tuple_values_are_never_cut_points():
    model, inputs = cases.CASES["tuple_middle"].build()
    report = fxfuse.inspect(model.eval(), inputs)
    assert "rnn" not in [c.node for c in report.cut_points]
    assert all(len(c.shape) >= 1 for c in report.cut_points)


class _BranchOnValueDeep(nn.Module):
    """Value-dependent control flow inside a nested submodule."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Clamp())
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(self.inner(x))


class _Clamp(nn.Module):
    def forward(self, x):
        if (x > 10).any():
            return x.clamp(max=10)
        return x


def test_value_dependent_branch_in_a_submodule_is_kept_opaque_and_runs_both_ways():
    model = _BranchOnValueDeep().eval()
    report = fxfuse.inspect(model, (torch.randn(4, 4),))
    assert report.leaves == ["inner.1"]
    large = (torch.full((3, 4), 100.0),)
    with torch.no_grad():
        assert torch.allclose(chain(report.stages, *large), model(*large), atol=1e-5)


class _BranchOnValueAtRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        while h.norm() > 1:
            h = h / 2
        return self.out(h)


def test_value_dependent_loop_at_the_root_names_file_line_and_remedy():
    with pytest.raises(TraceFailure) as caught:
        fxfuse.inspect(_BranchOnValueAtRoot().eval(), (torch.randn(4, 4),))
    text = str(caught.value)
    assert "test_cases.py:" in text
    assert "while h.norm() > 1:" in text
    assert "'<root>'" in text
    assert "torch.where" in text and "torch.cond" in text
    assert "\n" not in text


class _InPlaceMethod(nn.Module):
    """Writes into a tensor with an in-place method whose result is discarded."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2)
        return self.out(torch.relu(self.b(h)))


def test_in_place_writes_go_to_the_functional_tier_and_stay_exact():
    model = _InPlaceMethod().eval()
    inputs = (torch.randn(4, 4),)
    report = fxfuse.inspect(model, inputs)
    assert report.tier == "export"
    with torch.no_grad():
        assert torch.allclose(chain(report.stages, *inputs), model(*inputs), atol=1e-6)


class _ShapeBranchInBody(nn.Module):
    """A branch on a shape in the root forward: only export can take it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 8)
        self.b = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        if x.dim() == 3:
            x = x.mean(1)
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("shape", [(4, 3), (4, 5, 3)])
def test_shape_branches_are_taken_for_the_example_shape(shape):
    model = _ShapeBranchInBody().eval()
    inputs = (torch.randn(*shape),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fxfuse.inspect(model, inputs)
    assert report.tier == "export"
    assert any(issubclass(w.category, FallbackWarning) for w in caught)
    batch = (torch.randn(7, *shape[1:]),)
    with torch.no_grad():
        assert torch.allclose(chain(report.stages, *batch), model(*batch), atol=1e-6)


# ---------------------------------------------------------------- each case's class
#
# Every case above is one example of a class of failure. The models below are other
# members of each class, written for these tests. Whatever tier captures them, the
# contract is the case's own: `inspect` finds at least two cut points and its stages
# reproduce the model, at the example batch and at another batch size.


def _assert_stages_reproduce(model, inputs, other_batch):
    """`inspect` succeeds and its stages chain to the model's output, at the
    example inputs and at inputs of another batch size; returns the report."""
    report = fxfuse.inspect(model.eval(), inputs)
    assert len(report.cut_points) >= 2, [c.node for c in report.cut_points]
    with torch.no_grad():
        for given in (inputs, other_batch):
            want = model(*given)
            got = chain(report.stages, *given)
            assert (got - want).abs().max().item() <= 1e-6
    return report


def _stack(width_in, width_out):
    return nn.Sequential(nn.Linear(width_in, width_out), nn.ReLU())


# sized_constructor: a tensor built from a traced size


class _PadFeatures(nn.Module):
    """Appends three zero features, built from the batch size, dtype and device."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(11, 8)

    def forward(self, h):
        zeros = torch.zeros(h.size(0), 3, dtype=h.dtype, device=h.device)
        return torch.relu(self.fc(torch.cat([h, zeros], 1)))


class _SizedInSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _stack(4, 8)
        self.pad = _PadFeatures()
        self.b = _stack(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.b(self.pad(self.a(x))))


class _SizedMaskAtRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        mask = torch.ones(x.shape[0], 8, dtype=torch.float32)
        return self.out(torch.relu(self.b(h * mask)))


class _PositionsAtRoot(nn.Module):
    """Positions 0..T-1 from the sequence length, as a transformer embeds them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.position = nn.Embedding(16, 8)
        self.mix = _stack(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):  # x: [batch, time, 3]
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.embed(x) + self.position(positions)
        return self.out(self.mix(h).mean(1))


SIZED = {
    "zeros in a submodule": (_SizedInSubmodule, (4, 4), "fx+leaves"),
    "ones at the root": (_SizedMaskAtRoot, (4, 4), "export"),
    "arange at the root": (_PositionsAtRoot, (4, 5, 3), "fx"),
}


@pytest.mark.parametrize("variant", sorted(SIZED))
def test_tensors_built_from_a_traced_size_follow_the_batch(variant):
    build, shape, tier = SIZED[variant]
    torch.manual_seed(0)
    inputs, other = (torch.randn(*shape),), (torch.randn(7, *shape[1:]),)
    report = _assert_stages_reproduce(build(), inputs, other)
    assert report.tier == tier


def test_a_sized_constructor_in_a_submodule_makes_only_that_submodule_a_leaf():
    torch.manual_seed(0)
    report = fxfuse.inspect(_SizedInSubmodule().eval(), (torch.randn(4, 4),))
    assert report.leaves == ["pad"]
    assert {"a", "b"} <= {c.closes for c in report.cut_points}


class _NamedOwner(nn.Module):
    """A forward whose first argument is not called ``self``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(11, 8)

    def forward(block, h):  # noqa: N805
        zeros = torch.zeros(h.size(0), 3)
        return torch.relu(block.fc(torch.cat([h, zeros], 1)))


def test_the_failing_module_is_found_whatever_its_forward_calls_self():
    model = _SizedInSubmodule()
    model.pad = _NamedOwner()
    report = fxfuse.inspect(model.eval(), (torch.randn(4, 4),))
    assert report.tier == "fx+leaves"
    assert report.leaves == ["pad"]


# star_args: *args and **kwargs in a forward


class _Concat(nn.Module):
    def forward(self, *parts):
        return torch.cat(parts, 1)


class _StarInSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(4, 4)
        self.right = nn.Linear(4, 4)
        self.merge = _Concat()
        self.body = _stack(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.body(self.merge(self.left(x), self.right(x))))


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, **options):
        return torch.relu(self.fc(x)) * options.get("scale", 1.0)


class _KeywordsToSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _stack(4, 8)
        self.b = _Scaled()
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(self.b(self.a(x), scale=0.5))


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, y):
        return torch.relu(self.fc(torch.cat([x, y], 1)))


class _StarTwoInputs(nn.Module):
    """Two inputs through ``*args``, handed on as they came."""

    def __init__(self):
        super().__init__()
        self.a = _Pair()
        self.b = _stack(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, *args):
        return self.out(self.b(self.a(*args)))


class _UnpackedStar(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _stack(4, 8)
        self.b = _stack(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, *inputs):
        x, y = inputs
        return self.out(self.b(self.a(x - y)))


class _ReadsRootKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = _stack(4, 8)
        self.b = _stack(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x, **options):
        return self.out(self.b(self.a(x)) * options.get("scale", 2.0))


class _OptionalArguments(nn.Module):
    """Arguments the example inputs leave at their defaults."""

    def __init__(self):
        super().__init__()
        self.a = _stack(4, 8)
        self.b = _stack(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x, mask=None, *, scale=2.0):
        h = self.a(x)
        if mask is not None:
            h = h * mask
        return self.out(self.b(h) * scale)


STARRED = {
    "*parts in a submodule": (_StarInSubmodule, 1, "fx"),
    "**options in a submodule": (_KeywordsToSubmodule, 1, "fx"),
    "*args handed on at the root": (_StarTwoInputs, 2, "export"),
    "*inputs unpacked at the root": (_UnpackedStar, 2, "fx"),
    "**options read at the root": (_ReadsRootKeywords, 1, "export"),
    "defaults left unfilled": (_OptionalArguments, 1, "fx"),
}


@pytest.mark.parametrize("variant", sorted(STARRED))
def test_starred_and_default_arguments_are_captured(variant):
    build, count, tier = STARRED[variant]
    torch.manual_seed(0)
    inputs = tuple(torch.randn(4, 4) for _ in range(count))
    other = tuple(torch.randn(7, 4) for _ in range(count))
    report = _assert_stages_reproduce(build(), inputs, other)
    assert report.tier == tier


def test_arguments_left_at_their_defaults_are_not_inputs_to_cut_around():
    report = fxfuse.inspect(_OptionalArguments().eval(), (torch.randn(4, 4),))
    assert [c.closes for c in report.chosen] == ["a.0", "a", "b"]


# subclassed_leaf: a user subclass of a torch.nn layer with a branch of its own


class _FlattenLinear(nn.Linear):
    def forward(self, x):
        if x.dim() > 2:
            x = x.flatten(1)
        return super().forward(x)


class _FlattenBeforeLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        self.fc = nn.Sequential(_FlattenLinear(4 * 6 * 6, 16), nn.ReLU())
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(self.fc(self.conv(x)))


class _EvenConv(nn.Conv2d):
    """Pads an odd-sized input so that the stride divides it."""

    def forward(self, x):
        if x.shape[-1] % 2:
            x = nn.functional.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class _EvenConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(_EvenConv(1, 4, 3, stride=2), nn.ReLU())
        self.body = nn.Sequential(_EvenConv(4, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)
        )

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


class _GuardedSequential(nn.Sequential):
    """The whole model is a subclassed container with a branch: it cannot be a leaf."""

    def forward(self, x):
        if x.shape[0] == 0:
            return x.new_zeros(0, 3)
        return super().forward(x)


def _guarded_sequential():
    return _GuardedSequential(_stack(4, 8), _stack(8, 8), nn.Linear(8, 3))


SUBCLASSED = {
    "Linear that flattens": (_FlattenBeforeLinear, (4, 1, 8, 8), ["fc.0"]),
    "Conv2d that pads": (_EvenConvNet, (4, 1, 9, 9), ["stem.0", "body.0"]),
    "Sequential at the root": (_guarded_sequential, (4, 4), []),
}


@pytest.mark.parametrize("variant", sorted(SUBCLASSED))
def test_subclassed_torch_layers_with_a_branch_become_leaves(variant):
    build, shape, leaves = SUBCLASSED[variant]
    torch.manual_seed(0)
    inputs, other = (torch.randn(*shape),), (torch.randn(7, *shape[1:]),)
    report = _assert_stages_reproduce(build(), inputs, other)
    assert report.leaves == leaves
    assert report.tier == ("fx+leaves" if leaves else "export")


# tuple_middle: a submodule hands on a tuple, a dict or a named tuple


class _LSTMState(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _stack(3, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Sequential(_stack(8, 8), nn.Linear(8, 2))

    def forward(self, x):  # x: [batch, time, 3]
        _, (h, c) = self.rnn(self.embed(x))
        return self.head(h[-1] + c[-1])


class _Features(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        tokens = torch.relu(self.fc(x))
        return {"tokens": tokens, "pooled": torch.relu(self.proj(tokens))}


class _DictInTheMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = _stack(4, 4)
        self.backbone = _Features()
        self.neck = _stack(16, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        features = self.backbone(self.pre(x))
        both = torch.cat([features["tokens"], features["pooled"]], 1)
        return self.out(self.neck(both))


_MeanSpread = collections.namedtuple("_MeanSpread", "mean spread")


class _Statistics(nn.Module):
    def forward(self, x):
        return _MeanSpread(x.mean(1), x.std(1))


class _NamedTupleInTheMiddle(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _stack(3, 8)
        self.stats = _Statistics()
        self.head = nn.Sequential(_stack(16, 8), nn.Linear(8, 2))

    def forward(self, x):  # x: [batch, time, 3]
        s = self.stats(self.embed(x))
        return self.head(torch.cat([s.mean, s.spread], 1))


TUPLES = {
    "LSTM (h, c)": (_LSTMState, (4, 6, 3), "rnn"),
    "dict": (_DictInTheMiddle, (4, 4), "backbone"),
    "named tuple": (_NamedTupleInTheMiddle, (4, 6, 3), "stats"),
}


@pytest.mark.parametrize("variant", sorted(TUPLES))
def test_stages_hand_on_one_tensor_never_a_tuple(variant):
    build, shape, module = TUPLES[variant]
    torch.manual_seed(0)
    inputs, other = (torch.randn(*shape),), (torch.randn(7, *shape[1:]),)
    report = _assert_stages_reproduce(build(), inputs, other)
    assert module not in [c.node for c in report.cut_points]
    with torch.no_grad():
        value = inputs
        for stage in report.stages[:-1]:
            value = (stage(*value),)
            assert isinstance(value[0], torch.Tensor)


# The dict's `tokens` dominates the output: naming `backbone` cuts there, at one tensor.
@pytest.mark.parametrize("variant", ["LSTM (h, c)", "named tuple"])
def test_a_module_that_returns_several_values_cannot_be_named_as_a_cut(variant):
    build, shape, module = TUPLES[variant]
    with pytest.raises(PlanError, match=f"'{module}' is not a cut point"):
        fxfuse.inspect(build().eval(), (torch.randn(*shape),), cuts=[module])
