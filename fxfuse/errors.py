"""The one family of errors fxfuse raises on purpose.

Every message says what failed, where (a file and line, a module path or a node) and
what the user can do about it. The CLI prints the message as one line and exits with
code 2; it shows a traceback only with ``-v``.
"""

from __future__ import annotations

LIMITATIONS = "docs/limitations.md"


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
        if limitation:
            message = f"{message} (see {LIMITATIONS}#{limitation})"
        super().__init__(message)
        self.limitation = limitation
        self.reason = reason


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
