"""Writing a file so that no reader ever sees half of it.

The content goes to a temporary name beside the target and is then renamed into
place, one atomic step on a file system: after a crash or Ctrl-C the target holds
its old content or its new one, never a mix. The temporary file is created by the
writer as any file would be, so the result gets the usual permissions.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary)``, then rename the temporary file to `path`.

    The folder of `path` is created when missing. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with errors_name(path, temporary.name):
            write(temporary)
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return path


@contextlib.contextmanager
def errors_name(path: Path, temporary_prefix: str) -> Iterator[None]:
    """Report an OSError about a temporary file or folder beside `path` (its name
    starts with `temporary_prefix`) as one about `path`: the user never asked for
    the temporary one."""
    try:
        yield
    except OSError as error:
        temporary = str(path.parent / temporary_prefix)
        if error.filename is not None and str(error.filename).startswith(temporary):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return write_atomically(path, lambda temporary: temporary.write_bytes(data))
