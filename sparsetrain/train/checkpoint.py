"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._atomic import write_atomic
from ..errors import CheckpointError, first_line

FORMAT = "sparsetrain-checkpoint"
VERSION = 1

# What the parts of a checkpoint are called in messages.
_PARTS = {"model": "model state", "model_spec": "model spec", "config": "config"}


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


def _first_line(error: Exception) -> str:
    """``Type: first non-empty line`` of an error (some, such as EOFError of an empty file, have no message)."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def _refused(path: Path, message: str) -> str:
    """What to tell the user when the safe unpickler refuses a file: never torch's advice to load it unsafely.

    torch's own message suggests re-running with ``weights_only=False``, which would run whatever the file's pickle
    names; for a file of unknown origin that is the attack itself. So only the refused global (or operation) is kept.
    """
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return (
            f"checkpoint {str(path)!r} holds Python objects other than tensors (it names the Python global "
            f"{found.group(1)!r}): loading them can run arbitrary code, so the file may be malicious. It was not "
            "loaded; a sparsetrain checkpoint holds only tensors, numbers, strings, lists and dicts"
        )
    operation = re.search(r"Unsupported operand \d+|unrecognized function[^\n]*|Unsupported class[^\n]*", message)
    detail = f" ({operation.group(0).strip()[:120]})" if operation else ""
    return (
        f"checkpoint {str(path)!r} is not a sparsetrain checkpoint: the safe loader refuses its contents{detail}. It "
        "was not loaded; it may be corrupted, or a plain pickle (which can run code when loaded) and malicious"
    )


def load(path: str | Path) -> dict[str, Any]:
    """Load a sparsetrain checkpoint safely (no pickle of arbitrary objects), with a clear error if unusable."""
    path = Path(path)
    if path.is_dir():
        for name in ("sparse_final.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:  # a run that never saved (stopped before its first epoch ended), or not a run directory
            found = sorted(p.name for p in path.glob("*.pt"))
            raise CheckpointError(
                f"directory {str(path)!r} holds neither sparse_final.pt nor last.pt; give a checkpoint file"
                + (f" (it holds {', '.join(found)})" if found else "")
            )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a .pt file written by sparsetrain train")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is empty (0 bytes); it was not written completely, or is not a checkpoint"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on unusual pickle protocols: the error below says more
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        if isinstance(error, pickle.UnpicklingError) and "weights only load failed" in str(error).lower():
            raise CheckpointError(_refused(path, str(error))) from None
        raise CheckpointError(
            f"checkpoint {str(path)!r} could not be read ({_first_line(error)}); it may be truncated or not a "
            "sparsetrain checkpoint"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a sparsetrain checkpoint (no '{FORMAT}' header)")
    return data


def require(data: dict[str, Any], source: str | Path, *keys: str) -> None:
    """Raise :class:`CheckpointError` naming the parts (``model``, ``model_spec``, ``config``) ``data`` lacks."""
    missing = [_PARTS.get(key, key) for key in keys if not isinstance(data.get(key), dict)]
    if missing:
        what = missing[0] if len(missing) == 1 else ", ".join(missing[:-1]) + " and " + missing[-1]
        raise CheckpointError(f"{str(source)!r} holds no {what}; is it a sparsetrain checkpoint?")


def restore_model(data: dict[str, Any], source: str | Path) -> nn.Module:
    """The model of a loaded checkpoint: built from its ``model_spec``, its ``model`` weights loaded (strict).

    ``source`` names the checkpoint in messages. Raises :class:`CheckpointError` when a part is missing or the
    weights do not fit the spec's model (a checkpoint edited or written by another version).
    """
    from ..models import build_model

    require(data, source, "model", "model_spec")
    try:
        model = build_model(**data["model_spec"])
        model.load_state_dict(data["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = first_line(error)
        raise CheckpointError(f"checkpoint {str(source)!r} does not match its model spec ({reason})") from None
    return model


def init_from(model: nn.Module, spec: dict[str, Any], source: str | Path) -> list[str]:
    """Load the weights of the checkpoint ``source`` into ``model`` (built from ``spec``) to start a run from them;
    returns the names of the parameters left at their fresh initialisation (a replaced classifier head).

    The checkpoint is read safely (:func:`load`) and must be of the same architecture: the same model name and
    input shape, every tensor name present on both sides with the same shape, except the classifier head's when
    the class count differs (the last ``nn.Linear``: it keeps its fresh initialisation, as a new task needs).
    Anything else raises :class:`CheckpointError` naming the difference.
    """
    from ..methods.transfer import head_parameter_names

    data = load(source)
    require(data, source, "model", "model_spec")
    theirs = data["model_spec"]
    for key in ("name", "input_shape"):
        if theirs.get(key) != spec.get(key):
            raise CheckpointError(
                f"--init-from {str(source)!r} holds a model with {key} {theirs.get(key)!r}, this run builds "
                f"{spec.get(key)!r}: the architectures must match (set --model and the dataset to the checkpoint's)"
            )
    weights, own = data["model"], model.state_dict()
    head: list[str] = []
    if theirs.get("num_classes") != spec.get("num_classes"):
        names = set(head_parameter_names(model))
        head = [n for n in own if n in names]
    missing = sorted(set(own) - set(weights) - set(head))
    unexpected = sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"--init-from {str(source)!r} does not fit the model: missing {missing[:5] or 'nothing'}, unexpected "
            f"{unexpected[:5] or 'nothing'}"
        )
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"--init-from {str(source)!r}: entry {name!r} of its model is not a tensor")
        if name in head:
            continue
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"--init-from {str(source)!r}: {name!r} has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(own[name].shape)}"
            )
    with torch.no_grad():
        for name, tensor in own.items():
            if name not in head:
                tensor.copy_(weights[name].to(dtype=tensor.dtype))
    return head
