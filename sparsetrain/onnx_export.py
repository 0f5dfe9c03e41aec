"""ONNX export of a model, checked against onnxruntime.

ONNX keeps the weights as dense initializers: a pruned weight is a tensor with zeros in it, as large as the dense
one (the zeros compress well with a general-purpose compressor, but no ONNX runtime skips them). What the
safetensors export of :mod:`sparsetrain.export` adds is the compression itself (bitmask or CSR), bit-identical
round trips, CRC checks and the run's metadata; ONNX adds a graph any runtime can execute without Python or
sparsetrain.

The graph is traced with torch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``): it needs
no package beyond ``onnx`` (the newer exporter needs ``onnxscript``), runs offline, and writes the same bytes for
the same model every time. The batch axis is dynamic.

Reference: the ONNX format, https://onnx.ai (operator set 17 by default).
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._atomic import write_atomic
from .errors import SparsetrainError

__all__ = ["DEFAULT_OPSET", "MissingOnnx", "OnnxCheck", "check_onnx", "export_onnx", "require_onnx"]

DEFAULT_OPSET = 17


class MissingOnnx(SparsetrainError, ImportError):
    """The onnx (or onnxruntime) package is not installed."""


def require_onnx(package: str = "onnx") -> Any:
    """Import ``package`` (``onnx`` or ``onnxruntime``) or raise :class:`MissingOnnx` saying how to install it."""
    try:
        return __import__(package)
    except ImportError:
        raise MissingOnnx(
            f"ONNX export needs the {package} package: pip install {package} (or pip install 'sparsetrain[onnx]', "
            "which installs onnx and onnxruntime)"
        ) from None


def _export_bytes(model: nn.Module, example: Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, deterministic output
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # torch announces the TorchScript exporter's deprecation on every call; the choice is deliberate.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model, (example,), buffer, input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset, **kwargs,
            )  # fmt: skip
    finally:
        model.train(was_training)
    return buffer.getvalue()


def export_onnx(model: nn.Module, path: str | os.PathLike[str], example: Tensor, *, opset: int = DEFAULT_OPSET) -> int:
    """Write ``model`` (traced on the batch ``example``, in eval mode) as an ONNX file at ``path``; returns its size.

    The file is written atomically (a temporary file, then a rename) and checked with ``onnx.checker``. Raises
    :class:`MissingOnnx` when the onnx package is not installed.
    """
    onnx = require_onnx("onnx")
    data = _export_bytes(model, example, opset)
    onnx.checker.check_model(onnx.load_from_string(data))
    write_atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))
    return len(data)


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime's outputs against torch's on the same inputs: the largest absolute difference, the batch sizes
    tried, and the fraction of exact zeros over the file's weight initializers (the pruned weights, kept dense)."""

    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    zero_fraction: float


def check_onnx(
    path: str | os.PathLike[str], model: nn.Module, inputs: list[Tensor], *, rtol: float = 1e-4, atol: float = 1e-5
) -> OnnxCheck:
    """Run the ONNX file with onnxruntime (CPU) on each of ``inputs`` and compare with ``model`` (eval mode).

    Raises :class:`SparsetrainError` when an output is not allclose (``rtol``, ``atol``), and :class:`MissingOnnx`
    without onnxruntime.
    """
    onnx = require_onnx("onnx")
    ort = require_onnx("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    was_training = model.training
    model.eval()
    worst = 0.0
    try:
        for x in inputs:
            (got,) = session.run(None, {"input": x.numpy()})
            with torch.no_grad():
                want = model(x).numpy()
            if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=atol):
                diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
                raise SparsetrainError(
                    f"onnxruntime's output for {str(path)!r} differs from torch's (shape {got.shape} vs "
                    f"{want.shape}, largest difference {diff:.3g})"
                )
            worst = max(worst, float(np.abs(got - want).max()))
    finally:
        model.train(was_training)
    weights = [
        onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if len(t.dims) >= 2
    ]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.size for w in weights)
    return OnnxCheck(worst, tuple(int(x.shape[0]) for x in inputs), zeros / max(1, total))
