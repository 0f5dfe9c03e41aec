"""Small image / sequence datasets, loaded fully into memory as tensors.

Every loader returns a :class:`Splits` with float32 inputs standardized by the
training-set statistics and int64 labels. The validation set is always carved
out of the *training* data with a seeded generator, so the test set is never
touched during model selection.

Nothing here uses the global random number generators: the validation split
and the batch order come from local ``torch.Generator`` objects, so loading a
dataset does not perturb the caller's seeding of model initialization.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import io
import logging
import math
import os
import pickle
import pickletools
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from .._atomic import write_atomic
from .._registry import Registry
from ..errors import DataError, SparsetrainError

__all__ = [
    "DATASETS",
    "DataError",
    "Splits",
    "TokenStream",
    "dataset_options",
    "iterate_batches",
    "list_datasets",
    "load_dataset",
    "load_run_dataset",
    "num_batches",
    "read_idx",
    "register_dataset",
]

logger = logging.getLogger(__name__)

# A loader takes ``data_dir`` (None: search the usual places) and whether it may download, and returns the raw
# ``(x_train, y_train, x_test, y_test, num_classes)``; load_dataset splits, standardizes and wraps them.
Loader = Callable[[str | None, bool], tuple[Tensor, Tensor, Tensor, Tensor, int]]

DATASET_REGISTRY: Registry[Loader] = Registry("dataset")


def register_dataset(
    name: str, *, help: str | None = None, options: dict[str, Any] | None = None, sequence: bool = False
) -> Callable[[Loader], Loader]:
    """Decorator: register a loader ``(data_dir, download) -> (x_train, y_train, x_test, y_test, num_classes)``.

    Inputs are float tensors of shape (N, ...), labels int64 in [0, num_classes). :func:`load_dataset` then holds
    out the validation split and standardizes by the training statistics, the same for every dataset.

    ``sequence=True`` registers a language-modelling corpus instead: the loader is
    ``(data_dir, download, **options) -> TokenStream`` (``options`` declares those options with their defaults,
    the run's ``dataset_options``), and :func:`load_dataset` splits the stream by position into train, validation
    and test, cuts each into windows of ``context`` tokens (targets: the same window shifted by one) and reports
    perplexity.
    """
    return DATASET_REGISTRY.register(name, help=help, options=dict(options or {}), sequence=bool(sequence))


def dataset_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``options`` checked against those dataset ``name`` declares (ValueError naming the allowed ones)."""
    return DATASET_REGISTRY.check_options(name.lower(), options)


def list_datasets(pattern: str = "*") -> list[str]:
    """Registered dataset names matching the glob ``pattern``, in registration order."""
    return DATASET_REGISTRY.names(pattern)


@dataclass
class Splits:
    """Train / validation / test tensors of one dataset plus what a model needs to know about it."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    # What a run reports and selects on: "accuracy" (classes) or "perplexity" (language modelling, lower is better).
    metric: str = "accuracy"
    # Where the data came from, when the name alone does not say (the text corpus: its files, size and SHA-256).
    info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


@dataclass
class TokenStream:
    """A language-modelling corpus: one 1-D tensor of token ids in ``[0, vocab)``, and where it came from."""

    tokens: Tensor
    vocab: int
    info: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# IDX files (MNIST / Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

# The four files of the MNIST family, as (role, base name). Either the raw or the .gz form is accepted.
_IDX_FILES: tuple[tuple[str, str], ...] = (
    ("train_images", "train-images-idx3-ubyte"),
    ("train_labels", "train-labels-idx1-ubyte"),
    ("test_images", "t10k-images-idx3-ubyte"),
    ("test_labels", "t10k-labels-idx1-ubyte"),
)

_IDX_URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

# MD5 of the official .gz files. Only downloads are checked: distributions (e.g. Debian) may
# recompress the files, which changes the .gz checksum but not the content.
_IDX_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}

# Where distributions install datasets (Debian's dataset-fashion-mnist package uses
# /usr/share/datasets/fashion-mnist). A module attribute so that tests can point it elsewhere.
_SYSTEM_DATA_ROOT = Path("/usr/share/datasets")

_DOWNLOAD_TIMEOUT_S = 10.0


def _cache_root() -> Path:
    """The per-user cache directory (``$XDG_CACHE_HOME/sparsetrain`` or ``~/.cache/sparsetrain``)."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "sparsetrain"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) of unsigned bytes into a numpy array.

    The header is validated: two zero bytes, the type code 0x08 (unsigned byte) and a dimension
    count of 1..4, followed by that many big-endian 32-bit sizes whose product must equal the
    payload length. Anything else raises :class:`DataError`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        # Sniff the gzip magic instead of trusting the suffix: some mirrors serve decompressed
        # files under .gz names and vice versa.
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # BadGzipFile is an OSError; truncated gzip raises EOFError
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc

    if len(raw) < 4:
        raise DataError(f"corrupt IDX file {path}: only {len(raw)} bytes")
    zero0, zero1, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or dtype_code != 0x08 or not 1 <= ndim <= 4:
        magic = int.from_bytes(raw[:4], "big")
        raise DataError(
            f"corrupt IDX file {path}: bad magic number 0x{magic:08x} "
            "(expected 0x00000801..0x00000804, unsigned-byte data)"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"corrupt IDX file {path}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    payload = len(raw) - header_len
    if payload != expected:
        raise DataError(
            f"corrupt IDX file {path}: header says dimensions {dims} ({expected} bytes) "
            f"but the file holds {payload} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_idx_file(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx_dir_complete(directory: Path) -> bool:
    return all(_find_idx_file(directory, base) is not None for _, base in _IDX_FILES)


def _idx_search_dirs(name: str, data_dir: str | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir:
        given = Path(data_dir).expanduser()
        # Accept both the folder holding the files and a parent with a <name>/ subfolder.
        dirs += [given, given / name]
    env = os.environ.get("SPARSETRAIN_DATA")
    if env:
        root = Path(env).expanduser()
        dirs += [root / name, root]
    dirs += [_SYSTEM_DATA_ROOT / name, _cache_root() / name]
    # Drop duplicates while keeping the order.
    return list(dict.fromkeys(dirs))


def _write_bytes(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def _download_idx(name: str, target: Path) -> None:
    """Fetch the four official .gz files into ``target``, verifying MD5s; raise DataError on failure."""
    base_url = _IDX_URLS[name]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache directory {target}: {exc}") from exc
    for _, base in _IDX_FILES:
        dest = target / f"{base}.gz"
        if dest.is_file():
            continue
        url = f"{base_url}{base}.gz"
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                data = resp.read()
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()  # integrity, not security
            want = _IDX_MD5[name][base]
            if digest != want:
                raise DataError(f"checksum mismatch for {url}: got md5 {digest}, expected {want}")
            # Atomically (beside the destination, then renamed), so an interrupted download never leaves a
            # truncated file that a later run would trust.
            write_atomic(dest, functools.partial(_write_bytes, data=data))
        except SparsetrainError:
            raise
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as exc:
            # URLError and socket timeouts are OSErrors; IncompleteRead is an HTTPException.
            raise DataError(f"download of {url} failed: {exc}") from exc


def _load_idx_dataset(name: str, data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    searched = _idx_search_dirs(name, data_dir)
    found = next((d for d in searched if _idx_dir_complete(d)), None)
    if found is not None and data_dir and found not in searched[:2]:
        logger.warning("%s: no IDX files in --data-dir %s; using %s instead", name, data_dir, found)

    download_error = ""
    if found is None and download:
        cache = _cache_root() / name
        try:
            _download_idx(name, cache)
            found = cache
        except DataError as exc:
            download_error = f" Downloading from {_IDX_URLS[name]} failed ({exc})."
    if found is None:
        names = ", ".join(f"{base}[.gz]" for _, base in _IDX_FILES)
        searched_txt = ", ".join(str(d) for d in searched)
        if name == "fashion-mnist":
            system_hint = (
                f"or on Debian/Ubuntu `apt-get install dataset-fashion-mnist`, which installs the official "
                f"files under {_SYSTEM_DATA_ROOT / name}"
            )
        else:
            system_hint = f"or put the files in {_cache_root() / name}"
        raise DataError(
            f"could not find the {name} dataset. Searched: {searched_txt}; none holds all four IDX files "
            f"({names}).{download_error}{'' if download else ' Downloading was disabled.'} "
            f"To fix: pass `--data-dir DIR` (data_dir=DIR) naming a folder with the four IDX files, "
            f"or set the SPARSETRAIN_DATA environment variable to such a folder (or to a parent with a "
            f"`{name}/` subfolder), {system_hint}."
        )

    logger.info("loading %s from %s", name, found)
    arrays: dict[str, np.ndarray] = {}
    for role, base in _IDX_FILES:
        path = _find_idx_file(found, base)
        assert path is not None  # guaranteed by _idx_dir_complete
        arrays[role] = read_idx(path)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"corrupt {name} {split} files in {found}: expected 3-D images and 1-D labels, "
                f"got shapes {images.shape} and {labels.shape}"
            )
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"corrupt {name} {split} files in {found}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"corrupt {name} {split} labels in {found}: label {int(labels.max())} > 9")
    if arrays["train_images"].shape[1:] != arrays["test_images"].shape[1:]:
        raise DataError(f"{name} train and test images in {found} have different sizes")

    def images_to_tensor(a: np.ndarray) -> Tensor:
        # (N, H, W) uint8 -> (N, 1, H, W) float32 in [0, 1]
        return torch.from_numpy(a.copy()).unsqueeze(1).float().div_(255.0)

    return (
        images_to_tensor(arrays["train_images"]),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        images_to_tensor(arrays["test_images"]),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


# --------------------------------------------------------------------------------------------------
# Other sources
# --------------------------------------------------------------------------------------------------

# Seed of the reference MNIST-1D data set (mnist1d's default). Fixed so that every training seed
# sees the same data, comparable with published MNIST-1D results.
_MNIST1D_SEED = 42
# Fixed seed of the digits train/test split: the test set must not change with the training seed.
_DIGITS_TEST_SEED = 1797


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Generation takes seconds and is deterministic, so it is done once per process.
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(f"the mnist1d dataset needs the mnist1d package: `pip install mnist1d` ({exc})") from exc
    args = get_dataset_args()
    args.seed = _MNIST1D_SEED
    # make_dataset reseeds Python's and numpy's global generators; restore them afterwards so that
    # loading data does not change what the caller's own random draws produce.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (
        np.asarray(data["x"], dtype=np.float32),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float32),
        np.asarray(data["y_test"], dtype=np.int64),
    )
    for a in arrays:
        a.flags.writeable = False  # shared by every call; guard the cache against mutation
    return arrays


def _load_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays()
    # torch.tensor copies, so the cached arrays stay pristine; (N, L) -> (N, 1, L) for Conv1d nets.
    return (
        torch.tensor(x_tr).unsqueeze(1),
        torch.tensor(y_tr),
        torch.tensor(x_te).unsqueeze(1),
        torch.tensor(y_te),
    )


def _load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(f"the digits dataset needs scikit-learn: `pip install scikit-learn` ({exc})") from exc
    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N,1,8,8)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    n = x.shape[0]
    g = torch.Generator().manual_seed(_DIGITS_TEST_SEED)
    perm = torch.randperm(n, generator=g)
    n_test = round(0.2 * n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _cifar_dir(data_dir: str | None) -> Path:
    if not data_dir:
        raise DataError(
            "cifar10 is read only from a local copy: pass `--data-dir DIR` (data_dir=DIR) pointing at the "
            "python version of CIFAR-10 (the `cifar-10-batches-py` folder with data_batch_1..5 and "
            "test_batch, from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz). "
            "It is never downloaded."
        )
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() and any(candidate.glob("data_batch_*")):
            return candidate
    raise DataError(
        f"no CIFAR-10 batches found in {root} or {root / 'cifar-10-batches-py'}: expected files "
        "data_batch_1..5 and test_batch (the python version of CIFAR-10, cifar-10-python.tar.gz, extracted)"
    )


# A CIFAR-10 batch is a pickle, and unpickling runs whatever callables the file names: a crafted batch could run
# any code. So batches are read by an unpickler that resolves only the few globals real batches name (the official
# files were pickled by Python 2 with numpy 1; re-pickled copies name numpy 2's module and, at protocol 5,
# ``_frombuffer``; Python 3 at protocol <= 2 stores bytes through ``_codecs.encode``), each wrapped so that it can
# only rebuild a numeric array or bytes. Anything else is refused before it is called.
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct, whichever numpy this is
_NP_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer
# An official batch is about 31 MB; the whole file is read into memory, so a larger one is refused up front.
_MAX_CIFAR_BATCH_BYTES = 512 * 2**20
# numpy pickles an array as an empty placeholder (shape (0,)) then fills it from its own bytes; a larger
# placeholder would allocate memory the file never paid for.
_MAX_RECONSTRUCT_ELEMENTS = 1


def _cifar_reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array reconstruction of {subtype!r}, expected numpy.ndarray")
    if not isinstance(shape, tuple) or not all(type(s) is int and s >= 0 for s in shape):
        raise pickle.UnpicklingError(f"array reconstruction with shape {shape!r}")
    if math.prod(shape) > _MAX_RECONSTRUCT_ELEMENTS:
        raise pickle.UnpicklingError(f"array placeholder of shape {shape} (numpy writes shape (0,))")
    return _NP_RECONSTRUCT(np.ndarray, shape, dtype)


def _cifar_dtype(*args: object) -> np.dtype:
    dtype = np.dtype(*args)  # type: ignore[call-overload]
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"dtype {dtype} holds Python objects")
    return dtype


def _cifar_codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Python 3's protocol <= 2 writes bytes as _codecs.encode(latin-1 text, "latin1"); nothing else is needed.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_CIFAR_GLOBALS: dict[tuple[str, str], object] = {
    **{(module, "_reconstruct"): _cifar_reconstruct for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _NP_FROMBUFFER for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _cifar_dtype,
    ("_codecs", "encode"): _cifar_codecs_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only :data:`_CIFAR_GLOBALS`; any other global (os.system, builtins.eval, ...) is refused."""

    def find_class(self, module: str, name: str) -> object:
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            # Python 2 pickles (and protocol <= 2) say __builtin__ for what Python 3 calls builtins.
            raise _RefusedGlobal(f"{'builtins' if module == '__builtin__' else module}.{name}")
        return found


def _check_pickle_opcodes(raw: bytes) -> None:
    """Walk the opcodes without running them: a malformed stream, or a memo index far beyond the number of
    opcodes (the C unpickler sizes its memo table by the largest index, so one opcode could claim gigabytes),
    is refused before unpickling starts."""
    count = 0
    for opcode, arg, _ in pickletools.genops(io.BytesIO(raw)):
        count += 1
        if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and int(arg) > count:
            raise pickle.UnpicklingError(f"memo index {arg} at opcode {count}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        size = path.stat().st_size
        if size > _MAX_CIFAR_BATCH_BYTES:
            raise DataError(
                f"CIFAR-10 batch {path} has {size:,} bytes; an official batch has about 31 MB "
                f"(refused above {_MAX_CIFAR_BATCH_BYTES:,})"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    try:
        _check_pickle_opcodes(raw)
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refused to load CIFAR-10 batch {path}: it names the Python global {exc.name!r}, which a CIFAR-10 "
            "batch never needs. A pickle that names other globals can run code when loaded, so this file may be "
            "malicious; reading stopped before calling it. Use the official cifar-10-python.tar.gz files."
        ) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: not a valid CIFAR-10 pickle ({exc})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"corrupt CIFAR-10 batch {path}: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    # Only an array and a flat list of integers: np.asarray over nested lists that share references could blow
    # a small pickle up into a huge array.
    if not isinstance(data, np.ndarray) or not (
        isinstance(labels, list) and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels)
    ):
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: b'data' must be a numpy array and b'labels' a list of integers, got "
            f"{type(data).__name__} and {type(labels).__name__}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: data {data.dtype} {data.shape}, labels {labels.shape} "
            "(expected uint8 (N, 3072) and N labels)"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise DataError(
            f"corrupt CIFAR-10 batch {path}: labels must be 0..9, found {int(labels.min())}..{int(labels.max())}"
        )
    return data, labels


def _load_cifar10(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    directory = _cifar_dir(data_dir)

    def batch_number(p: Path) -> int:
        m = re.search(r"(\d+)$", p.name)
        return int(m.group(1)) if m else 0

    # Accept any subset of the training batches (handy for tests and quick experiments).
    train_files = sorted((p for p in directory.glob("data_batch_*") if p.is_file()), key=batch_number)
    logger.info("loading cifar10 from %s (%d training batches)", directory, len(train_files))
    parts = [_read_cifar_batch(p) for p in train_files]
    x_tr = np.concatenate([d for d, _ in parts])
    y_tr = np.concatenate([lab for _, lab in parts])
    x_te, y_te = _read_cifar_batch(directory / "test_batch")

    def to_x(a: np.ndarray) -> Tensor:
        return torch.from_numpy(a.reshape(-1, 3, 32, 32).copy()).float().div_(255.0)

    return to_x(x_tr), torch.from_numpy(y_tr), to_x(x_te), torch.from_numpy(y_te)


_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not data_dir:
        raise DataError(
            "the npz dataset needs `--data-dir FILE.npz` (data_dir=...) naming a .npz file with arrays "
            "x_train, y_train, x_test, y_test"
        )
    path = Path(data_dir).expanduser()
    if not path.is_file():
        raise DataError(f"npz dataset: {path} is not a file (expected a .npz with x_train, y_train, x_test, y_test)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"npz dataset {path} lacks the arrays {', '.join(missing)} "
                    f"(has: {', '.join(npz.files) or 'nothing'}; needs {', '.join(_NPZ_KEYS)})"
                )
            arrays = {k: npz[k] for k in _NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # ValueError: object arrays need pickle, or not an npz
        raise DataError(f"cannot read npz dataset {path}: {exc}") from exc

    def to_x(a: np.ndarray, key: str) -> Tensor:
        if a.ndim < 2:
            raise DataError(f"npz dataset {path}: {key} has shape {a.shape}; expected (N, ...) with N samples")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise DataError(f"npz dataset {path}: {key} has non-numeric dtype {a.dtype}")
        if a.dtype == np.uint8:
            t = torch.from_numpy(a.astype(np.float32) / 255.0)
        else:
            t = torch.from_numpy(a.astype(np.float32))
        if t.ndim == 3:  # (N, H, W) grayscale images -> channels first
            t = t.unsqueeze(1)
        return t

    def to_y(a: np.ndarray, key: str) -> Tensor:
        a = np.squeeze(a) if a.ndim == 2 and a.shape[1] == 1 else a
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"npz dataset {path}: {key} must be a 1-D integer array, got {a.dtype} {a.shape}")
        if a.size and a.min() < 0:
            raise DataError(f"npz dataset {path}: {key} has negative labels")
        return torch.from_numpy(a.astype(np.int64))

    x_tr, y_tr = to_x(arrays["x_train"], "x_train"), to_y(arrays["y_train"], "y_train")
    x_te, y_te = to_x(arrays["x_test"], "x_test"), to_y(arrays["y_test"], "y_test")
    if x_tr.shape[0] != y_tr.shape[0] or x_te.shape[0] != y_te.shape[0]:
        raise DataError(
            f"npz dataset {path}: sample counts differ (x_train {x_tr.shape[0]} vs y_train {y_tr.shape[0]}, "
            f"x_test {x_te.shape[0]} vs y_test {y_te.shape[0]})"
        )
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(
            f"npz dataset {path}: x_train samples {tuple(x_tr.shape[1:])} vs x_test {tuple(x_te.shape[1:])}"
        )
    return x_tr, y_tr, x_te, y_te


_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _list_image_folder(split_dir: Path) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        if files:
            classes[class_dir.name] = files
    return classes


def _load_imagefolder(data_dir: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    if not data_dir:
        raise DataError(
            "the imagefolder dataset needs `--data-dir DIR` (data_dir=DIR) with train/<class>/*.png|jpg "
            "and test/<class>/* (or val/<class>/*)"
        )
    try:
        from PIL import Image
    except ImportError as exc:
        raise DataError(f"the imagefolder dataset needs Pillow: `pip install pillow` ({exc})") from exc

    root = Path(data_dir).expanduser()
    train_dir = root / "train"
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"imagefolder dataset {root}: expected subfolders train/<class>/ and test/<class>/ (or val/<class>/)"
        )
    try:
        train_files = _list_image_folder(train_dir)
        test_files = _list_image_folder(test_dir)
    except OSError as exc:
        raise DataError(f"cannot list imagefolder dataset {root}: {exc}") from exc
    if not train_files:
        raise DataError(f"imagefolder dataset {root}: no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {train_dir}")
    class_names = sorted(train_files)
    unknown = sorted(set(test_files) - set(class_names))
    if unknown:
        raise DataError(f"imagefolder dataset {root}: classes {unknown} appear in {test_dir.name}/ but not in train/")
    class_index = {c: i for i, c in enumerate(class_names)}

    first = train_files[class_names[0]][0]
    try:
        with Image.open(first) as im:
            size = im.size
            # Grayscale stays one channel; everything else (palette, RGBA, CMYK...) becomes RGB.
            mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    except OSError as exc:
        raise DataError(f"cannot read image {first}: {exc}") from exc

    def read_split(files: dict[str, list[Path]]) -> tuple[Tensor, Tensor]:
        xs: list[np.ndarray] = []
        ys: list[int] = []
        for cls, paths in files.items():
            for p in paths:
                try:
                    with Image.open(p) as im:
                        im = im.convert(mode)
                        if im.size != size:
                            im = im.resize(size, Image.Resampling.BILINEAR)
                        xs.append(np.asarray(im, dtype=np.uint8))
                except OSError as exc:
                    raise DataError(f"cannot read image {p}: {exc}") from exc
                ys.append(class_index[cls])
        if not xs:
            x = torch.empty((0, 1 if mode == "L" else 3, size[1], size[0]))
            return x, torch.empty(0, dtype=torch.int64)
        arr = np.stack(xs)
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)  # -> (N, C, H, W)
        x = torch.from_numpy(np.ascontiguousarray(arr)).float().div_(255.0)
        return x, torch.tensor(ys, dtype=torch.int64)

    x_tr, y_tr = read_split(train_files)
    x_te, y_te = read_split(test_files)
    logger.info(
        "imagefolder %s: %d classes, %d train / %d test images of %s",
        root,
        len(class_names),
        len(y_tr),
        len(y_te),
        tuple(x_tr.shape[1:]),
    )
    return x_tr, y_tr, x_te, y_te, class_names


# --------------------------------------------------------------------------------------------------
# Text: byte-level language modelling
# --------------------------------------------------------------------------------------------------

# A text file is read whole into memory, one byte per token (the windows and their targets are views of that one
# buffer); 256 MiB is far more than a CPU run trains on, and a larger file is refused before it is read.
MAX_TEXT_BYTES = 256 * 2**20
# The default corpus: this many bytes of the running interpreter's standard library sources (about 4 MB of the
# ~4.7 MB of top-level .py files in CPython 3.11), a corpus every machine with Python has, without a download.
DEFAULT_CORPUS_BYTES = 4_000_000
# The last fraction of the stream is the test set; the validation set (val_fraction) comes just before it.
TEXT_TEST_FRACTION = 0.1


def _stdlib_corpus(max_bytes: int) -> tuple[bytes, dict[str, Any]]:
    """The first ``max_bytes`` of the standard library's top-level ``*.py`` files, sorted by name, concatenated."""
    import platform
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    try:
        files = sorted(p for p in root.glob("*.py") if p.is_file())
    except OSError as exc:
        files, reason = [], f" ({exc})"
    else:
        reason = ""
    if not files:
        raise DataError(
            f"the text dataset's default corpus is the Python standard library's sources, but {root} holds no .py "
            f"files{reason}; pass `--data-dir FILE` naming a text file"
        )
    parts: list[bytes] = []
    used: list[str] = []
    size = 0
    for path in files:
        if size >= max_bytes:
            break
        try:
            data = path.read_bytes()[: max_bytes - size]
        except OSError as exc:
            raise DataError(f"cannot read {path} of the default text corpus: {exc}") from exc
        parts.append(data)
        used.append(path.name)
        size += len(data)
    info = {"source": "python standard library", "python": platform.python_version(), "root": str(root),
            "files": used}  # fmt: skip
    return b"".join(parts), info


def _text_file(data_dir: str, max_bytes: int | None) -> tuple[bytes, dict[str, Any]]:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError(f"text dataset: {str(path)!r} does not exist; --data-dir names one text file")
    if not path.is_file():
        raise DataError(
            f"text dataset: {str(path)!r} is not a regular file; --data-dir names one text file (not a folder, "
            "device or pipe)"
        )
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"text dataset: {str(path)!r} is empty")
    wanted = size if max_bytes is None else min(size, max_bytes)
    if wanted > MAX_TEXT_BYTES:
        raise DataError(
            f"text dataset: {str(path)!r} has {size:,} bytes, more than the {MAX_TEXT_BYTES:,} read into memory; "
            "use a part of it (--set dataset_options.max_bytes=N reads the first N bytes)"
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read(wanted)
    except OSError as exc:
        raise DataError(f"cannot read text file {str(path)!r}: {exc}") from exc
    return data, {"source": "file", "path": str(path.resolve()), "file_bytes": size}


def _load_text(data_dir: str | None, download: bool, context: int, max_bytes: int | None) -> TokenStream:
    if max_bytes is not None and max_bytes < 1:
        raise DataError(f"text dataset: option max_bytes must be a positive number of bytes, got {max_bytes}")
    if data_dir:
        data, info = _text_file(data_dir, max_bytes)
    else:
        data, info = _stdlib_corpus(DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes)
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # byte-level: token id = byte value, vocab 256
    logger.info("text corpus: %s", {k: v for k, v in info.items() if k != "files"})
    return TokenStream(tokens, 256, info)


def _windows(tokens: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``context`` tokens and their targets (the next token at each position): every
    token of the part is predicted once per epoch."""
    n = (tokens.numel() - 1) // context
    return tokens[: n * context].view(n, context), tokens[1 : n * context + 1].view(n, context)


def _split_stream(
    name: str, stream: TokenStream, context: int, val_fraction: float, limit_train: int | None
) -> Splits:
    """Train, validation and test by position: the first part trains, then validation, the last part tests.

    Never shuffled across the split points, so no window of the test text was seen in training."""
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise DataError(f"{name}: option context must be a positive number of tokens, got {context!r}")
    tokens = stream.tokens
    n = tokens.numel()
    n_test = round(TEXT_TEST_FRACTION * n)
    n_val = round(val_fraction * n)
    bounds = {"train": (0, n - n_val - n_test), "val": (n - n_val - n_test, n - n_test), "test": (n - n_test, n)}
    parts = {split: _windows(tokens[a:b], context) for split, (a, b) in bounds.items()}
    for split, (x, _) in parts.items():
        if x.shape[0] == 0 and (split != "val" or val_fraction > 0):
            raise DataError(
                f"{name}: {n:,} tokens are too few for windows of {context} tokens in every split (the {split} part "
                f"has {bounds[split][1] - bounds[split][0]:,}, it needs at least {context + 1}); use a larger text "
                "or a smaller dataset_options.context"
            )
    x_train, y_train = parts["train"]
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train], y_train[:limit_train]
    info = {**stream.info, "context": context, "split_tokens": {k: b - a for k, (a, b) in bounds.items()}}
    return Splits(
        train=TensorDataset(x_train, y_train),
        val=TensorDataset(*parts["val"]),
        test=TensorDataset(*parts["test"]),
        num_classes=stream.vocab,
        input_shape=(context,),
        name=name,
        metric="perplexity",
        info=info,
    )


# --------------------------------------------------------------------------------------------------
# Registry: one entry per dataset name
# --------------------------------------------------------------------------------------------------


@register_dataset("fashion-mnist", help="Fashion-MNIST: 28x28 grayscale clothing images, 10 classes (IDX files)")
def _fashion_mnist(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    return (*_load_idx_dataset("fashion-mnist", data_dir, download), 10)


@register_dataset("mnist", help="MNIST: 28x28 grayscale digits, 10 classes (IDX files)")
def _mnist(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    return (*_load_idx_dataset("mnist", data_dir, download), 10)


@register_dataset("mnist1d", help="MNIST-1D: 40-sample 1-D sequences, 10 classes (the mnist1d package)")
def _mnist1d(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    return (*_load_mnist1d(), 10)


@register_dataset("digits", help="scikit-learn's 8x8 digits, 10 classes")
def _digits(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    return (*_load_digits(), 10)


@register_dataset("cifar10", help="CIFAR-10: 32x32 colour images, 10 classes (the python batches in --data-dir)")
def _cifar10(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    return (*_load_cifar10(data_dir), 10)


@register_dataset("npz", help="your own arrays: a .npz with x_train, y_train, x_test, y_test (--data-dir)")
def _npz(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    x_tr, y_tr, x_te, y_te = _load_npz(data_dir)
    labels = torch.cat([y_tr, y_te])
    return x_tr, y_tr, x_te, y_te, int(labels.max()) + 1 if labels.numel() else 0


@register_dataset("imagefolder", help="your own images: train/<class>/*.png and test/<class>/*.png (--data-dir)")
def _imagefolder(data_dir: str | None, download: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    x_tr, y_tr, x_te, y_te, class_names = _load_imagefolder(data_dir)
    return x_tr, y_tr, x_te, y_te, len(class_names)


@register_dataset(
    "text",
    sequence=True,
    options={"context": 64, "max_bytes": None},
    help="byte-level language modelling on one text file (--data-dir FILE; default: 4 MB of the Python standard "
    "library's sources); options context (tokens per window), max_bytes; reports perplexity",
)
def _text(data_dir: str | None, download: bool, context: int = 64, max_bytes: int | None = None) -> TokenStream:
    return _load_text(data_dir, download, context, max_bytes)


# The built-in names, in order (``list_datasets()`` is the live view).
DATASETS: tuple[str, ...] = tuple(list_datasets())


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _standardize_(train_x: Tensor, *others: Tensor) -> None:
    """Standardize in place by per-channel mean/std of ``train_x`` (dim 1 is the channel for >=3-D data).

    2-D (N, D) feature data is treated as a single channel so that relative feature scales survive,
    as they do for images.
    """
    if train_x.shape[0] == 0:
        return
    if train_x.ndim >= 3:
        dims = [0, *range(2, train_x.ndim)]
        std, mean = torch.std_mean(train_x, dim=dims, keepdim=True)
    else:
        std, mean = torch.std_mean(train_x)
    # A constant channel (std 0) would give inf/NaN; leave its scale alone.
    std = torch.where(std > 0, std, torch.ones_like(std))
    for t in (train_x, *others):
        t.sub_(mean).div_(std)


def parse_classes(value: str | Sequence[int]) -> list[int]:
    """The class subset ``value`` names, in order: ``'5-9'`` (a range, both ends included), ``'0,2,4'``, or a list
    of integers. Raises ValueError for anything else, for negative or repeated classes."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    classes: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            low, dash, high = part.partition("-")
            first, last = int(low), int(high) if dash else int(low)
            if last < first:
                raise ValueError
            classes.extend(range(first, last + 1))
    except ValueError:
        raise ValueError(
            f"classes must be a range such as '5-9', a list such as '0,2,4' or [0, 2, 4] of class numbers >= 0; "
            f"got {value!r}"
        ) from None
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {value!r} names a class twice")
    return classes


def _keep_classes(x: Tensor, y: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """The samples of ``classes``, relabelled 0..k-1 in the order of ``classes``."""
    relabel = torch.full((int(y.max()) + 1 if len(y) else 1,), -1, dtype=torch.long)
    known = [c for c in classes if c < len(relabel)]
    relabel[known] = torch.tensor([classes.index(c) for c in known], dtype=torch.long)
    new = relabel[y]
    keep = new >= 0
    return x[keep], new[keep]


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit_train: int | None = None,
    download: bool = True,
    classes: str | Sequence[int] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Splits:
    """Load a dataset into memory and split it into train / validation / test.

    Args:
        name: one of :func:`list_datasets`.
        data_dir: where to read the data from; its meaning depends on the dataset (a folder of IDX
            files, the CIFAR-10 batch folder, a .npz file, an image-folder root).
        val_fraction: fraction of the training data held out as a validation set (0 allowed).
        seed: seeds the validation split (a local generator; the global RNG is untouched).
        limit_train: keep only this many training samples (after the split), for quick runs.
        download: whether MNIST / Fashion-MNIST may be downloaded into the user cache when absent.
        classes: keep only these classes (:func:`parse_classes`: ``'5-9'``, ``'0,2,4'``, a list), relabelled
            0..k-1 in that order, in every split (a transfer task: pre-train on 0-4, fine-tune on 5-9).
        options: the dataset's own options (``text``: ``context``, ``max_bytes``), checked against those it declares.

    Raises:
        DataError: the data could not be found or read; the message says how to provide it.
    """
    key = name.lower()
    if key not in DATASET_REGISTRY:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit_train is not None and limit_train < 1:
        raise DataError(f"limit_train must be a positive integer, got {limit_train}")

    try:
        chosen = {**DATASET_REGISTRY.entry(key).meta["options"], **dataset_options(key, options)}
    except ValueError as error:
        raise DataError(str(error)) from None
    if DATASET_REGISTRY.entry(key).meta["sequence"]:
        stream = DATASET_REGISTRY.get(key)(data_dir, download, **chosen)
        splits = _split_stream(key, stream, chosen["context"], val_fraction, limit_train)
        logger.info("%r", splits)
        return splits

    x_tr, y_tr, x_te, y_te, num_classes = DATASET_REGISTRY.get(key)(data_dir, download)
    if classes is not None:
        try:
            subset = parse_classes(classes)
        except ValueError as error:
            raise DataError(str(error)) from None
        outside = [c for c in subset if c >= num_classes]
        if outside:
            raise DataError(f"{key} has classes 0-{num_classes - 1}; classes {classes!r} names {outside}")
        (x_tr, y_tr), (x_te, y_te) = _keep_classes(x_tr, y_tr, subset), _keep_classes(x_te, y_te, subset)
        num_classes = len(subset)

    n = x_tr.shape[0]
    n_val = round(val_fraction * n)
    if n_val >= n:
        raise DataError(f"{key}: val_fraction={val_fraction} leaves no training data out of {n} samples")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x_val, y_val = x_tr[val_idx], y_tr[val_idx]
    x_train, y_train = x_tr[train_idx], y_tr[train_idx]
    del x_tr  # the indexed copies above are all we need; free the full array early
    # Statistics come from the training part only, before limit_train, so that a quick run with
    # limit_train sees the same normalization as a full one.
    _standardize_(x_train, x_val, x_te)
    if limit_train is not None:
        x_train, y_train = x_train[:limit_train].clone(), y_train[:limit_train].clone()

    splits = Splits(
        train=TensorDataset(x_train, y_train),
        val=TensorDataset(x_val, y_val),
        test=TensorDataset(x_te, y_te),
        num_classes=num_classes,
        input_shape=tuple(int(s) for s in x_train.shape[1:]),
        name=key,
    )
    logger.info("%r", splits)
    return splits


def load_run_dataset(config: Mapping[str, Any], data_dir: str | None = None) -> Splits:
    """The data of a run as its saved config names it, split as in training; ``data_dir`` overrides the config's
    (the files may have moved since). For commands that evaluate a checkpoint (``eval``, ``prune``)."""
    return load_dataset(
        config["dataset"],
        data_dir=data_dir or config["data_dir"],
        val_fraction=config["val_fraction"],
        seed=config["seed"],
        classes=config.get("classes"),
        options=config.get("dataset_options"),
    )


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Number of batches :func:`iterate_batches` yields per rank for a dataset of ``n`` samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    per_rank = n // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixing seed and epoch into one 64-bit value gives every epoch its own permutation while
    # staying a pure function of (seed, epoch), so a resumed run replays the same order.
    return (seed * 1000003 + epoch) & 0xFFFF_FFFF_FFFF_FFFF


def iterate_batches(
    ds: TensorDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` mini-batches of an in-memory dataset, much faster than a DataLoader.

    The order is a permutation drawn from a local generator seeded by ``(seed, epoch)``. With
    ``world_size > 1`` each rank takes the strided share ``perm[rank::world_size]``, truncated to
    ``len(ds) // world_size`` so that all ranks run the same number of steps.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    x, y = ds.tensors[0], ds.tensors[1]
    n = x.shape[0]
    per_rank = n // world_size
    if shuffle:
        g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        idx: Tensor | None = torch.randperm(n, generator=g)
    else:
        idx = None if world_size == 1 else torch.arange(n)
    if idx is not None and world_size > 1:
        idx = idx[rank::world_size][:per_rank]

    for start in range(0, per_rank, batch_size):
        stop = min(start + batch_size, per_rank)
        if drop_last and stop - start < batch_size:
            break
        if idx is None:
            # Unshuffled single-process iteration: contiguous slices are views, no copy needed.
            yield x[start:stop], y[start:stop]
        else:
            b = idx[start:stop]
            yield x[b], y[b]
