"""The compressed sparse model file: one safetensors file in which mostly-zero tensors are stored compressed.

``save(model, path)`` writes it, ``load(path)`` rebuilds the model, bit-identical. The file is a plain safetensors
file (Hugging Face's format: a JSON header, then raw little-endian tensor bytes; no pickle, so loading it cannot run
code), so any safetensors reader can open it; the layout below says how to reassemble the weights.

**Layout (format version 1).** Each tensor of the state dict is stored under one of three encodings, recorded per
tensor in the JSON metadata under the key ``"sparsetrain"``:

- ``dense``: the tensor as it is, under its own name.
- ``bitmask``: ``NAME::mask``, one bit per element in row-major order (uint8, little-endian bit order, i.e.
  ``numpy.packbits(..., bitorder="little")``), set where the element is nonzero; and ``NAME::values``, the nonzero
  elements in row-major order.
- ``csr``: ``NAME::crow`` (rows + 1, int32) and ``NAME::col`` (nnz, int32), compressed sparse rows over the tensor
  viewed as ``(shape[0], numel // shape[0])``; ``NAME::values`` as above (the same order).

**Which encoding, and why.** Per tensor the one with the fewest bytes wins. For ``n`` elements of ``b`` bytes with
``nnz`` nonzeros: dense costs ``n b``, a bitmask ``n / 8 + nnz b``, CSR ``4 (rows + 1) + nnz (4 + b)``. The bitmask
beats CSR while the density is above about 1/32 (sparsity below about 97%): 90% sparse fp32 costs 0.131 of dense
as a bitmask against 0.2 as CSR; CSR wins only at extreme sparsity (99%: 0.02 against 0.04). Dense wins when fewer
than about 1 element in ``8 b`` is zero, and for tiny tensors, where each extra header entry (about 100 bytes) counts.
CSR int32 is also what the CPU kernels of :mod:`sparsetrain.inference` run on, but re-indexing at load time is
cheap, so the file only optimises size.

**Bit-identical.** Zeros are found by value, so a negative zero (``-0.0``, what ``weight * 0`` gives a negative
weight) would come back as ``+0.0``. Where a tensor has any, ``NAME::zero_signs`` holds one bit per zero element
(row-major order of the zeros) so that they come back exactly: 1 bit per zero, 0.028 of dense fp32 at 90% sparsity.
Each stored tensor carries a CRC-32 in the metadata, so a corrupted file is reported rather than loaded.

**Values in fp16 / bf16.** ``dtype="fp16"`` or ``"bf16"`` stores floating-point values at half width (and halves
the file again); ``load`` casts them back to each tensor's original dtype, so what comes back is bit-identical to
the saved half-precision values. fp16 overflows above 65504: such a tensor is an error, not a silent ``inf``.

References: the safetensors format (github.com/huggingface/safetensors); the CSR layout as in torch.sparse_csr_tensor;
the size trade-off between bitmaps and index lists as in Han et al. 2016, "Deep Compression", arXiv 1510.00149 (which
stores relative indices; a bitmap is simpler and smaller above ~3% density).
"""

from __future__ import annotations

import functools
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._atomic import write_atomic
from .errors import CheckpointError, ConfigError, SparsetrainError

__all__ = [
    "FORMAT",
    "VERSION",
    "ExportError",
    "ExportSummary",
    "Exported",
    "MissingDependency",
    "TensorRecord",
    "checkpoint_metadata",
    "dense_fp32_bytes",
    "load",
    "parse_dtype",
    "read",
    "save",
]

FORMAT = "sparsetrain-export"
VERSION = 1
META_KEY = "sparsetrain"
SEP = "::"

# Safetensors writes one JSON entry per stored tensor (name, dtype, shape, offsets) and we add a per-tensor record
# to our metadata; about 100 bytes each. Counted so that a tiny tensor is not split into three entries for nothing.
_ENTRY_BYTES = 100

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


class ExportError(CheckpointError, ValueError):
    """A file that is not a sparsetrain export, is truncated or corrupted, or does not match the model.

    A ``ValueError`` for library users, and a :class:`~sparsetrain.errors.CheckpointError` (exit code 1, one-line
    message, no traceback) for the CLI.
    """


class MissingDependency(SparsetrainError, ImportError):
    """safetensors is not installed."""


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise MissingDependency(
            "the export format needs the safetensors package: pip install safetensors "
            "(or pip install 'sparsetrain[export]')"
        ) from None
    return safetensors


@dataclass(frozen=True)
class TensorRecord:
    """How one tensor was stored: its encoding, its sparsity and its bytes against the same tensor dense in fp32."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    sparsity: float
    stored_bytes: int
    fp32_bytes: int


@dataclass
class ExportSummary:
    """What :func:`save` wrote: the file, its size and one :class:`TensorRecord` per tensor."""

    path: Path
    file_bytes: int
    tensors: list[TensorRecord] = field(default_factory=list)


@dataclass
class Exported:
    """The contents of an export file, as read by :func:`read`: the state dict and the metadata."""

    path: Path
    state_dict: dict[str, Tensor]
    info: dict[str, Any]

    @property
    def metadata(self) -> dict[str, Any]:
        """The metadata given to :func:`save` (model spec, run, and the user's own keys)."""
        return self.info.get("metadata", {})

    @property
    def model_spec(self) -> dict[str, Any] | None:
        return self.metadata.get("model_spec")

    @property
    def tensors(self) -> dict[str, dict[str, Any]]:
        """Per tensor: shape, dtype, stored dtype, encoding, sparsity, nnz."""
        return self.info["tensors"]


# ---------------------------------------------------------------------------------------------------- helpers
def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The storage dtype for floating-point values: None (as they are), fp32, fp16 or bf16."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"unknown dtype {dtype!r} for the stored values; choose one of: fp32, fp16, bf16 (or None)")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ExportError(f"unknown dtype {name!r} in the file's metadata; the file is corrupted")
    return dtype


def _crc(tensor: Tensor) -> int:
    # Over the raw bytes, so it checks exactly what safetensors reads back (bf16 included, which numpy lacks).
    raw = tensor.contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(raw.numpy())


def _pack(bits: Tensor) -> Tensor:
    return torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))


def _unpack(packed: Tensor, count: int) -> Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count, bitorder="little").astype(bool))


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _encode(name: str, tensor: Tensor) -> tuple[str, dict[str, Tensor]]:
    """Choose the smallest encoding of ``tensor`` (see the module docstring); return it with the tensors to store."""
    flat = tensor.reshape(-1)
    n, item = flat.numel(), flat.element_size()
    if tensor.dtype not in _FLOATS or n == 0:
        return "dense", {name: tensor}
    mask = flat != 0  # NaN counts as nonzero and is stored as a value
    nnz = int(mask.sum())
    zeros = ~mask
    signs = torch.signbit(flat[zeros])
    has_negative_zeros = bool(signs.any())
    sign_bytes = (math.ceil((n - nnz) / 8) + _ENTRY_BYTES) if has_negative_zeros else 0
    rows = _rows(tuple(tensor.shape))
    sizes = {
        "dense": n * item,
        "bitmask": math.ceil(n / 8) + nnz * item + sign_bytes + _ENTRY_BYTES,
        "csr": 4 * (rows + 1) + nnz * (4 + item) + sign_bytes + 2 * _ENTRY_BYTES,
    }
    if n // rows >= 2**31 or nnz >= 2**31:
        del sizes["csr"]  # int32 indices cannot address it
    encoding = min(sizes, key=lambda k: (sizes[k], k != "dense"))  # a tie keeps the plain tensor
    if encoding == "dense":
        return "dense", {name: tensor}
    stored = {f"{name}{SEP}values": flat[mask].clone()}
    if encoding == "bitmask":
        stored[f"{name}{SEP}mask"] = _pack(mask)
    else:
        index = mask.nonzero().squeeze(1)
        cols = n // rows
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(index // cols, minlength=rows).cumsum(0)
        stored[f"{name}{SEP}crow"] = crow.to(torch.int32)
        stored[f"{name}{SEP}col"] = (index % cols).to(torch.int32)
    if has_negative_zeros:
        stored[f"{name}{SEP}zero_signs"] = _pack(signs)
    return encoding, stored


def _decode(name: str, record: Mapping[str, Any], get: Any) -> Tensor:
    """Rebuild one tensor from its stored parts; every size and index is checked before it is used."""
    shape = tuple(int(s) for s in record["shape"])
    stored_dtype = _dtype_from_name(record["stored_dtype"])
    encoding = record["encoding"]
    n = math.prod(shape)
    if encoding == "dense":
        tensor = get(name)
        if tuple(tensor.shape) != shape or tensor.dtype != stored_dtype:
            raise ExportError(f"tensor {name!r} is stored with shape {tuple(tensor.shape)}, metadata says {shape}")
        return tensor
    values = get(f"{name}{SEP}values")
    nnz = values.numel()
    if values.dim() != 1 or values.dtype != stored_dtype or nnz > n:
        raise ExportError(f"tensor {name!r}: stored values do not fit shape {shape}; the file is corrupted")
    if encoding == "bitmask":
        packed = get(f"{name}{SEP}mask")
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil(n / 8):
            raise ExportError(
                f"tensor {name!r}: the bitmask has the wrong size for shape {shape}; the file is corrupted"
            )
        mask = _unpack(packed, n)
        if int(mask.sum()) != nnz:
            raise ExportError(f"tensor {name!r}: the bitmask marks {int(mask.sum())} values, {nnz} are stored")
    elif encoding == "csr":
        crow = get(f"{name}{SEP}crow").to(torch.int64)
        col = get(f"{name}{SEP}col").to(torch.int64)
        rows = _rows(shape)
        cols = n // rows if rows else 0
        valid = (
            crow.numel() == rows + 1
            and col.numel() == nnz
            and int(crow[0]) == 0
            and int(crow[-1]) == nnz
            and bool((crow[1:] >= crow[:-1]).all())
            and (nnz == 0 or (int(col.min()) >= 0 and int(col.max()) < cols))
        )
        if not valid:
            raise ExportError(f"tensor {name!r}: invalid CSR indices for shape {shape}; the file is corrupted")
        index = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1]) * cols + col
        if nnz > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ExportError(f"tensor {name!r}: CSR columns are not increasing; the file is corrupted")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[index] = True
    else:
        raise ExportError(f"tensor {name!r} has unknown encoding {encoding!r}; the file is corrupted or too new")
    flat = torch.zeros(n, dtype=stored_dtype)
    if record.get("negative_zeros"):
        packed = get(f"{name}{SEP}zero_signs")
        if packed.dtype != torch.uint8 or packed.numel() != math.ceil((n - nnz) / 8):
            raise ExportError(f"tensor {name!r}: zero signs have the wrong size; the file is corrupted")
        negative = _unpack(packed, n - nnz)
        zeros = torch.zeros(n - nnz, dtype=stored_dtype)
        zeros[negative] = -0.0
        flat[~mask] = zeros
    flat[mask] = values
    return flat.reshape(shape)


def _state_dict_of(model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    out = {}
    for name, tensor in state.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor; cannot export it")
        if SEP in name:
            raise ValueError(f"tensor name {name!r} contains {SEP!r}, which the export format reserves")
        if tensor.is_sparse or tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        out[name] = tensor.detach().cpu()
    return out


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    metadata = dict(metadata or {})
    spec = metadata.get("model_spec")
    if spec is not None and (not isinstance(spec, Mapping) or not {"name", "input_shape", "num_classes"} <= set(spec)):
        raise ValueError(f"metadata['model_spec'] must have name, input_shape and num_classes, got {spec!r}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable: {error}") from None
    return metadata


def _output_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"output {str(path)!r} is a directory; give a file name such as {str(path / 'model.safetensors')!r}"
        )
    if not path.parent.is_dir():
        raise ConfigError(
            f"output directory {str(path.parent)!r} does not exist; create it first or choose another output path"
        )
    return path


# ---------------------------------------------------------------------------------------------------- save
def save(
    model: nn.Module | Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
) -> ExportSummary:
    """Write ``model`` (a module or a state dict) to one safetensors file, mostly-zero tensors compressed.

    Args:
        model: the module, or its state dict; sparse weights must be hard zeros (as sparsetrain leaves them).
        path: the output file. Written atomically: a failure leaves any existing file untouched. An existing file
            is replaced only if it is a regular file, and keeps its permission bits.
        metadata: JSON-serialisable extras, kept in the file. ``model_spec`` (``name``, ``input_shape``,
            ``num_classes``, as in :func:`sparsetrain.train.models.model_spec`) lets :func:`load` rebuild the model
            without being given one; :func:`checkpoint_metadata` makes it, with the run's method and accuracies,
            from a checkpoint of ``sparsetrain train``.
        dtype: store floating-point values as ``"fp16"`` or ``"bf16"`` (or ``"fp32"``); None keeps each tensor's own.

    Returns:
        An :class:`ExportSummary` with the file size and, per tensor, its encoding and bytes.

    Raises:
        ValueError (ConfigError): unknown dtype, output directory missing, output not a regular file (a device,
            fifo or directory), metadata not JSON-serialisable, a value beyond float16's range.
    """
    target = parse_dtype(dtype)
    path = _output_path(path)
    state = _state_dict_of(model)
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "tensors": {},
        "metadata": _check_metadata(metadata),
    }
    stored: dict[str, Tensor] = {}
    records = []
    for name, tensor in state.items():
        original = tensor.dtype
        if target is not None and original in _FLOATS and original != target:
            cast = tensor.to(target)
            if target == torch.float16 and bool((torch.isinf(cast) & torch.isfinite(tensor)).any()):
                raise ConfigError(
                    f"tensor {name!r} has values up to {float(tensor.abs().max()):.4g}, beyond float16's range "
                    "(65504); use dtype='bf16' or keep fp32"
                )
            tensor = cast
        encoding, parts = _encode(name, tensor.contiguous())
        zeros = tensor.numel() - int(torch.count_nonzero(tensor))  # -0.0 is a zero, NaN is not
        record = {
            "shape": list(tensor.shape),
            "dtype": _dtype_name(original),
            "stored_dtype": _dtype_name(tensor.dtype),
            "encoding": encoding,
            "sparsity": zeros / tensor.numel() if tensor.numel() else 0.0,
            "negative_zeros": f"{name}{SEP}zero_signs" in parts,
            "crc32": {},
        }
        for key, part in parts.items():
            # Dense parts may share storage with the model (tied weights); safetensors wants each stored once.
            part = part.contiguous().clone() if key == name else part.contiguous()
            stored[key] = part
            record["crc32"][key] = _crc(part)
        info["tensors"][name] = record
        records.append(
            TensorRecord(
                name=name,
                shape=tuple(tensor.shape),
                dtype=record["stored_dtype"],
                encoding=encoding,
                sparsity=record["sparsity"],
                stored_bytes=sum(p.numel() * p.element_size() for p in parts.values()),
                fp32_bytes=tensor.numel() * (4 if tensor.dtype in _FLOATS else tensor.element_size()),
            )
        )
    _write_atomic(stored, {"format": "pt", META_KEY: json.dumps(info, separators=(",", ":"))}, path)
    return ExportSummary(path=path, file_bytes=path.stat().st_size, tensors=records)


def _write_atomic(tensors: dict[str, Tensor], header: dict[str, str], path: Path) -> None:
    save_file = _safetensors().torch.save_file
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def dense_fp32_bytes(model: nn.Module | Mapping[str, Tensor]) -> int:
    """Size of the same tensors written by safetensors as plain fp32 (the baseline the size ratios are against)."""
    to_bytes = _safetensors().torch.save
    state = {
        k: (v.to(torch.float32) if v.dtype in _FLOATS else v).contiguous().clone()
        for k, v in _state_dict_of(model).items()
    }
    return len(to_bytes(state, metadata={"format": "pt"}))


def checkpoint_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata to export a checkpoint of ``sparsetrain train`` with: model spec, method, sparsity, accuracies."""
    config = checkpoint.get("config") or {}
    metrics = checkpoint.get("metrics") or {}
    run = {key: config.get(key) for key in ("method", "sparsity", "distribution", "model", "dataset", "epochs", "seed")}
    run["kind"] = checkpoint.get("kind")
    for key in ("test_acc", "val_acc", "sparsity"):
        if key in metrics:
            run["measured_sparsity" if key == "sparsity" else key] = metrics[key]
    return {"model_spec": dict(checkpoint["model_spec"]), "run": run}


# ---------------------------------------------------------------------------------------------------- read / load
def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header by hand, so that a foreign or truncated file gets a precise message."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ExportError(f"{str(path)!r} is not a sparsetrain export (only {size} bytes; not a safetensors file)")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100_000_000):
            raise ExportError(
                f"{str(path)!r} is not a sparsetrain export: not a safetensors file, or truncated in its header"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export: unexpected header")
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + data_end > size:
        raise ExportError(
            f"{str(path)!r} is truncated: its header promises {8 + length + data_end} bytes, the file has {size}"
        )
    meta = header.get("__metadata__") or {}
    if META_KEY not in meta:
        raise ExportError(
            f"{str(path)!r} is a safetensors file but not a sparsetrain export (no {META_KEY!r} metadata); "
            "write one with sparsetrain.export.save or `sparsetrain export`"
        )
    try:
        info = json.loads(meta[META_KEY])
    except json.JSONDecodeError:
        raise ExportError(f"{str(path)!r}: the sparsetrain metadata is not valid JSON; the file is corrupted") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("tensors"), dict):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export (unexpected metadata)")
    version = info.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise ExportError(
            f"{str(path)!r} has export format version {version!r}; this sparsetrain reads version {VERSION} or older"
        )
    return info


def read(path: str | os.PathLike[str]) -> Exported:
    """Read an export file: the state dict (original dtypes, bit-identical) and the metadata. Checks every CRC.

    Raises:
        ExportError (a ValueError): not a file, not a sparsetrain export, truncated, corrupted, or too new.
    """
    safetensors = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export file {str(path)!r} does not exist")
    info = _read_header(path)
    state: dict[str, Tensor] = {}
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            available = set(handle.keys())

            def get(key: str, checksums: Mapping[str, int]) -> Tensor:
                if key not in available:
                    raise ExportError(f"{str(path)!r} lacks tensor {key!r}; the file is corrupted")
                tensor = handle.get_tensor(key)
                if checksums.get(key) != _crc(tensor):
                    raise ExportError(f"{str(path)!r}: tensor {key!r} fails its checksum; the file is corrupted")
                return tensor

            for name, record in info["tensors"].items():
                try:
                    tensor = _decode(name, record, functools.partial(get, checksums=record["crc32"]))
                    state[name] = tensor.to(_dtype_from_name(record["dtype"]))
                except (KeyError, TypeError, ValueError, RuntimeError) as error:
                    if isinstance(error, ExportError):
                        raise
                    raise ExportError(f"{str(path)!r}: tensor {name!r} cannot be rebuilt ({error})") from None
    except safetensors.SafetensorError as error:
        raise ExportError(
            f"{str(path)!r} cannot be read as safetensors ({error}); it is truncated or corrupted"
        ) from None
    return Exported(path=path, state_dict=state, info=info)


def _check_shapes(model: nn.Module, state: Mapping[str, Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model has {len(missing)} tensor(s) the file lacks ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"the file has {len(unexpected)} the model lacks ({', '.join(unexpected[:5])})")
        raise ExportError(f"{str(path)!r} does not match the model: " + "; ".join(parts))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(
                f"{str(path)!r} does not match the model: tensor {name!r} has shape {tuple(tensor.shape)} in the "
                f"file but {tuple(expected[name].shape)} in the model"
            )


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Fill ``model`` from an export file (strict: same names and shapes), or build it from the file's model spec.

    Weights come back bit-identical to what :func:`save` stored (in their original dtype). Nothing is changed in
    ``model`` unless the whole file matches.

    Raises:
        ExportError (a ValueError): the file is not a sparsetrain export, is truncated or corrupted, holds no model
            spec and no model was given, or does not match the model (the message names the tensor and both shapes).
    """
    exported = read(path)
    if model is None:
        spec = exported.model_spec
        if spec is None:
            raise ExportError(
                f"{str(path)!r} holds no model spec (it was not exported from a sparsetrain checkpoint); "
                "build the model and pass it: load(path, model)"
            )
        from .train.models import build_model  # only here: the export format itself does not depend on the trainer

        try:
            model = build_model(spec["name"], input_shape=spec["input_shape"], num_classes=spec["num_classes"])
        except ValueError as error:
            raise ExportError(f"{str(path)!r}: cannot build its model {spec.get('name')!r} ({error})") from None
    _check_shapes(model, exported.state_dict, exported.path)
    model.load_state_dict(exported.state_dict, strict=True)
    return model
