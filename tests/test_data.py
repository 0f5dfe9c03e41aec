"""Tests of sparsetrain.train.data: loaders, validation split, normalization and batch iteration."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.train import data
from sparsetrain.train.data import DATASETS, DataError, iterate_batches, load_dataset, num_batches, read_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
needs_fashion = pytest.mark.skipif(
    not all((FASHION_DIR / f"{n}.gz").is_file() for n in IDX_NAMES),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def isolated_search(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make every default search location empty, so only what a test provides is found."""
    monkeypatch.delenv("SPARSETRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_SYSTEM_DATA_ROOT", tmp_path / "system")
    return tmp_path


def _write_idx(path: Path, array: np.ndarray, *, compress: bool = False, magic: bytes | None = None) -> None:
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def _write_fake_idx_dir(directory: Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    _write_idx(directory / IDX_NAMES[0], rng.integers(0, 256, (n_train, 28, 28)), compress=True)
    _write_idx(directory / IDX_NAMES[1], rng.integers(0, 10, n_train))
    _write_idx(directory / IDX_NAMES[2], rng.integers(0, 256, (n_test, 28, 28)))
    _write_idx(directory / IDX_NAMES[3], rng.integers(0, 10, n_test), compress=True)


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST (real files) and the IDX reader
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion() -> data.Splits:
    return load_dataset("fashion-mnist", val_fraction=0.1, seed=0, download=False)


@needs_fashion
def test_fashion_mnist_shapes_and_split(fashion: data.Splits) -> None:
    assert fashion.name == "fashion-mnist"
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54000, 6000, 10000)
    assert fashion.num_classes == 10
    assert fashion.input_shape == (1, 28, 28)
    for ds in (fashion.train, fashion.val, fashion.test):
        x, y = ds.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28)
        assert int(y.min()) == 0 and int(y.max()) == 9
    # Fashion-MNIST is balanced: 6000 training images per class across train + val.
    counts = torch.bincount(torch.cat([fashion.train.tensors[1], fashion.val.tensors[1]]), minlength=10)
    assert counts.tolist() == [6000] * 10


@needs_fashion
def test_fashion_mnist_normalized_by_train_stats(fashion: data.Splits) -> None:
    x = fashion.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std()) - 1.0) < 1e-3
    # Val and test are transformed with the train statistics, so they are close but not exact.
    assert abs(float(fashion.test.tensors[0].mean())) < 0.05


@needs_fashion
def test_fashion_mnist_split_depends_only_on_seed(fashion: data.Splits) -> None:
    # Same seed, same split: the held-out labels are exactly those picked by a generator seeded with 0
    # (rebuilding the permutation here is cheaper than loading the images a second time).
    labels = torch.from_numpy(read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64))
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fashion.val.tensors[1], labels[perm[:6000]])
    assert torch.equal(fashion.train.tensors[1], labels[perm[6000:]])
    other = load_dataset("fashion-mnist", val_fraction=0.1, seed=1, download=False)
    assert not torch.equal(other.val.tensors[1], fashion.val.tensors[1])
    assert not torch.equal(other.val.tensors[0][:100], fashion.val.tensors[0][:100])
    # The test set is never part of the split.
    assert torch.equal(other.test.tensors[1], fashion.test.tensors[1])


@needs_fashion
def test_fashion_mnist_val_size_and_limit() -> None:
    s = load_dataset("fashion-mnist", val_fraction=0.25, limit_train=1000, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 15000, 10000)


def test_download_path_with_fake_server(isolated_search: Path, monkeypatch) -> None:
    """Downloads go to the user cache, are checked against the MD5 table, and then load normally."""
    served_from = isolated_search / "server"
    _write_fake_idx_dir(served_from, n_train=30, n_test=8)
    for name in IDX_NAMES:  # the server only has .gz files, like the official mirrors
        raw = served_from / name
        if raw.exists():
            (served_from / f"{name}.gz").write_bytes(gzip.compress(raw.read_bytes()))
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        assert timeout <= 10
        urls.append(url)
        return io.BytesIO((served_from / url.rsplit("/", 1)[1]).read_bytes())

    fake_md5 = {n: hashlib.md5((served_from / f"{n}.gz").read_bytes()).hexdigest() for n in IDX_NAMES}
    monkeypatch.setitem(data._IDX_MD5, "mnist", fake_md5)
    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    s = load_dataset("mnist", val_fraction=0.0, download=True)
    assert (len(s.train), len(s.test)) == (30, 8)
    assert len(urls) == 4 and all(u.startswith(data._IDX_URLS["mnist"]) for u in urls)
    cache = isolated_search / "cache" / "sparsetrain" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    # A second load finds the cached files and does not touch the network.
    load_dataset("mnist", download=True)
    assert len(urls) == 4


def test_download_checksum_mismatch_is_data_error(isolated_search: Path, monkeypatch) -> None:
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"not the file"))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("mnist", download=True)
    # Nothing half-written is left behind for a later run to trust.
    cache = isolated_search / "cache" / "sparsetrain" / "mnist"
    assert not any(cache.iterdir())


def test_missing_dataset_message(isolated_search: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=str(isolated_search / "nowhere"), download=False)
    msg = str(info.value)
    assert "--data-dir" in msg
    assert "dataset-fashion-mnist" in msg
    assert "SPARSETRAIN_DATA" in msg
    assert str(isolated_search / "nowhere") in msg


def test_download_failure_is_data_error(isolated_search: Path, monkeypatch) -> None:
    def offline(url: str, timeout: float) -> io.BytesIO:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="no network") as info:
        load_dataset("fashion-mnist", download=True)
    assert "--data-dir" in str(info.value)


def test_idx_reader_rejects_bad_magic(tmp_path: Path) -> None:
    bad = tmp_path / "train-images-idx3-ubyte"
    _write_idx(bad, np.zeros((2, 28, 28)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)


def test_idx_reader_rejects_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    _write_idx(path, np.zeros(10))
    path.write_bytes(path.read_bytes()[:-3])  # truncated payload
    with pytest.raises(DataError, match="dimensions"):
        read_idx(path)


def test_idx_reader_rejects_broken_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"12345")[:-10])
    with pytest.raises(DataError):
        read_idx(path)


def test_corrupt_file_in_dataset_dir(isolated_search: Path) -> None:
    d = isolated_search / "fake"
    _write_fake_idx_dir(d)
    (d / IDX_NAMES[2]).write_bytes(b"\xff\xff\xff\xff" + b"\x00" * 100)
    with pytest.raises(DataError, match="magic"):
        load_dataset("mnist", data_dir=str(d), download=False)


def test_idx_search_order_env_variable(isolated_search: Path, monkeypatch) -> None:
    root = isolated_search / "env"
    _write_fake_idx_dir(root / "mnist", n_train=30, n_test=7)
    monkeypatch.setenv("SPARSETRAIN_DATA", str(root))
    s = load_dataset("mnist", val_fraction=0.2, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 7)
    assert s.input_shape == (1, 28, 28)
    # An explicit data_dir wins over the environment variable.
    _write_fake_idx_dir(isolated_search / "explicit", n_train=40, n_test=5)
    s = load_dataset("mnist", data_dir=str(isolated_search / "explicit"), val_fraction=0.0, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (40, 0, 5)


# --------------------------------------------------------------------------------------------------
# Generated / bundled datasets
# --------------------------------------------------------------------------------------------------


def test_mnist1d() -> None:
    s = load_dataset("mnist1d", val_fraction=0.1, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (3600, 400, 1000)
    assert s.input_shape == (1, 40) and s.num_classes == 10
    assert s.train.tensors[0].dtype == torch.float32 and s.train.tensors[1].dtype == torch.int64
    assert abs(float(s.train.tensors[0].mean())) < 1e-4
    # The data itself is the reference MNIST-1D set, identical for every seed.
    other = load_dataset("mnist1d", val_fraction=0.1, seed=5)
    assert torch.equal(other.test.tensors[1], s.test.tensors[1])


def test_mnist1d_leaves_global_rngs_alone() -> None:
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data._mnist1d_arrays.cache_clear()
    load_dataset("mnist1d")
    assert np.random.rand() == expected


def test_digits() -> None:
    s = load_dataset("digits", val_fraction=0.1, seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.test) == round(0.2 * 1797)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.val) == round(0.1 * (1797 - len(s.test)))
    assert set(s.train.tensors[1].tolist()) == set(range(10))


def test_unknown_dataset() -> None:
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)


def test_bad_val_fraction() -> None:
    with pytest.raises(DataError):
        load_dataset("digits", val_fraction=1.0)


# --------------------------------------------------------------------------------------------------
# User-provided formats
# --------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    x_train = rng.integers(0, 256, (40, 6, 5), dtype=np.uint8)
    y_train = rng.integers(0, 4, 40)
    y_train[0] = 3
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_train[:7], y_test=y_train[:7])
    s = load_dataset("npz", data_dir=str(path), val_fraction=0.25, seed=3)
    assert s.input_shape == (1, 6, 5)
    assert s.num_classes == 4
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 7)
    # Undo the standardization on the test set and compare with the uint8 source scaled to [0, 1].
    xt = torch.cat([s.train.tensors[0], s.val.tensors[0]])
    assert xt.shape == (40, 1, 6, 5)
    raw_train = torch.from_numpy(x_train).float() / 255
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    train_idx = perm[10:]
    mean, std = raw_train[train_idx].mean(), raw_train[train_idx].std()
    torch.testing.assert_close(s.test.tensors[0][:, 0] * std + mean, raw_train[:7], atol=1e-5, rtol=1e-5)
    assert torch.equal(s.test.tensors[1], torch.from_numpy(y_train[:7]))


def test_npz_flat_features(tmp_path: Path) -> None:
    path = tmp_path / "flat.npz"
    x = np.random.default_rng(1).normal(size=(20, 12)).astype(np.float64)
    y = np.arange(20) % 3
    np.savez(path, x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    s = load_dataset("npz", data_dir=str(path), val_fraction=0.0)
    assert s.input_shape == (12,) and s.num_classes == 3 and len(s.val) == 0


def test_npz_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((3, 4)), y_train=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="x_test, y_test"):
        load_dataset("npz", data_dir=str(path))


def test_npz_requires_path() -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("npz")


def _write_cifar_batch(path: Path, n: int, rng: np.random.Generator) -> None:
    batch = {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": rng.integers(0, 10, n).tolist(),
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_fake_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    _write_cifar_batch(d / "data_batch_1", 10, rng)
    _write_cifar_batch(d / "data_batch_2", 10, rng)
    _write_cifar_batch(d / "test_batch", 6, rng)
    # Both the batch folder and its parent are accepted.
    for where in (tmp_path, d):
        s = load_dataset("cifar10", data_dir=str(where), val_fraction=0.1)
        assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 6)
        assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    # Channel-wise standardization: each channel of the training part has mean 0.
    means = s.train.tensors[0].mean(dim=(0, 2, 3))
    torch.testing.assert_close(means, torch.zeros(3), atol=1e-5, rtol=0)


def test_cifar10_needs_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("test", 2)):
        for cls in ("dog", "cat"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                size = (6, 5) if i else (9, 7)  # mixed sizes are resized to the first image's
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    s = load_dataset("imagefolder", data_dir=str(tmp_path), val_fraction=0.25, seed=0)
    # The first training image is train/cat/0.png (classes sorted), 9 wide and 7 high.
    assert s.input_shape == (3, 7, 9)
    assert s.num_classes == 2
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 4)
    assert s.test.tensors[1].tolist() == [0, 0, 1, 1]  # cat = 0, dog = 1


def test_imagefolder_layout_error(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="test"):
        load_dataset("imagefolder", data_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Batch iteration
# --------------------------------------------------------------------------------------------------


def _index_dataset(n: int) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


def _order(n: int, **kwargs) -> list[int]:
    return [i for _, y in iterate_batches(_index_dataset(n), 7, **kwargs) for i in y.tolist()]


def test_iterate_batches_covers_every_index_once() -> None:
    order = _order(50, shuffle=True, seed=1, epoch=0)
    assert sorted(order) == list(range(50))
    assert order != list(range(50))
    batches = list(iterate_batches(_index_dataset(50), 7, shuffle=True))
    assert [len(y) for _, y in batches] == [7] * 7 + [1]
    assert len(batches) == num_batches(50, 7)
    for x, y in batches:  # inputs and labels stay paired
        assert torch.equal(x[:, 0].long(), y)


def test_iterate_batches_deterministic_per_seed_and_epoch() -> None:
    torch.manual_seed(0)
    a = _order(50, shuffle=True, seed=1, epoch=3)
    torch.manual_seed(99)  # the global RNG must not matter
    b = _order(50, shuffle=True, seed=1, epoch=3)
    assert a == b
    assert a != _order(50, shuffle=True, seed=1, epoch=4)
    assert a != _order(50, shuffle=True, seed=2, epoch=3)
    assert _order(50, shuffle=False) == list(range(50))


def test_iterate_batches_drop_last() -> None:
    batches = list(iterate_batches(_index_dataset(50), 7, shuffle=False, drop_last=True))
    assert len(batches) == 7 == num_batches(50, 7, drop_last=True)
    assert all(len(y) == 7 for _, y in batches)


@pytest.mark.parametrize("shuffle", [True, False])
def test_iterate_batches_rank_shares_are_disjoint(shuffle: bool) -> None:
    world = 3
    shares = [_order(50, shuffle=shuffle, seed=4, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == 50 // world for s in shares)
    flat = [i for s in shares for i in s]
    assert len(set(flat)) == len(flat)
    assert num_batches(50, 7, world_size=world) == len(
        list(iterate_batches(_index_dataset(50), 7, shuffle=shuffle, rank=1, world_size=world))
    )


def test_iterate_batches_argument_checks() -> None:
    with pytest.raises(ValueError):
        list(iterate_batches(_index_dataset(5), 0, shuffle=False))
    with pytest.raises(ValueError):
        list(iterate_batches(_index_dataset(5), 2, shuffle=False, rank=2, world_size=2))
