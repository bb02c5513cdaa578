"""Shared test set-up: the repository root on sys.path, and the shared data folder."""

import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"the shared folder {SHARED} is not beside the repository")
    return SHARED


@pytest.fixture(autouse=True)
def _quiet_fallback_warnings():
    """Fallback-tier warnings are expected in most tests; tests that check them
    catch them explicitly."""
    from fxfuse.trace import FallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        yield
