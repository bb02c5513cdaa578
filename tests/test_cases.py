"""The failure cases in ../shared/cases behave as their README says, and so does the
class of failure behind each."""

import importlib.util
import sys
import warnings

import pytest
import torch
from torch import nn

import fxfuse
from fxfuse.errors import FxfuseError, TraceFailure
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
