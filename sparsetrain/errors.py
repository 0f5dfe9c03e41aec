"""User-facing errors: each carries a message that names the problem and the fix, and a process exit code.

The CLI prints the message (no traceback) and exits with ``exit_code``: 2 for usage errors (bad option, bad
recipe, unknown name), 1 for runtime failures (missing data, corrupt checkpoint, diverged training).
"""

from __future__ import annotations


class SparsetrainError(Exception):
    exit_code = 1


class ConfigError(SparsetrainError, ValueError):
    """A bad option, recipe or command-line value."""

    exit_code = 2


class CheckpointError(SparsetrainError):
    """A checkpoint is missing, corrupt, or does not match the model."""


class TrainingDiverged(SparsetrainError):
    """The loss became NaN or infinite."""
