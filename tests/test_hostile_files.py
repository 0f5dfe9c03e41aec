"""Hostile and corrupted files: each is built here by hand, and each must end in one clear error.

Never in code execution (a pickle that would create a marker file if it ran), never in a large allocation (a few
hundred bytes that claim 10^9 elements), never in a raw KeyError / TypeError / RecursionError, and never in a
rename over something that is not a regular file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import shlex
import stat
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sparsetrain import export
from sparsetrain.cli import main as cli_main
from sparsetrain.errors import CheckpointError, ConfigError
from sparsetrain.export import ExportError
from sparsetrain.train import checkpoint
from sparsetrain.train.data import DataError, _read_cifar_batch, load_dataset

pytest.importorskip("safetensors")

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- payloads
class _Exec:
    """Unpickles into ``exec(code)``: what a crafted pickle does. ``code`` creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self) -> tuple[Any, ...]:
        return exec, (self.code,)


class _System:
    """Unpickles into ``os.system("touch marker")``."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {shlex.quote(str(marker))}"

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


PAYLOADS = {"builtins.exec": _Exec, "posix.system": _System}


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


@contextlib.contextmanager
def little_memory_and_time(limit_bytes: int = 64 * 2**20, seconds: float = 2.0) -> Iterator[None]:
    """Asserts the block allocated little (Python objects via tracemalloc, tensors via the peak RSS) and was fast."""
    rss = _maxrss_bytes()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < limit_bytes, f"Python allocations peaked at {peak:,} bytes"
    assert _maxrss_bytes() - rss < limit_bytes, f"peak RSS grew by {_maxrss_bytes() - rss:,} bytes"
    assert elapsed < seconds, f"took {elapsed:.2f} s"


# ---------------------------------------------------------------------------------------------------- CIFAR batches
def _batch(n: int, seed: int = 0) -> dict[bytes, Any]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }


def _write_cifar(directory: Path, n_train: int = 20, n_test: int = 6) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "data_batch_1").write_bytes(pickle.dumps(_batch(n_train, 1)))
    (directory / "test_batch").write_bytes(pickle.dumps(_batch(n_test, 2)))
    return directory


def _write_malicious_cifar(directory: Path, payload: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("data_batch_1", "test_batch"):
        (directory / name).write_bytes(pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2))
    return directory


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_malicious_cifar_batch_is_refused_and_never_runs(tmp_path, name):
    marker = tmp_path / "marker"
    raw = pickle.dumps({b"data": PAYLOADS[name](marker), b"labels": [0]}, protocol=2)
    pickle.loads(raw)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    directory = tmp_path / "cifar"
    _write_malicious_cifar(directory, PAYLOADS[name](marker))
    with pytest.raises(DataError, match=rf"refused to load CIFAR-10 batch .*'{name}'.* may be\s+malicious"):
        load_dataset("cifar10", data_dir=str(directory))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_real_cifar_batches_still_load_at_every_protocol(tmp_path, protocol):
    batch = _batch(5)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    data, labels = _read_cifar_batch(path)
    assert np.array_equal(data, batch[b"data"]) and labels.tolist() == batch[b"labels"]


def test_official_numpy1_module_names_load(tmp_path):
    # The official batches were pickled with numpy 1, which names numpy.core.multiarray (numpy 2: numpy._core).
    raw = pickle.dumps(_batch(4), protocol=2)
    current = np.empty(0).__reduce__()[0].__module__.encode()
    old = raw.replace(current + b"\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
    assert old != raw
    path = tmp_path / "data_batch_1"
    path.write_bytes(old)
    assert _read_cifar_batch(path)[0].shape == (4, 3072)


class _Placeholder:
    """Unpickles into numpy's array placeholder, asking for a huge one (numpy itself always writes shape (0,))."""

    def __reduce__(self) -> tuple[Any, ...]:
        return np.empty(0).__reduce__()[0], (np.ndarray, (10**12,), b"b")


def _memo_bomb() -> bytes:
    # PROTO 2, NONE, LONG_BINPUT 2**32 - 16: the C unpickler sizes its memo table by the index (tens of GB).
    return b"\x80\x02Nr" + (2**32 - 16).to_bytes(4, "little") + b"."


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: pickle.dumps({b"data": _Placeholder(), b"labels": [0]}, protocol=2), "placeholder"),
        (_memo_bomb, "memo index"),
        # labels that share references: np.asarray would expand them.
        (lambda: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [[0] * 8] * 8}), "list of int"),
        (lambda: pickle.dumps({b"data": np.zeros((1, 3072), object), b"labels": [0]}), "holds Python objects"),
        (lambda: pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [11]}), "labels must be 0..9"),
        (lambda: b"", "not a valid CIFAR-10 pickle"),
        (lambda: pickle.dumps([1, 2, 3]), "expected a dict"),
    ],
)
def test_hostile_cifar_structures_are_refused_without_allocating(tmp_path, make, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(make())
    with little_memory_and_time():
        with pytest.raises(DataError, match=message):
            _read_cifar_batch(path)


# ---------------------------------------------------------------------------------------------------- checkpoints
def _cifar_checkpoint(run: Path, data_dir: str) -> Path:
    """A sparsetrain checkpoint built by hand (no training): LeNet-5 for CIFAR-10, config naming ``data_dir``."""
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import checkpoint_payload
    from sparsetrain.train.models import build_model, model_spec

    config = resolve(None, {"dataset": "cifar10", "data_dir": data_dir, "model": "lenet5", "out": str(run)})
    spec = model_spec("lenet5", (3, 32, 32), 10)
    torch.manual_seed(0)
    path = run / "sparse_final.pt"
    checkpoint.save_atomic(checkpoint_payload(build_model(**spec), spec, config, kind="sparse_final"), path)
    return path


def test_cli_eval_of_a_run_folder_shipping_malicious_cifar_runs_nothing(tmp_path):
    run = tmp_path / "downloaded_run"
    marker = tmp_path / "marker"
    _cifar_checkpoint(run, data_dir="cifar")  # relative: found when the user works inside the run folder
    _write_malicious_cifar(run / "cifar", _System(marker))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-m", "sparsetrain", "eval", "sparse_final.pt"],
        cwd=run, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: refused to load CIFAR-10 batch") and "'posix.system'" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not marker.exists()


def test_checkpoint_data_dir_is_not_resolved_against_the_checkpoint_and_data_dir_overrides(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    marker = tmp_path / "marker"
    ckpt = _cifar_checkpoint(run, data_dir="cifar")
    _write_malicious_cifar(run / "cifar", _Exec(marker))
    good = _write_cifar(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)  # "cifar" means ./cifar here, which does not exist: not run/cifar
    assert cli_main(["eval", str(ckpt)]) == 1
    assert "no CIFAR-10 batches found in cifar" in capsys.readouterr().err
    assert cli_main(["eval", str(ckpt), "--data-dir", str(good)]) == 0  # the user's --data-dir wins
    assert "test accuracy" in capsys.readouterr().out
    prune = ["prune", str(ckpt), "--sparsity", "0.5", "--calibrate", "0"]
    assert cli_main(prune) == 1
    assert "no CIFAR-10 batches found in cifar" in capsys.readouterr().err
    assert cli_main([*prune, "--data-dir", str(good)]) == 0
    assert (run / "pruned_s0.5.pt").is_file()
    assert not marker.exists()


def test_train_resume_takes_the_users_data_dir(tmp_path, capsys):
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import LAST, Run

    data = _write_cifar(tmp_path / "cifar", n_train=20, n_test=4)
    run = tmp_path / "run"
    config = resolve(None, {
        "dataset": "cifar10", "data_dir": str(data), "model": "mlp", "method": "dense", "epochs": 2,
        "batch_size": 9, "out": str(run), "plots": False, "device": "cpu", "threads": 1, "progress": False,
    })  # fmt: skip

    def stop(row: dict[str, Any]) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Run(config, on_epoch=stop).run()
    assert (run / LAST).is_file()
    moved = data.rename(tmp_path / "moved")  # the recorded data_dir no longer exists
    assert cli_main(["train", "--resume", str(run), "--data-dir", str(moved), "--no-progress"]) == 0
    assert "(resumed)" in capsys.readouterr().out
    assert checkpoint.load(run / LAST)["config"]["data_dir"] == str(moved)


def test_checkpoint_naming_a_python_global_says_it_may_be_malicious(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "config": _Exec(marker)}, path)
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(path)
    message = str(caught.value)
    assert "holds Python objects other than tensors" in message and "global 'exec'" in message
    assert "may be malicious" in message
    assert "weights_only" not in message and "trusted source" not in message  # never torch's advice to load it
    assert cli_main(["eval", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "global 'exec'" in err and err.count("\n") == 1
    assert not marker.exists()


def test_empty_and_garbage_checkpoints_get_a_message(tmp_path, capsys):
    empty = tmp_path / "last.pt"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        checkpoint.load(empty)
    assert cli_main(["eval", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint") and "empty" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80")  # a pickle cut after one byte
    with pytest.raises(CheckpointError, match="garbage.pt"):
        checkpoint.load(garbage)


# ---------------------------------------------------------------------------------------------------- --force
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writers() -> dict[str, Callable[[Path], None]]:
    return {
        "export": lambda path: export.save({"w": torch.ones(3)}, path),
        "checkpoint": lambda path: checkpoint.save_atomic({"w": torch.ones(3)}, path),
    }


@pytest.mark.parametrize("writer", ["export", "checkpoint"])
@pytest.mark.parametrize("kind", ["fifo", "symlink to fifo", "symlink to /dev/null", "directory"])
def test_only_a_regular_file_is_ever_replaced(tmp_path, writer, kind):
    target = tmp_path / "out.bin"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink to fifo":
        target.symlink_to(fifo)
    elif kind == "symlink to /dev/null":
        target.symlink_to("/dev/null")  # the link is in tmp_path; /dev/null itself is never a target
    else:
        target.mkdir()
    before = os.lstat(target)
    with pytest.raises(ConfigError, match="only a regular file is ever replaced|is a directory"):
        _writers()[writer](target)
    after = os.lstat(target)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "pipe"]  # no temporary file left


@pytest.mark.parametrize("writer", ["export", "checkpoint"])
def test_replaced_file_keeps_its_permissions_and_a_new_file_follows_the_umask(tmp_path, writer):
    write = _writers()[writer]
    existing = tmp_path / "existing"
    existing.write_bytes(b"old")
    existing.chmod(0o640)
    write(existing)
    assert existing.read_bytes() != b"old"
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640
    fresh = tmp_path / "fresh"
    write(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~_umask()


def test_cli_export_and_prune_force_refuse_a_fifo_before_any_work(tmp_path, capsys):
    ckpt = _cifar_checkpoint(tmp_path / "run", data_dir=str(tmp_path / "no-data"))
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    assert cli_main(["export", str(ckpt), "-o", str(fifo), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is a fifo (named pipe)" in err and err.count("\n") == 1
    out_dir = tmp_path / "pruned"
    out_dir.mkdir()
    os.mkfifo(out_dir / "pruned_s0.5.pt")
    assert cli_main(["prune", str(ckpt), "--sparsity", "0.5", "--out-dir", str(out_dir), "--force"]) == 2
    assert "is a fifo (named pipe)" in capsys.readouterr().err  # refused before the (missing) data is looked for
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISFIFO(os.lstat(out_dir / "pruned_s0.5.pt").st_mode)


# ---------------------------------------------------------------------------------------------------- export files
def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _join(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data section to 8 bytes
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def _edit(path: Path, out: Path, *, header: Callable | None = None, info: Callable | None = None) -> Path:
    """Rewrite an export's header: ``header(dict)`` on the safetensors header, ``info(dict)`` on our metadata."""
    head, data = _split(path)
    if info is not None:
        parsed = json.loads(head["__metadata__"]["sparsetrain"])
        info(parsed)
        head["__metadata__"]["sparsetrain"] = json.dumps(parsed)
    if header is not None:
        header(head)
    return _join(out, head, data)


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A small export with all three encodings: CSR (w), bitmask (b) and dense (n)."""
    w = torch.zeros(4, 1000)
    w[0, 1], w[2, 5], w[3, 999] = 1.0, -2.0, 3.0
    b = torch.arange(64, dtype=torch.float32) % 2
    path = tmp_path / "mixed.safetensors"
    export.save({"w": w, "b": b, "n": torch.tensor(7)}, path)
    encodings = {k: r["encoding"] for k, r in export.read(path).tensors.items()}
    assert encodings == {"w": "csr", "b": "bitmask", "n": "dense"}
    return path


@pytest.mark.parametrize("elements", [10**9, 10**12, 10**300])
def test_tiny_csr_file_claiming_a_huge_tensor_is_refused_before_allocating(mixed, tmp_path, elements):
    def claim(info: dict) -> None:
        info["tensors"]["w"]["shape"] = [4, elements // 4]  # crow still has rows + 1 entries: consistent

    path = _edit(mixed, tmp_path / "claim.safetensors", info=claim)
    assert path.stat().st_size < 2000
    with little_memory_and_time():
        with pytest.raises(ExportError, match=r"claims tensors of [\d,]+ bytes once decoded \('w' has shape"):
            export.read(path)


def _wide_mlp_export(tmp_path: Path) -> Path:
    """LeNet-300-100 for 400 inputs with an all-zero first layer, stored as CSR (a few hundred bytes for it)."""
    from sparsetrain.train.models import build_model, model_spec

    spec = model_spec("mlp", (1, 1, 400), 3)
    model = build_model(**spec)
    with torch.no_grad():
        model.state_dict()["1.weight"].zero_()
    path = tmp_path / "mlp.safetensors"
    export.save(model, path, metadata={"model_spec": spec})
    assert export.read(path).tensors["1.weight"]["encoding"] == "csr"
    return path


def test_spec_with_huge_num_classes_is_refused_before_building_the_model(tmp_path):
    def huge(info: dict) -> None:
        info["metadata"]["model_spec"]["num_classes"] = 5_000_000

    path = _edit(_wide_mlp_export(tmp_path), tmp_path / "huge.safetensors", info=huge)
    with little_memory_and_time():
        with pytest.raises(ExportError, match=r"'5\.weight' has shape \(3, 100\) in the file but \(5000000, 100\)"):
            export.load(path)


def test_spec_and_file_agreeing_on_a_huge_model_are_refused_by_size(tmp_path):
    # Both claim a first layer of 300 x 10^10: consistent, a few hundred bytes as CSR, and 12 TB decoded.
    def wide(info: dict) -> None:
        info["metadata"]["model_spec"]["input_shape"] = [1, 1, 10**10]
        info["tensors"]["1.weight"]["shape"] = [300, 10**10]

    path = _edit(_wide_mlp_export(tmp_path), tmp_path / "wide.safetensors", info=wide)
    with little_memory_and_time():
        with pytest.raises(ExportError, match="claims tensors of 12,000,"):
            export.load(path)
    assert export.load(_wide_mlp_export(tmp_path)) is not None  # the honest file still loads


def _set(path: list[str], value: Any) -> Callable[[dict], None]:
    def apply(target: dict) -> None:
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


def _delete(path: list[str]) -> Callable[[dict], None]:
    def apply(target: dict) -> None:
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return apply


def _overlap(header: dict) -> None:
    header["w::extra"] = dict(header["w::col"])  # a second tensor on the same bytes


DEEP = 100_000
HEADER_EDITS = {
    "missing data_offsets": _delete(["w::col", "data_offsets"]),
    "data_offsets a string": _set(["w::col", "data_offsets"], "0-12"),
    "data_offsets of three": _set(["w::col", "data_offsets"], [0, 4, 8]),
    "negative offset": _set(["w::col", "data_offsets"], [-12, 0]),
    "offsets not matching the shape": _set(["w::col", "data_offsets"], [0, 4]),
    "offsets beyond the file": _set(["w::col", "data_offsets"], [10**9, 10**9 + 12]),
    "overlapping tensors": _overlap,
    "shape a string": _set(["w::col", "shape"], "3"),
    "shape with a float": _set(["w::col", "shape"], [3.0]),
    "shape with a bool": _set(["w::col", "shape"], [True]),
    "negative shape": _set(["w::col", "shape"], [-3]),
    "unknown dtype": _set(["w::col", "dtype"], "I48"),
    "entry not a mapping": _set(["w::col"], [1, 2]),
    "__metadata__ a list": _set(["__metadata__"], ["sparsetrain"]),
    "__metadata__ value a number": _set(["__metadata__", "sparsetrain"], 5),
}
INFO_EDITS = {
    "tensors a list": _set(["tensors"], []),
    "user metadata a list": _set(["metadata"], [1]),
    "version a bool": _set(["version"], True),
    "record not a mapping": _set(["tensors", "w"], "csr"),
    "record without shape": _delete(["tensors", "w", "shape"]),
    "record shape a string": _set(["tensors", "w", "shape"], "4x1000"),
    "record dtype a number": _set(["tensors", "w", "dtype"], 32),
    "record dtype not a dtype": _set(["tensors", "w", "dtype"], "Tensor"),
    "unknown encoding": _set(["tensors", "w", "encoding"], "zip"),
    "crc32 a list": _set(["tensors", "w", "crc32"], [1]),
    "crc32 values strings": _set(["tensors", "b", "crc32", "b::mask"], "123"),
    "negative_zeros a string": _set(["tensors", "w", "negative_zeros"], "yes"),
    "negative_zeros without signs": _set(["tensors", "w", "negative_zeros"], True),
    "csr claiming more values than elements": _set(["tensors", "w", "shape"], [4, 0]),
    "bitmask of the wrong size": _set(["tensors", "b", "shape"], [640]),
    "astronomical shape": _set(["tensors", "b", "shape"], [10**200, 10**200]),
    "dense of the wrong shape": _set(["tensors", "n", "shape"], [2]),
    "bitmask stored as ints": _set(["tensors", "b", "stored_dtype"], "int64"),
    "name with the separator": lambda info: info["tensors"].update({"x::y": info["tensors"]["n"]}),
}


@pytest.mark.parametrize("edit", sorted(HEADER_EDITS))
def test_hostile_safetensors_header_is_an_export_error(mixed, tmp_path, edit):
    path = _edit(mixed, tmp_path / "bad.safetensors", header=HEADER_EDITS[edit])
    with pytest.raises(ExportError):
        export.read(path)


@pytest.mark.parametrize("edit", sorted(INFO_EDITS))
def test_hostile_sparsetrain_metadata_is_an_export_error(mixed, tmp_path, edit):
    path = _edit(mixed, tmp_path / "bad.safetensors", info=INFO_EDITS[edit])
    with pytest.raises(ExportError):
        export.read(path)


@pytest.mark.parametrize(
    "header",
    [
        b"[" * DEEP + b"]" * DEEP,  # the whole header nested too deeply for the JSON parser
        json.dumps({"__metadata__": {"sparsetrain": "[" * DEEP + "]" * DEEP}}).encode(),
        json.dumps({"__metadata__": {"sparsetrain": json.dumps({"format": export.FORMAT, "version": 1})}}).encode(),
        b'"just a string"',
    ],
    ids=["deep header", "deep metadata", "no tensors", "string header"],
)
def test_malformed_headers_are_export_errors(tmp_path, header):
    with pytest.raises(ExportError):
        export.read(_join(tmp_path / "bad.safetensors", header, b""))


@pytest.mark.parametrize(
    "spec",
    [["mlp"], {"name": "mlp"}, {"name": "mlp", "input_shape": "1x28x28", "num_classes": 10},
     {"name": "mlp", "input_shape": [1, 1, 400], "num_classes": "3"},
     {"name": 7, "input_shape": [1, 1, 400], "num_classes": 3},
     {"name": "no-such-model", "input_shape": [1, 1, 400], "num_classes": 3}],
)  # fmt: skip
def test_hostile_model_spec_is_an_export_error(tmp_path, spec):
    path = _edit(_wide_mlp_export(tmp_path), tmp_path / "spec.safetensors", info=_set(["metadata", "model_spec"], spec))
    with pytest.raises(ExportError):
        export.load(path)
