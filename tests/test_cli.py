"""End-to-end: the real CLI in subprocesses, on real Fashion-MNIST (Debian's dataset-fashion-mnist package)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.shared import run_cli

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
# A short AC/DC run: 6 epochs, phases dense 0-1, sparse 1-2, dense 2-4 (absorbs), final sparse 4-6.
SHORT = [
    "--model", "mlp", "--limit-train", "6000", "--epochs", "6", "--batch-size", "100", "--lr", "0.05",
    "--threads", "2", "--no-progress",
    "--set", "method_options={unit: epochs, warmup: 1, compressed: 1, decompressed: 1, final: 2}",
]  # fmt: skip


cli = run_cli


def weight_sparsity(state: dict) -> float:
    weights = [t for t in state.values() if t.dim() >= 2]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "acdc"
    result = cli("train", *SHORT, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@needs_fashion
def test_train_writes_the_sparse_dense_pair(short_run):
    for name in ("last.pt", "sparse_final.pt", "dense_best.pt", "summary.json", "config.yaml", "metrics.jsonl",
                 "metrics.csv", "training.png"):  # fmt: skip
        assert (short_run / name).is_file(), name
    sparse = torch.load(short_run / "sparse_final.pt", weights_only=True)
    dense = torch.load(short_run / "dense_best.pt", weights_only=True)
    # Counted from the tensors: global top-k keeps exactly round(0.1 * N) weights.
    weights = [t for t in sparse["model"].values() if t.dim() >= 2]
    total = sum(w.numel() for w in weights)
    assert sum(int((w == 0).sum()) for w in weights) == total - round(0.1 * total)
    assert weight_sparsity(dense["model"]) < 0.1  # the dense twin is dense (a few units may stay dead)
    summary = json.loads((short_run / "summary.json").read_text())
    assert summary["sparse_model"]["test_acc"] > 75
    assert summary["dense_model"]["test_acc"] > 75
    assert summary["dense_model"]["epoch"] == 4  # the only decompressed phase ends at epoch 4
    assert 0.3 < summary["train_flops_ratio"] < 0.8
    rows = [json.loads(line) for line in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rows] == ["dense", "sparse", "dense", "dense", "sparse", "sparse"]


@needs_fashion
def test_eval_and_compare(short_run, tmp_path):
    result = cli("eval", str(short_run / "sparse_final.pt"))
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and "0.9000" in result.stdout and "forward FLOPs" in result.stdout
    plot = tmp_path / "cmp.png"
    result = cli("compare", str(short_run), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "acdc" in result.stdout and plot.is_file()


@needs_fashion
def test_kill_and_resume_gives_the_same_weights(tmp_path):
    reference = tmp_path / "reference"
    assert cli("train", *SHORT, "--out", str(reference)).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsetrain", "train", *SHORT, "--out", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    torch.load(killed / "last.pt", weights_only=True)  # never half-written
    result = cli("train", "--resume", str(killed))
    assert result.returncode == 0, result.stderr
    a = torch.load(reference / "sparse_final.pt", weights_only=True)["model"]
    b = torch.load(killed / "sparse_final.pt", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize(
    "args, code, words",
    [
        (["train", "--dataset", "nope"], 2, ["nope", "fashion-mnist"]),
        (["train", "--model", "vgg99", "--limit-train", "500"], 2, ["vgg99", "lenet5"]),
        (["train", "--method", "magic", "--limit-train", "500"], 2, ["magic", "acdc"]),
        (["train", "--set", "colour=blue"], 2, ["colour"]),
        (["train", "--sparsity", "1.5", "--limit-train", "500"], 2, ["1.5", "[0, 1)"]),
        (["train", "--data-dir", "/nonexistent", "--dataset", "mnist", "--set", "method=dense"], 1, ["--data-dir"]),
        (["eval", "/nonexistent/x.pt"], 1, ["does not exist"]),
        (["train", "--resume", "/nonexistent"], 1, ["resume"]),
        (["methods", "zzz*"], 2, ["zzz"]),
    ],
)
def test_bad_input_gives_a_clear_error_without_traceback(args, code, words, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached MNIST to fall back on
    result = cli(*args, "--out", str(tmp_path / "o")) if args[0] == "train" and "--resume" not in args else cli(*args)
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
    for word in words:
        assert word in result.stderr


def test_bad_recipes(tmp_path):
    wrong_type = tmp_path / "a.yaml"
    wrong_type.write_text("epochs: many\n")
    unknown_key = tmp_path / "b.yaml"
    unknown_key.write_text("epochz: 3\n")
    for recipe, words in ((wrong_type, ["epochs", "many", "int"]), (unknown_key, ["epochz", "epochs"])):
        result = cli("train", "--recipe", str(recipe))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert all(w in result.stderr for w in words), result.stderr


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    result = cli("eval", str(corrupt))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not a sparsetrain checkpoint" in result.stderr
    mismatched = tmp_path / "mismatched.pt"
    torch.save({"format": "sparsetrain-checkpoint", "version": 1, "config": {"dataset": "digits", "data_dir": None,
                "val_fraction": 0.1, "seed": 0, "model": "mlp"},
                "model_spec": {"name": "mlp", "input_shape": [1, 8, 8], "num_classes": 10},
                "model": {"0.weight": torch.zeros(3, 3)}}, mismatched)  # fmt: skip
    result = cli("eval", str(mismatched))
    assert result.returncode == 1 and "does not match" in result.stderr and "Traceback" not in result.stderr


@needs_fashion
def test_nan_loss_and_no_overwrite(tmp_path, short_run):
    out = tmp_path / "nan"
    result = cli("train", *SHORT, "--lr", "1e6", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "loss became" in result.stderr and "lower the learning rate" in result.stderr
    before = {p.name: p.stat().st_mtime_ns for p in short_run.iterdir()}
    result = cli("train", *SHORT, "--out", str(short_run))
    assert result.returncode == 2 and "--resume" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in short_run.iterdir()} == before


def test_help_and_methods():
    for command in ("train", "eval", "compare", "methods"):
        result = cli(command, "--help")
        assert result.returncode == 0 and "usage" in result.stdout
    result = cli("methods")
    assert result.returncode == 0
    for name in ("acdc", "gmp", "static", "magnitude", "dense"):
        assert name in result.stdout
    assert "warmup" in result.stdout and "reset_momentum" in result.stdout


def test_default_recipe_is_the_documented_main_job():
    from sparsetrain.cli import DEFAULT_RECIPE
    from sparsetrain.train.config import load_recipe

    recipe = load_recipe(DEFAULT_RECIPE)
    assert (recipe["method"], recipe["sparsity"], recipe["dataset"]) == ("acdc", 0.9, "fashion-mnist")
    assert (Path(__file__).parent.parent / "recipes" / "fashion_mnist" / DEFAULT_RECIPE.name).is_file()


def test_own_loop_example_runs():
    example = Path(__file__).parent.parent / "examples" / "own_loop.py"
    assert len(example.read_text().splitlines()) < 80
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "final sparsity: 0.9000" in result.stdout
    accuracy = float(result.stdout.split("test accuracy: ")[1].split("%")[0])
    assert accuracy > 80


@pytest.mark.parametrize("epochs", [30, 10, 5])
def test_default_recipe_keeps_the_acdc_pair_at_any_run_length(epochs, caplog):
    """The phases scale with --epochs: 30 epochs is 3/3/3/3 epochs as documented, and shorter runs still
    alternate and end with a decompressed phase before the final compression (a dense twin exists)."""
    from sparsetrain.cli import DEFAULT_RECIPE
    from sparsetrain.train.config import load_recipe, resolve
    from sparsetrain.train.loop import create_sparsifier
    from sparsetrain.train.models import build_model

    config = resolve(load_recipe(DEFAULT_RECIPE), {"epochs": epochs})
    model = build_model(config["model"], input_shape=(1, 28, 28), num_classes=10)
    steps_per_epoch = 469  # Fashion-MNIST at batch 128
    with caplog.at_level("WARNING"):
        sparsifier = create_sparsifier(model, config, steps_per_epoch=steps_per_epoch)
    kinds = [phase.kind for phase in sparsifier.timeline()]
    assert kinds.count("sparse") >= 2 and kinds[-1] == "sparse" and kinds[-2] == "dense"
    assert not [r for r in caplog.records if "no decompressed phase" in r.getMessage()]
    if epochs == 30:
        in_epochs = [(p.start / steps_per_epoch, p.end / steps_per_epoch) for p in sparsifier.timeline()]
        assert in_epochs[:4] == [(0, 3), (3, 6), (6, 9), (9, 12)] and in_epochs[-2:] == [(24, 27), (27, 30)]


def test_acdc_without_a_decompressed_phase_says_so_in_one_line(caplog):
    """Epoch lengths that do not fit a whole cycle leave one compression: warned about, naming the fix."""
    import torch.nn as nn

    import sparsetrain

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level("WARNING"):
        sparsetrain.create(
            "acdc", model, sparsity=0.5, unit="epochs", warmup=3, compressed=3, decompressed=3, final=6,
            total_epochs=10, steps_per_epoch=10,
        )
    [record] = [r for r in caplog.records if "no decompressed phase" in r.getMessage()]
    assert "fraction" in record.getMessage() and "\n" not in record.getMessage()


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes").glob("*/*.yaml")), ids=str)
def test_every_shipped_recipe_is_valid(recipe):
    """Each recipe loads, and its method accepts its options for the recipe's run length."""
    import sparsetrain
    from sparsetrain.train.config import load_recipe, resolve
    from sparsetrain.train.loop import create_sparsifier
    from sparsetrain.train.models import build_model

    config = resolve(load_recipe(recipe), {})
    assert config["method"] in sparsetrain.list_methods()
    model = build_model(config["model"], input_shape=(1, 28, 28), num_classes=10)
    sparsifier = create_sparsifier(model, config, steps_per_epoch=10)
    assert sparsifier.total_steps == 10 * config["epochs"]


def test_overrides_read_yaml_12_numbers():
    """1e-6 is a float and 2:4 a string (PyYAML's YAML 1.1 would give the string '1e-6' and the integer 124)."""
    from sparsetrain.train.config import parse_override

    assert parse_override("method_options.lam=1e-6") == ("method_options.lam", 1e-6)
    assert parse_override("mask_type=2:4") == ("mask_type", "2:4")
    assert parse_override("lr=0.1") == ("lr", 0.1)
    assert parse_override("epochs=3") == ("epochs", 3)


def test_overrides_read_yaml_12_booleans():
    """Only true/false are booleans: 'off' is the option value it reads as (YAML 1.1 would give False)."""
    from sparsetrain.train.config import parse_override, yaml_load

    assert parse_override("sparse_kernels=off") == ("sparse_kernels", "off")
    assert parse_override("method_options.freeze=no") == ("method_options.freeze", "no")
    assert parse_override("fsdp=true") == ("fsdp", True)
    assert yaml_load("a: False\nb: on\nc: yes") == {"a": False, "b": "on", "c": "yes"}
