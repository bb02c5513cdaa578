"""The one family of errors fxfuse raises on purpose, and the warnings that point to a
known limitation.

Every message says what failed, where (a file and line, a module path or a node) and
what the user can do about it. The CLI prints the message as one line and exits with
code 2; it shows a traceback only with ``-v``.
"""

from __future__ import annotations

LIMITATIONS = "docs/limitations.md"


def _pointing_to(message: str, limitation: str | None) -> str:
    """The message, ending with where its limitation is explained, if it has one."""
    return f"{message} (see {LIMITATIONS}#{limitation})" if limitation else message


class FxfuseError(Exception):
    """Base class of the errors fxfuse raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        limitation: str | None = None,
        reason: str | None = None,
    ):
        """`reason`: the cause alone, in a few words, for a caller that wraps this
        error into its own message."""
        super().__init__(_pointing_to(message, limitation))
        self.limitation = limitation
        self.reason = reason


class LimitationWarning(UserWarning):
    """Something works, but runs into a limitation explained in docs/limitations.md."""

    def __init__(self, message: str, *, limitation: str):
        super().__init__(_pointing_to(message, limitation))
        self.limitation = limitation


class LoadError(FxfuseError):
    """A model, weights or example-input file could not be read safely."""


class InputError(FxfuseError):
    """Example inputs or data do not fit the model."""


class TraceFailure(FxfuseError):
    """No tracing tier could capture the model."""


class PlanError(FxfuseError):
    """The requested cuts or levels cannot be placed in a model."""


class FuseError(FxfuseError):
    """Models cannot be fused as asked."""


class ArtifactError(FxfuseError):
    """A fused artifact cannot be written or read."""


class ExportError(FxfuseError):
    """Export failed or its parity check did not pass."""
