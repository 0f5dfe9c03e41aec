"""User-facing errors: each carries a message that names the problem and the fix, and a process exit code.

The CLI prints the message (no traceback) and exits with ``exit_code``: 2 for usage errors (bad option, bad
recipe, unknown name), 1 for runtime failures (missing data, corrupt checkpoint, diverged training, a file that
could not be written).
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path


class SparsetrainError(Exception):
    exit_code = 1


class ConfigError(SparsetrainError, ValueError):
    """A bad option, recipe or command-line value."""

    exit_code = 2


class CheckpointError(SparsetrainError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class DataError(SparsetrainError, ValueError):
    """A dataset could not be loaded (missing, corrupt or unreadable files); the message says what was tried and
    how to fix it. A ValueError too, as it always was."""


class TrainingDiverged(SparsetrainError):
    """The loss became NaN or infinite."""


class WriteError(SparsetrainError):
    """A file could not be written (read-only folder, full disk, a parent that is not a folder).

    Raised by :func:`writing` around writes that go through a temporary file and a rename, so the message can
    promise that nothing was overwritten.
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, or its type name when the message is empty (``KeyError()``)."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def _write_failure(error: BaseException) -> str | None:
    """Why a write failed, in words, if ``error`` is an I/O failure of a writer; None for any other error."""
    if isinstance(error, OSError):
        if error.errno == errno.ENOSPC:
            return "no space left on the device"
        return error.strerror or first_line(error)
    text = str(error)
    # torch's zip writer reports a short write (a full disk) only as "unexpected pos N vs M", without errno.
    if isinstance(error, RuntimeError) and ("unexpected pos" in text or "PytorchStreamWriter failed" in text):
        return f"the file could not be written completely, the disk is probably full ({first_line(error, 120)})"
    # safetensors reports OS errors as SafetensorError("Error while serializing: I/O error: ...").
    if type(error).__name__ == "SafetensorError" and ("I/O error" in text or "os error" in text):
        return first_line(error).split("I/O error: ", 1)[-1]
    return None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OS-level failure while writing ``path`` into a :class:`WriteError` that names it.

    Only for writes made atomically (a temporary file renamed over the target): the message says that nothing was
    overwritten, which is then true. Any other exception passes through unchanged.
    """
    try:
        yield
    except SparsetrainError:
        raise
    except Exception as error:
        reason = _write_failure(error)
        if reason is None:
            raise
        raise WriteError(f"could not write {str(path)!r}: {reason}; nothing was overwritten") from error
