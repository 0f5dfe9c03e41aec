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
from .maskops import count_zeros

__all__ = [
    "FORMAT",
    "MAX_DECODED_BYTES",
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
        zeros = count_zeros(tensor)  # -0.0 is a zero, NaN is not
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
    for key in ("test_acc", "val_acc", "test_ppl", "val_ppl", "sparsity"):
        if key in metrics:
            run["measured_sparsity" if key == "sparsity" else key] = metrics[key]
    return {"model_spec": dict(checkpoint["model_spec"]), "run": run}


# ---------------------------------------------------------------------------------------------------- read / load
# What a file may claim. Every size in the header is checked against the bytes actually present before anything is
# allocated, but CSR pays only for rows and nonzeros, so a few bytes can describe an all-zero tensor of any size.
# Without a model to compare with, a file may therefore decode to at most MAX_DECODED_BYTES, or to
# _MAX_AMPLIFICATION times its own size if that is more (a bitmask costs at least one bit per element, of at most
# 8 bytes: 64x, so a file that is not extreme CSR is never refused for its size). 1 GiB is 7 times the largest
# built-in model (WRN-28-10, 36.5M fp32 parameters); for more, pass the model, or max_bytes.
MAX_DECODED_BYTES = 2**30
_MAX_AMPLIFICATION = 64
_MAX_DIMS = 32  # torch's own limit on tensor dimensions is 64; no model weight comes close

_ENCODINGS = ("dense", "bitmask", "csr")


def _safetensors_dtypes() -> dict[str, torch.dtype]:
    names = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "C64": torch.complex64,
    }  # fmt: skip
    # Newer safetensors releases know more (float8, unsigned ints); their table is private, so only added to ours.
    try:
        import safetensors.torch

        names.update(getattr(safetensors.torch, "_TYPES", {}))
    except ImportError:
        pass
    return names


@dataclass(frozen=True)
class _Part:
    """One stored tensor as the safetensors header describes it (nothing read yet)."""

    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    """One tensor of the model as the metadata describes it, every size checked against the stored parts."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    stored_dtype: torch.dtype
    decoded_bytes: int


def _corrupt(path: Path, what: str) -> ExportError:
    return ExportError(f"{str(path)!r} is not a valid sparsetrain export ({what}); the file is corrupted")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(value: Any) -> tuple[int, ...] | None:
    """``value`` as a shape (a list of at most _MAX_DIMS sizes >= 0), or None if it is not one."""
    if not isinstance(value, list) or len(value) > _MAX_DIMS or not all(_is_int(s) and s >= 0 for s in value):
        return None
    return tuple(value)


def _json(raw: bytes | str) -> Any:
    """json.loads; ValueError for anything that is not JSON, including nesting too deep for the parser."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, _Part]]:
    """Parse and check the safetensors header by hand, so that a foreign, truncated or hostile file gets a precise
    message: every entry's dtype, shape and byte offsets are checked against each other and against the file's size
    before any tensor is read."""
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
        header = _json(raw)
    except (UnicodeDecodeError, ValueError):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export: unexpected header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _corrupt(path, "the safetensors metadata is not a mapping of strings")
    dtypes = _safetensors_dtypes()
    parts: dict[str, _Part] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"header entry {key!r} is a {type(entry).__name__}, not a mapping")
        dtype, shape, offsets = dtypes.get(entry.get("dtype")), _shape(entry.get("shape")), entry.get("data_offsets")
        if dtype is None or shape is None:
            raise _corrupt(path, f"header entry {key!r} has dtype {entry.get('dtype')!r}, shape {entry.get('shape')!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _corrupt(path, f"header entry {key!r} has data_offsets {offsets!r}; expected [begin, end]")
        begin, end = offsets
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise _corrupt(path, f"tensor {key!r}: offsets {offsets} do not hold shape {list(shape)} of {dtype}")
        parts[key] = _Part(dtype, shape)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise _corrupt(path, f"tensors {first!r} and {second!r} overlap in the file")
    data_end = spans[-1][1] if spans else 0
    if 8 + length + data_end > size:
        raise ExportError(
            f"{str(path)!r} is truncated: its header promises {8 + length + data_end} bytes, the file has {size}"
        )
    if META_KEY not in meta:
        raise ExportError(
            f"{str(path)!r} is a safetensors file but not a sparsetrain export (no {META_KEY!r} metadata); "
            "write one with sparsetrain.export.save or `sparsetrain export`"
        )
    try:
        info = _json(meta[META_KEY])
    except ValueError:
        raise ExportError(f"{str(path)!r}: the sparsetrain metadata is not valid JSON; the file is corrupted") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("tensors"), dict):
        raise ExportError(f"{str(path)!r} is not a sparsetrain export (unexpected metadata)")
    version = info.get("version")
    if not _is_int(version) or version > VERSION:
        raise ExportError(
            f"{str(path)!r} has export format version {version!r}; this sparsetrain reads version {VERSION} or older"
        )
    if not isinstance(info.setdefault("metadata", {}), dict):
        raise _corrupt(path, "its 'metadata' is not a mapping")
    return info, parts


def _plan(path: Path, info: Mapping[str, Any], parts: Mapping[str, _Part]) -> dict[str, _Plan]:
    """Check every tensor record of the metadata against the stored parts it names, allocating nothing.

    After this, each stored part has exactly the size its record implies, so decoding allocates only what the
    record's shape says (bounded by the caller: a model, or the cap of :func:`_check_size`).
    """
    plans: dict[str, _Plan] = {}

    def part(key: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> _Part:
        found = parts.get(key)
        if found is None:
            raise ExportError(f"{str(path)!r} lacks tensor {key!r}; the file is corrupted")
        if (
            found.dtype != dtype
            or (shape is not None and found.shape != shape)
            or (shape is None and len(found.shape) != 1)
        ):
            want = f"shape {list(shape)}" if shape is not None else "1 dimension"
            raise _corrupt(path, f"stored tensor {key!r} is {found.dtype} {list(found.shape)}, expected {dtype} {want}")
        return found

    for name, record in info["tensors"].items():
        if SEP in name or not isinstance(record, dict):
            raise _corrupt(path, f"tensor record {name!r}")
        shape, encoding, crcs = _shape(record.get("shape")), record.get("encoding"), record.get("crc32")
        if shape is None:
            raise _corrupt(path, f"tensor {name!r} has shape {record.get('shape')!r}")
        if encoding not in _ENCODINGS:
            raise _corrupt(path, f"tensor {name!r} has unknown encoding {encoding!r}; or the file is too new")
        if not isinstance(crcs, dict) or not all(_is_int(c) for c in crcs.values()):
            raise _corrupt(path, f"tensor {name!r} has checksums {str(crcs)[:100]}")
        if not isinstance(record.get("negative_zeros", False), bool):
            raise _corrupt(path, f"tensor {name!r} has negative_zeros {record.get('negative_zeros')!r}")
        if not isinstance(record.get("dtype"), str) or not isinstance(record.get("stored_dtype"), str):
            raise _corrupt(path, f"tensor {name!r} has dtype {record.get('dtype')!r}")
        dtype, stored = _dtype_from_name(record["dtype"]), _dtype_from_name(record["stored_dtype"])
        n = math.prod(shape)
        if encoding == "dense":
            part(name, stored, shape)
        else:
            if stored not in _FLOATS:
                raise _corrupt(path, f"tensor {name!r} is {encoding}-encoded but stored as {stored}")
            nnz = part(f"{name}{SEP}values", stored).shape[0]
            if nnz > n:
                raise _corrupt(path, f"tensor {name!r}: {nnz} stored values for {n} elements")
            if encoding == "bitmask":
                part(f"{name}{SEP}mask", torch.uint8, (-(-n // 8),))  # integers: n may be astronomically large
            else:
                part(f"{name}{SEP}crow", torch.int32, (_rows(shape) + 1,))
                part(f"{name}{SEP}col", torch.int32, (nnz,))
            if record.get("negative_zeros"):
                part(f"{name}{SEP}zero_signs", torch.uint8, (-(-(n - nnz) // 8),))
        plans[name] = _Plan(shape, dtype, stored, n * max(dtype.itemsize, stored.itemsize))
    return plans


def _check_size(path: Path, plans: Mapping[str, _Plan], max_bytes: int | None) -> None:
    """Refuse a file whose tensors would decode to more than ``max_bytes`` (or 64 times the file, if more)."""
    if max_bytes is None:
        return
    claimed = sum(p.decoded_bytes for p in plans.values())
    file_bytes = path.stat().st_size
    allowed = max(max_bytes, _MAX_AMPLIFICATION * file_bytes)
    if claimed > allowed:
        biggest = max(plans, key=lambda k: plans[k].decoded_bytes)
        raise ExportError(
            f"{str(path)!r} ({file_bytes:,} bytes) claims tensors of {claimed:,} bytes once decoded "
            f"({biggest!r} has shape {list(plans[biggest].shape)}); without a model to check them against, at most "
            f"{allowed:,} are decoded. If the file is yours, pass the model (load(path, model)) or a larger max_bytes"
        )


def _decode_all(path: Path, info: Mapping[str, Any], plans: Mapping[str, _Plan]) -> dict[str, Tensor]:
    safetensors = _safetensors()
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
                    state[name] = tensor.to(plans[name].dtype)
                except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
                    if isinstance(error, ExportError):
                        raise
                    raise ExportError(f"{str(path)!r}: tensor {name!r} cannot be rebuilt ({error})") from None
    except safetensors.SafetensorError as error:
        raise ExportError(
            f"{str(path)!r} cannot be read as safetensors ({error}); it is truncated or corrupted"
        ) from None
    return state


def _open(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], dict[str, _Plan]]:
    _safetensors()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export file {str(path)!r} does not exist")
    info, parts = _read_header(path)
    return path, info, _plan(path, info, parts)


def read(path: str | os.PathLike[str], *, max_bytes: int | None = MAX_DECODED_BYTES) -> Exported:
    """Read an export file: the state dict (original dtypes, bit-identical) and the metadata. Checks every CRC.

    Every shape, size and offset in the file's header is checked against the bytes present before anything is
    allocated. A file may claim tensors of at most ``max_bytes`` decoded (or 64 times its own size, if more): a
    CSR tensor of a few bytes can describe an all-zero tensor of any size. ``max_bytes=None`` lifts the cap, for
    a file you trust; :func:`load` with a model checks against the model instead.

    Raises:
        ExportError (a ValueError): not a file, not a sparsetrain export, truncated, corrupted, too new, or
            claiming more than ``max_bytes``.
    """
    path, info, plans = _open(path)
    _check_size(path, plans, max_bytes)
    return Exported(path=path, state_dict=_decode_all(path, info, plans), info=info)


def _check_shapes(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"the model has {len(missing)} tensor(s) the file lacks ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"the file has {len(unexpected)} the model lacks ({', '.join(unexpected[:5])})")
        raise ExportError(f"{str(path)!r} does not match the model: " + "; ".join(parts))
    for name, shape in shapes.items():
        if tuple(shape) != tuple(expected[name].shape):
            raise ExportError(
                f"{str(path)!r} does not match the model: tensor {name!r} has shape {tuple(shape)} in the "
                f"file but {tuple(expected[name].shape)} in the model"
            )


def _model_from_spec(path: Path, spec: Any, plans: Mapping[str, _Plan], max_bytes: int | None) -> nn.Module:
    """Build the model the file's spec names, once the spec is known to match the file and fit ``max_bytes``.

    The spec comes from the file, so it is built first on the meta device (shapes only, no memory): a spec with
    ``num_classes=5e6`` is refused for not matching the file, or for its size, before a real tensor exists.
    """
    from .models import build_model  # only here: a file without a model spec needs no model zoo

    if not isinstance(spec, dict) or not {"name", "input_shape", "num_classes"} <= set(spec):
        raise _corrupt(path, f"its model spec is {spec!r}; expected name, input_shape and num_classes")
    name, input_shape, num_classes = spec["name"], spec["input_shape"], spec["num_classes"]
    options = spec.get("options") or {}
    if not isinstance(name, str) or _shape(input_shape) is None or not _is_int(num_classes):
        raise _corrupt(path, f"its model spec is {spec!r}")
    if not isinstance(options, dict):
        raise _corrupt(path, f"its model spec's options are {options!r}")
    # A size option (layers, width, context) never exceeds the number of weights the file describes; a larger one
    # would only make building the spec's model (even on the meta device) slow before the shapes refuse it.
    elements = sum(math.prod(plan.shape) for plan in plans.values())
    if any(_is_int(v) and v > max(1, elements) for v in options.values()):
        raise _corrupt(path, f"its model spec's options {options!r} exceed the {elements} weights it holds")
    try:
        if "slim" in spec:
            return _slim_model_from_spec(path, spec, plans, max_bytes)
        with torch.device("meta"):
            shapes = build_model(name, input_shape=input_shape, num_classes=num_classes, options=options)
        _check_shapes(shapes, {k: p.shape for k, p in plans.items()}, path)
        _check_size(path, plans, max_bytes)
        return build_model(name, input_shape=input_shape, num_classes=num_classes, options=options)
    except ExportError as error:
        raise ExportError(f"{error} (the model of its own spec {spec!r})") from None
    except (ValueError, TypeError, RuntimeError) as error:
        raise ExportError(f"{str(path)!r}: cannot build its model {name!r} ({error})") from None


def _slim_model_from_spec(path: Path, spec: dict, plans: Mapping[str, _Plan], max_bytes: int | None) -> nn.Module:
    """The slim model of a spec with kept channels (``sparsetrain slim``), allocated only once it matches the file.

    The dense model and its cut are built on the meta device (shapes only); the kept channels are validated
    against the model's channel sets, so they can only narrow it. The real model is then the meta one moved to
    uninitialised memory, every tensor of which the file's (checked) state dict overwrites.
    """
    from .structured.slim import build_from_spec  # only here: plain files need no graph analysis

    with torch.device("meta"):
        shapes = build_from_spec(spec)
    _check_shapes(shapes, {k: p.shape for k, p in plans.items()}, path)
    _check_size(path, plans, max_bytes)
    held = {n for n, _ in shapes.named_parameters()} | {n for n, _ in shapes.named_buffers()}
    if not held <= set(shapes.state_dict()):
        raise ExportError(f"{str(path)!r}: model {spec['name']!r} has tensors a file cannot hold; it cannot be slim")
    return shapes.to_empty(device="cpu")


def load(
    path: str | os.PathLike[str], model: nn.Module | None = None, *, max_bytes: int | None = MAX_DECODED_BYTES
) -> nn.Module:
    """Fill ``model`` from an export file (strict: same names and shapes), or build it from the file's model spec.

    Weights come back bit-identical to what :func:`save` stored (in their original dtype). Nothing is changed in
    ``model`` unless the whole file matches. Names and shapes are compared before any tensor is decoded: against
    ``model``, or, without one, against the spec's model built on the meta device, whose size must then fit
    ``max_bytes`` as in :func:`read`.

    Raises:
        ExportError (a ValueError): the file is not a sparsetrain export, is truncated or corrupted, holds no model
            spec and no model was given, does not match the model (the message names the tensor and both shapes),
            or claims more than ``max_bytes`` without a model.
    """
    path, info, plans = _open(path)
    if model is None:
        spec = info["metadata"].get("model_spec")
        if spec is None:
            raise ExportError(
                f"{str(path)!r} holds no model spec (it was not exported from a sparsetrain checkpoint); "
                "build the model and pass it: load(path, model)"
            )
        model = _model_from_spec(path, spec, plans, max_bytes)
    else:
        _check_shapes(model, {k: p.shape for k, p in plans.items()}, path)
    state = _decode_all(path, info, plans)
    model.load_state_dict(state, strict=True)
    return model
