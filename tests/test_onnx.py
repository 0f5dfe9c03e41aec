"""ONNX export: onnxruntime agrees with torch on zoo models (the transformers included), the file is the same bytes
every time, the CLI exports a checkpoint, and a missing onnx package is one clear error."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import main
from sparsetrain.models import MODEL_REGISTRY, build_model, model_spec, sample_input
from sparsetrain.oneshot import prune_oneshot
from sparsetrain.train import checkpoint
from sparsetrain.train.config import defaults
from sparsetrain.train.evaluation import checkpoint_payload

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from sparsetrain.onnx_export import check_onnx, export_onnx  # noqa: E402

OPTIONS = {"gpt": {"layers": 2, "heads": 2, "width": 32}, "vit": {"layers": 2, "heads": 2, "width": 32, "patch": 7}}


def pruned(name: str) -> tuple[torch.nn.Module, tuple[int, ...], int]:
    """A zoo model on its example input, 90% of its weights zeroed by magnitude (a sparse model to export)."""
    torch.manual_seed(0)
    shape = MODEL_REGISTRY.entry(name).meta["example_input"]
    classes = 256 if name == "gpt" else 10
    model = build_model(name, input_shape=shape, num_classes=classes, options=OPTIONS.get(name))
    prune_oneshot(model, 0.9)
    return model.eval(), shape, classes


@pytest.mark.parametrize("name", ["gpt", "vit", "lenet5", "mlp"])
def test_onnxruntime_agrees_with_torch(name: str, tmp_path: Path) -> None:
    model, shape, classes = pruned(name)
    g = torch.Generator().manual_seed(0)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, path, sample_input(name, shape, classes, 2, g))
    # Traced at batch 2, run at 1 and 5: the batch axis is dynamic.
    check = check_onnx(path, model, [sample_input(name, shape, classes, b, g) for b in (1, 5)])
    assert check.batch_sizes == (1, 5) and check.max_abs_diff < 1e-4
    assert check.zero_fraction > 0.5  # the pruned weights are in the file, as dense zeros


def test_export_is_deterministic(tmp_path: Path) -> None:
    model, shape, classes = pruned("gpt")
    example = sample_input("gpt", shape, classes, 2, torch.Generator().manual_seed(0))
    digests = []
    for i in range(2):
        export_onnx(model, tmp_path / f"{i}.onnx", example)
        digests.append(hashlib.sha256((tmp_path / f"{i}.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


@pytest.fixture
def gpt_checkpoint(tmp_path: Path) -> Path:
    model, shape, classes = pruned("gpt")
    spec = model_spec("gpt", shape, classes, OPTIONS["gpt"])
    config = {**defaults(), "model": "gpt", "dataset": "text", "method": "gmp", "model_options": OPTIONS["gpt"]}
    path = tmp_path / "sparse_final.pt"
    checkpoint.save_atomic(checkpoint_payload(model, spec, config, kind="sparse_final"), path)
    return path


def test_cli_exports_a_gpt_checkpoint_checked_by_onnxruntime(gpt_checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpt.onnx"
    assert main(["export", str(gpt_checkpoint), "--format", "onnx", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ONNX, sparse_final of gmp gpt on text" in printed
    assert "onnxruntime: outputs allclose to torch at batch sizes 1, 3" in printed
    assert out.stat().st_size > 0
    # Refuses to overwrite without --force, and --dtype belongs to the other format.
    assert main(["export", str(gpt_checkpoint), "--format", "onnx", "-o", str(out)]) == 2
    assert main(["export", str(gpt_checkpoint), "--format", "onnx", "--dtype", "fp16", "-o", str(tmp_path / "h")]) == 2
    assert not (tmp_path / "h").exists()


def test_missing_onnx_is_one_error_line_and_writes_nothing(
    gpt_checkpoint: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` sees when it is not installed
    out = tmp_path / "gpt.onnx"
    assert main(["export", str(gpt_checkpoint), "--format", "onnx", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ONNX export needs the onnx package: pip install onnx") and "sparsetrain[onnx]" in err
    assert "Traceback" not in err and not out.exists()


def test_cli_exports_a_slim_file_and_an_export_file_as_onnx(tmp_path: Path, capsys) -> None:
    # `export --help` and the README promise an export file (a slim model from `sparsetrain slim`) as input: with
    # --format onnx it was refused as "not a sparsetrain checkpoint".
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        model[1].weight[:150] = 0  # half the first hidden layer's units: whole channels to cut
        model[1].bias[:150] = 0
    spec = model_spec("mlp", (1, 8, 8), 10)
    config = {**defaults(), "model": "mlp", "dataset": "digits", "method": "gmp"}
    ckpt = tmp_path / "sparse_final.pt"
    checkpoint.save_atomic(checkpoint_payload(model, spec, config, kind="sparse_final"), ckpt)
    slim, exported = tmp_path / "slim.safetensors", tmp_path / "model.safetensors"
    assert main(["slim", str(ckpt), "-o", str(slim)]) == 0
    assert main(["export", str(ckpt), "-o", str(exported)]) == 0
    capsys.readouterr()
    for given in (slim, exported):
        out = tmp_path / f"{given.stem}.onnx"
        assert main(["export", str(given), "--format", "onnx", "-o", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"{out}: ONNX, sparse_final of gmp mlp on digits" in printed
        assert "onnxruntime: outputs allclose to torch at batch sizes 1, 3" in printed
    onnx = pytest.importorskip("onnx")
    first = [t for t in onnx.load(str(tmp_path / "slim.onnx")).graph.initializer if len(t.dims) == 2][0]
    assert list(first.dims) in ([150, 64], [64, 150])  # the slim model's layer, not the masked model's
