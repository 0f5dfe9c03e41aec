"""Atomic file replacement, shared by checkpoints and exports: write a temporary file beside the destination, fsync
it, rename it over the destination. A reader then always sees the old file or the complete new one.

A rename replaces whatever the name points at, device nodes and fifos included (as root, ``-o /dev/null --force``
would turn /dev/null into a regular file). So only a regular file (or a symlink to one) is ever replaced; anything
else is refused before and checked again just before the rename. The new file keeps the replaced file's permission
bits; a new name gets the usual ``0o666`` minus the umask, as ``open()`` would give it.
"""

from __future__ import annotations

import functools
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import ConfigError, writing

__all__ = ["check_replaceable", "write_atomic", "write_text_atomic"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a fifo (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _existing_mode(path: Path) -> int | None:
    """The mode of what ``path`` names (through symlinks), None if nothing is there; ConfigError if not a file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None  # absent, or a dangling symlink: nothing but the link is replaced
    if stat.S_ISREG(mode):
        return mode
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    via = f" (a symlink to {os.path.realpath(path)!r})" if path.is_symlink() else ""
    raise ConfigError(
        f"{str(path)!r} is {kind}{via}; only a regular file is ever replaced, --force included. Nothing was "
        "written: choose a file name"
    )


def check_replaceable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`~sparsetrain.errors.ConfigError` if ``path`` exists and is not a regular file.

    For commands to call before any work, so that ``--force`` onto a device, fifo or directory fails at once.
    """
    _existing_mode(Path(path))


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_name)`` to fill a temporary file beside ``path``, then fsync it and rename it over ``path``.

    On any failure (an exception in ``write``, a full disk, Ctrl-C) the temporary file is removed and ``path`` is
    untouched.

    Raises:
        ConfigError: ``path`` exists and is not a regular file (or a symlink to one).
    """
    path = Path(path)
    old = _existing_mode(path)
    # os.open with 0o666 lets the kernel apply the umask, as for any new file (mkstemp would give 0o600).
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise FileExistsError(f"cannot create a temporary file beside {str(path)!r}")
    try:
        # The replaced file's permission bits, or what the umask gives a new file. Set after ``write``, which may
        # itself recreate the file (safetensors does, with mode 0o600).
        mode = stat.S_IMODE(old if old is not None else os.fstat(fd).st_mode) & 0o777
        os.close(fd)
        fd = -1
        write(str(tmp))
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        _existing_mode(path)  # again: the destination may have changed while we wrote
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` atomically (:func:`write_atomic`); a failure raises
    :class:`~sparsetrain.errors.WriteError` naming ``path`` (a full disk leaves the old file)."""
    with writing(path):
        write_atomic(path, functools.partial(_write_text, text=text))
