"""The compressed model file: bit-identical round trips of real sparsetrain models, size, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.shared import run_cli
from torch import nn

import sparsetrain
from sparsetrain import export
from sparsetrain.cli import main as cli_main
from sparsetrain.train.checkpoint import load as load_checkpoint
from sparsetrain.train.loop import evaluate
from sparsetrain.train.models import build_model

safetensors = pytest.importorskip("safetensors")

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
# A 3-epoch AC/DC run of LeNet-300-100 at 90%: dense, sparse, dense-then-final-sparse (a few seconds).
TRAIN = [
    "train", "--model", "mlp", "--epochs", "3", "--limit-train", "3000", "--threads", "2", "--no-progress",
    "--set", "method_options={unit: epochs, warmup: 1, compressed: 1, decompressed: 1, final: 1}",
]  # fmt: skip


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor: compares -0.0 and +0.0 as different, NaN payloads as they are."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory) -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("runs") / "mlp"
    result = run_cli(*TRAIN, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def fashion():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("apt-get install dataset-fashion-mnist")
    from sparsetrain.train.data import load_dataset

    return load_dataset("fashion-mnist", val_fraction=0.1, seed=0, limit_train=512)


def sparsely_trained(name: str, fashion, steps: int = 4, batch: int = 16) -> nn.Module:
    """A few real SGD steps with AC/DC ending in its compressed phase: hard zeros, trained BatchNorm statistics."""
    torch.manual_seed(0)
    model = build_model(name, input_shape=fashion.input_shape, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = sparsetrain.create(
        "acdc", model, sparsity=0.9, total_steps=steps, unit="steps", warmup=1, compressed=1, decompressed=1,
        final=steps - 2,
    )  # fmt: skip
    sparsifier.attach(optimizer)
    x, y = fashion.train[: steps * batch]
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        optimizer.step()
    assert sparsifier.phase == "sparse"
    return model.eval()


# ---------------------------------------------------------------------------------------------------- round trips
@needs_fashion
def test_cli_trained_mlp_round_trips_bit_identical_with_identical_predictions(mlp_run, tmp_path, fashion):
    checkpoint = load_checkpoint(mlp_run)
    path = tmp_path / "mlp.safetensors"
    summary = export.save(checkpoint["model"], path, metadata=export.checkpoint_metadata(checkpoint))
    model = export.load(path)  # built from the spec in the file
    assert_bit_identical(checkpoint["model"], model.state_dict())
    # The sparsifier writes pruned zeros as +0.0, so the export needs no sign bits (test_negative_zeros_... covers
    # files that have -0.0).
    first = checkpoint["model"]["1.weight"]
    assert int((first == 0).sum()) > 0 and not bool(((first == 0) & torch.signbit(first)).any())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as stored:
        assert not any(key.endswith("zero_signs") for key in stored.keys())

    original = build_model(**checkpoint["model_spec"]).eval()
    original.load_state_dict(checkpoint["model"])
    x = fashion.test[:2000][0]
    with torch.inference_mode():
        assert torch.equal(original(x), model.eval()(x))
    accuracy = evaluate(model, fashion.test, 1000, torch.device("cpu"))["acc"]
    assert accuracy == pytest.approx(checkpoint["metrics"]["test_acc"], abs=1e-9)

    info = export.read(path)
    assert info.model_spec == checkpoint["model_spec"]
    assert info.metadata["run"]["method"] == "acdc" and info.metadata["run"]["test_acc"] == accuracy
    by_name = {t.name: t for t in summary.tensors}
    assert by_name["1.weight"].encoding == "bitmask" and by_name["1.bias"].encoding == "dense"
    assert info.tensors["1.weight"]["sparsity"] == pytest.approx(float((first == 0).float().mean()))
    assert summary.file_bytes < 0.25 * export.dense_fp32_bytes(checkpoint["model"])


@needs_fashion
@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_sparsely_trained_conv_models_round_trip(name, fashion, tmp_path):
    model = sparsely_trained(name, fashion)
    state = model.state_dict()
    if name == "resnet20":  # BatchNorm statistics and the int64 step counter go through as they are
        assert any(k.endswith("num_batches_tracked") for k in state)
    path = tmp_path / f"{name}.safetensors"
    spec = {"name": name, "input_shape": list(fashion.input_shape), "num_classes": 10}
    summary = export.save(model, path, metadata={"model_spec": spec})

    rebuilt = build_model(name, input_shape=fashion.input_shape, num_classes=10)
    loaded = export.load(path, rebuilt)
    assert loaded is rebuilt
    assert_bit_identical(state, loaded.state_dict())
    x = fashion.test[:100][0]
    with torch.inference_mode():
        assert torch.equal(model(x), loaded.eval()(x))
    assert summary.file_bytes < 0.3 * export.dense_fp32_bytes(model)


def test_dense_model_round_trips_stored_as_is(tmp_path):
    torch.manual_seed(1)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    summary = export.save(model, tmp_path / "dense.safetensors")
    assert {t.encoding for t in summary.tensors} == {"dense"}
    loaded = export.load(tmp_path / "dense.safetensors", build_model("mlp", input_shape=(1, 28, 28), num_classes=10))
    assert_bit_identical(model.state_dict(), loaded.state_dict())


def test_encoding_is_chosen_by_size(tmp_path):
    g = torch.Generator().manual_seed(0)

    def pruned(sparsity: float) -> torch.Tensor:
        w = torch.randn(300, 784, generator=g)
        w[torch.rand(w.shape, generator=g) < sparsity] = 0.0
        return w

    state = {"s0": pruned(0.0), "s50": pruned(0.5), "s90": pruned(0.9), "s99": pruned(0.99), "tiny": torch.zeros(3)}
    summary = export.save(state, tmp_path / "m.safetensors")
    encodings = {t.name: t.encoding for t in summary.tensors}
    # Bitmask while the density is above ~1/32, CSR below; dense when nothing is gained (and for tiny tensors).
    assert encodings == {"s0": "dense", "s50": "bitmask", "s90": "bitmask", "s99": "csr", "tiny": "dense"}
    sizes = {t.name: t.stored_bytes / t.fp32_bytes for t in summary.tensors}
    assert 0.125 < sizes["s90"] < 0.135  # 1/32 for the mask + 10% of the values
    assert_bit_identical(state, export.read(tmp_path / "m.safetensors").state_dict)


def test_negative_zeros_and_nan_are_kept(tmp_path):
    w = torch.randn(64, 64)
    w[w.abs() < 1.5] = 0.0
    w[::2] *= -1  # half the zeros become -0.0
    w[0, 0] = float("nan")
    export.save({"w": w}, tmp_path / "z.safetensors")
    back = export.read(tmp_path / "z.safetensors").state_dict["w"]
    assert torch.equal(bits(back), bits(w))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_values(dtype, tmp_path):
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    w[torch.rand(w.shape) < 0.9] = 0.0
    state = {"w": w, "b": torch.randn(256), "steps": torch.tensor(7)}
    full = export.save(state, tmp_path / "full.safetensors")
    half = export.save(state, tmp_path / "half.safetensors", dtype=dtype)
    assert half.file_bytes < 0.7 * full.file_bytes
    back = export.read(tmp_path / "half.safetensors").state_dict
    target = export.parse_dtype(dtype)
    assert back["w"].dtype == torch.float32 and back["steps"].dtype == torch.int64
    assert torch.equal(bits(back["w"]), bits(w.to(target).float()))
    assert torch.equal(back["steps"], state["steps"])


def test_user_metadata_round_trips(tmp_path):
    export.save({"w": torch.zeros(4, 4)}, tmp_path / "m.safetensors", metadata={"note": "hello", "n": [1, 2]})
    info = export.read(tmp_path / "m.safetensors")
    assert info.metadata == {"note": "hello", "n": [1, 2]} and info.model_spec is None
    with pytest.raises(ValueError, match="JSON"):
        export.save({"w": torch.zeros(4)}, tmp_path / "bad.safetensors", metadata={"x": object()})


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def small_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        model[1].weight[model[1].weight.abs() < 0.05] = 0.0
    path = tmp_path / "small.safetensors"
    export.save(model, path, metadata={"model_spec": {"name": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}})
    return path


def test_not_an_export(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a model file at all" * 10)
    with pytest.raises(ValueError, match="not a sparsetrain export"):
        export.load(junk)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a sparsetrain export"):
        export.read(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        export.read(tmp_path / "missing.safetensors")


def test_truncated_file(small_file):
    data = small_file.read_bytes()
    small_file.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        export.load(small_file)
    small_file.write_bytes(data[:5])
    with pytest.raises(ValueError, match="not a sparsetrain export"):
        export.load(small_file)


def test_corrupted_file(small_file):
    data = bytearray(small_file.read_bytes())
    data[-50] ^= 0xFF  # a flipped byte in the tensor data
    small_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        export.load(small_file)
    data[-50] ^= 0xFF
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end - 20 : header_end - 10] = b"\x00" * 10  # garbage inside the JSON header
    small_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted|not valid JSON|not a sparsetrain"):
        export.load(small_file)


def test_shape_mismatch_names_the_tensor_and_both_shapes(small_file):
    other = build_model("mlp", input_shape=(1, 10, 10), num_classes=10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"'1\.weight' has shape \(300, 64\) in the file but \(300, 100\) in the model"
    ):
        export.load(small_file, other)
    assert_bit_identical(before, other.state_dict())  # the model is untouched
    with pytest.raises(ValueError, match="lacks"):
        export.load(small_file, nn.Sequential(nn.Linear(64, 10)))


def test_no_spec_and_no_model(tmp_path):
    export.save({"w": torch.zeros(4, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="no model spec"):
        export.load(tmp_path / "m.safetensors")


def test_bad_arguments_write_nothing_and_overwrite_nothing(small_file, tmp_path):
    model = nn.Linear(4, 4)
    before = small_file.read_bytes()
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        export.save(model, small_file, dtype="int3")
    with pytest.raises(ValueError, match="does not exist"):
        export.save(model, tmp_path / "no" / "such" / "dir" / "m.safetensors")
    assert not (tmp_path / "no").exists()
    huge = nn.Linear(4, 4)
    with torch.no_grad():
        huge.weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="float16"):
        export.save(huge, small_file, dtype="fp16")
    assert small_file.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.safetensors"]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------- CLI
@needs_fashion
def test_cli_export_prints_sizes_and_the_file_loads(mlp_run, tmp_path):
    out = tmp_path / "mlp.safetensors"
    result = run_cli("export", str(mlp_run), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "1.weight" in result.stdout and "bitmask float32" in result.stdout
    ratio = float(result.stdout.split("ratio ")[-1].split()[0])
    assert 0.05 < ratio < 0.25
    assert "bit-identical" in result.stdout
    assert_bit_identical(load_checkpoint(mlp_run)["model"], export.load(out).state_dict())


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@needs_fashion
def test_cli_export_errors_are_one_line_with_exit_codes(mlp_run, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = cli(capsys, "export", str(mlp_run), "-o", str(out))
    assert code == 2 and "exists; nothing was overwritten" in err
    code, _, err = cli(capsys, "export", str(mlp_run), "-o", str(tmp_path / "new.st"), "--dtype", "int3")
    assert code == 2 and "unknown dtype 'int3'" in err
    code, _, err = cli(capsys, "export", str(mlp_run), "-o", str(tmp_path / "missing" / "m.st"))
    assert code == 2 and "does not exist" in err
    code, _, err = cli(capsys, "export", str(tmp_path / "nothing.pt"), "-o", str(tmp_path / "x.st"))
    assert code == 1 and "does not exist" in err
    code, _, err = cli(capsys, "export", str(out), "-o", str(tmp_path / "x.st"))
    assert code == 1 and "error:" in err
    assert out.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    code, stdout, _ = cli(capsys, "export", str(mlp_run), "-o", str(out), "--force", "--dtype", "bf16")
    assert code == 0 and "bfloat16" in stdout
    assert export.read(out).tensors["1.weight"]["stored_dtype"] == "bfloat16"


@needs_fashion
def test_cli_bench(mlp_run, tmp_path, capsys):
    out = tmp_path / "mlp.safetensors"
    assert cli(capsys, "export", str(mlp_run), "-o", str(out))[0] == 0
    code, stdout, err = cli(capsys, "bench", str(out), "--batch-sizes", "1,8", "--repeats", "1")
    assert code == 0, err
    lines = stdout.splitlines()
    table = lines[lines.index(next(line for line in lines if line.split()[:1] == ["batch"])) + 1 :][:2]
    assert [row.split()[0] for row in table] == ["1", "8"] and all(row.split()[3].endswith("x") for row in table)
    assert any(line.strip().startswith("1 ") and "300x784" in line for line in lines)  # per-layer choice
    code, stdout, err = cli(capsys, "bench", str(mlp_run), "--batch-sizes", "2", "--repeats", "1")
    assert code == 0, err
    code, _, err = cli(capsys, "bench", str(out), "--batch-sizes", "one")
    assert code == 2 and "--batch-sizes" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(out.read_bytes()[:1000])
    code, _, err = cli(capsys, "bench", str(broken))
    assert code == 1 and "truncated" in err and "Traceback" not in err


def test_cli_bench_says_convolutions_run_dense(tmp_path, capsys):
    torch.manual_seed(0)
    spec = {"name": "resnet20", "input_shape": [3, 8, 8], "num_classes": 10}
    model = build_model(**spec)
    sparsetrain.create("magnitude", model, sparsity=0.9, total_steps=1)  # prunes at step 0
    export.save(model, tmp_path / "r.safetensors", metadata={"model_spec": spec})
    code, stdout, err = cli(capsys, "bench", str(tmp_path / "r.safetensors"), "--batch-sizes", "1", "--repeats", "1")
    assert code == 0, err
    assert "convolution layers run dense" in stdout


def test_metadata_in_file_is_readable_json(small_file):
    # Any safetensors reader sees the layout: the metadata is plain JSON under one key.
    from safetensors import safe_open

    with safe_open(str(small_file), framework="pt") as handle:
        info = json.loads(handle.metadata()["sparsetrain"])
    assert info["format"] == "sparsetrain-export" and info["version"] == export.VERSION
    assert info["tensors"]["1.weight"]["encoding"] == "bitmask"
