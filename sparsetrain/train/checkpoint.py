"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._atomic import write_atomic
from ..errors import CheckpointError

FORMAT = "sparsetrain-checkpoint"
VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` is always either the old file or the complete new one.

    Only a regular file is replaced (a device, fifo or directory there raises ConfigError), keeping its permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    write_atomic(path, write)


def load(path: str | Path) -> dict[str, Any]:
    """Load a sparsetrain checkpoint safely (no pickle of arbitrary objects), with a clear error if unusable."""
    path = Path(path)
    if path.is_dir():
        for name in ("sparse_final.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a .pt file written by sparsetrain train")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "it may be truncated or not a sparsetrain checkpoint"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a sparsetrain checkpoint (no '{FORMAT}' header)")
    return data
