"""The trainer on FSDP2 (``--set fsdp=true``): real 2-process gloo runs of the CLI on CPU, on Fashion-MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsetrain
from sparsetrain.distributions import layer_sparsities
from sparsetrain.maskops import keep_count

FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
SCHEDULES = {
    "acdc": "{unit: epochs, warmup: 0.5, compressed: 0.5, decompressed: 0.5, final: 1}",
    "gmp": "{unit: epochs, start: 0.2, end: 2, frequency: 4}",
}
SHORT = ["--model", "mlp", "--limit-train", "2000", "--batch-size", "100", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsetrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)  # fmt: skip


def train(method: str, out: Path, *extra: str, epochs: int = 3) -> subprocess.CompletedProcess:
    return cli("train", "--nproc", "2", *SHORT, "--epochs", str(epochs), "--method", method, "--out", str(out),
               "--set", f"method_options={SCHEDULES[method]}", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    outs = {}
    for name, method, extra in [("acdc", "acdc", ["--set", "fsdp=true"]), ("acdc_ddp", "acdc", []),
                                ("gmp", "gmp", ["--set", "fsdp=true"])]:  # fmt: skip
        result = train(method, root / name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        outs[name] = root / name
    return outs


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


@needs_fashion
@pytest.mark.parametrize("method", ["acdc", "gmp"])
def test_fsdp_run_ends_at_exactly_the_asked_sparsity_in_ordinary_checkpoints(runs, method):
    out = runs[method]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["fsdp"] is True
    model = weights(out / "sparse_final.pt")  # full tensors: an ordinary checkpoint
    sparsified = {n: t for n, t in model.items() if t.dim() >= 2}
    assert [tuple(t.shape) for t in sparsified.values()] == [(300, 784), (100, 300), (10, 100)]
    distribution = sparsetrain.get_method(method).default_distribution
    per_layer = layer_sparsities(distribution, {n: tuple(t.shape) for n, t in sparsified.items()}, 0.9)
    zeros = {n: int((t == 0).sum()) for n, t in sparsified.items()}
    if per_layer is None:  # global top-k over all layers' shards
        total = sum(t.numel() for t in sparsified.values())
        assert sum(zeros.values()) == total - keep_count(total, 0.9)
    else:
        assert zeros == {n: t.numel() - keep_count(t.numel(), per_layer[n]) for n, t in sparsified.items()}
    for t in sparsified.values():
        assert not torch.signbit(t[t == 0]).any()  # masked weights are +0.0
    assert summary["sparse_model"]["sparsity"] == pytest.approx(sum(zeros.values()) / 266200)
    assert summary["sparse_model"]["test_acc"] > 55
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # rank 0 alone writes


@needs_fashion
def test_fsdp_acdc_equals_ddp_bit_for_bit_and_its_pair_is_usable(runs, tmp_path):
    """On 2 gloo ranks, FSDP's reduce-scattered gradients are DDP's all-reduced ones: the same weights, the same
    masks, the same dense twin. The pair's files are ordinary checkpoints for eval and export."""
    for name in ("sparse_final.pt", "dense_best.pt", "last.pt"):
        a, b = weights(runs["acdc"] / name), weights(runs["acdc_ddp"] / name)
        assert list(a) == list(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    fsdp_summary = json.loads((runs["acdc"] / "summary.json").read_text())
    ddp_summary = json.loads((runs["acdc_ddp"] / "summary.json").read_text())
    for key in ("sparse_model", "dense_model", "train_flops_ratio"):
        assert fsdp_summary[key] == ddp_summary[key], key
    result = cli("eval", str(runs["acdc"] / "dense_best.pt"))
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    result = cli("export", str(runs["acdc"] / "sparse_final.pt"), "-o", str(tmp_path / "m.safetensors"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.safetensors").is_file()


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())
    return target


def gathered_masks(pieces: list[dict]) -> dict[str, torch.Tensor]:
    """Every rank's masks of its rows, put together (last.pt lists the ranks' states in rank order, which is row
    order under FSDP2's dim-0 sharding)."""
    return {n: torch.cat([p["masks"][n] for p in pieces]) for n in pieces[0]["masks"]}


@needs_fashion
def test_fsdp_interrupted_run_resumes_bit_identically_and_on_one_process(runs, tmp_path):
    """A 2-rank FSDP run stopped after its second epoch (SIGTERM to torchrun, which kills its workers) and resumed
    on 2 ranks ends with the uninterrupted run's weights, bit for bit (last.pt holds the full weights and optimizer
    state and each rank's sparsifier state with the rows it holds). A copy resumed on one process (no --nproc)
    continues unsharded: each rank's rows assemble into whole masks, equal to the saved ones gathered (the final
    compressed phase keeps them to the end), the dense twin chosen at epoch 2 by the 2-rank run survives bit for
    bit, and the run ends at exactly the asked sparsity with +0.0 masked weights. A last.pt lacking a rank's
    rows, or holding state that cannot be split, is refused in one line."""
    reference = runs["acdc"]  # the same command, run to its end
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "sparsetrain", "train", *SHORT, "--epochs", "3", "--out", str(killed), "--set", "fsdp=true",
               "--set", f"method_options={SCHEDULES['acdc']}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 180
    while time.time() < deadline:  # rank 0 appends the epoch's row, then renames last.pt into place
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            if torch.load(killed / "last.pt", weights_only=True)["epoch"] == 2:
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert not (killed / "summary.json").exists(), "the run finished before it could be stopped"
    state = torch.load(killed / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["fsdp_world"] == 2 and len(state["sparsifier"]) == 2
    assert state["best_dense"] is not None  # the twin of the dense phase that ended with epoch 2
    saved_masks = gathered_masks(state["sparsifier"])
    total = sum(m.numel() for m in saved_masks.values())
    assert sum(int((~m).sum()) for m in saved_masks.values()) == total - keep_count(total, 0.9)
    one = copy_run(killed, tmp_path / "one")

    # What cannot be resumed on one process, refused before any step in one line: a rank's rows missing (rank 0's
    # state twice), and method state that is kept per rank (a tensor that no method splits by rows).
    broken = copy_run(killed, tmp_path / "broken")
    torch.save({**state, "sparsifier": [state["sparsifier"][0]] * 2}, broken / "last.pt")
    result = cli("train", "--resume", str(broken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "hold rows 0-150 of its 300; this rank needs rows 0-300" in result.stderr, result.stderr
    pieces = [{**p, "extra": {**p["extra"], "scale": torch.ones(1)}} for p in state["sparsifier"]]
    torch.save({**state, "sparsifier": pieces}, broken / "last.pt")
    result = cli("train", "--resume", str(broken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "saved by an FSDP run on 2 processes, this run has 1: method 'acdc' keeps per-rank state (scale)" in (
        result.stderr) and result.stderr.strip().endswith("resume it with --nproc 2"), result.stderr

    result = cli("train", "--nproc", "2", "--resume", str(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("sparse_final.pt", "dense_best.pt"):
        a, b = weights(reference / name), weights(killed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 3

    result = cli("train", "--resume", str(one))  # one process: unsharded
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((one / "summary.json").read_text())
    assert summary["processes"] == 1 and summary["fsdp"] is False
    assert len((one / "metrics.jsonl").read_text().splitlines()) == 3
    a, b = weights(reference / "dense_best.pt"), weights(one / "dense_best.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last = torch.load(one / "last.pt", weights_only=True)  # still the FSDP form: one state holding every row
    assert last["fsdp_world"] == 1 and len(last["sparsifier"]) == 1
    masks = last["sparsifier"][0]["masks"]
    assert masks.keys() == saved_masks.keys() and all(torch.equal(masks[n], saved_masks[n]) for n in masks)
    final = weights(one / "sparse_final.pt")
    for name, mask in masks.items():
        assert torch.equal(final[name][~mask], torch.zeros(int((~mask).sum())))
        assert not torch.signbit(final[name][~mask]).any()
    zeros = sum(int((final[n] == 0).sum()) for n in masks)
    assert zeros == total - keep_count(total, 0.9)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--set", "fsdp=true"], ["fsdp=true", "--nproc", "torchrun"]),
        (["--nproc", "1", "--set", "fsdp=true"], ["fsdp=true", "has 1"]),
        (["--nproc", "2", "--set", "fsdp=true", "--method", "rda"], ["'rda'", "FSDP", "DDP"]),
        (["--nproc", "2", "--set", "fsdp=true", "--method", "cram"], ["'cram'", "FSDP", "DDP"]),
        (["--nproc", "2", "--set", "fsdp=true", "--comm-hook", "qsgd"], ["qsgd", "fsdp=true"]),
        (["--nproc", "2", "--set", "fsdp=true", "--method", "gmp", "--mask-type", "channel"], ["channel", "DDP"]),
        (["--nproc", "2", "--set", "fsdp=true", "--set", "check_masks=true"], ["check_masks", "fsdp=true"]),
    ],
)
def test_what_fsdp_cannot_do_fails_before_any_process_starts(args, words, tmp_path):
    result = cli("train", *args, "--out", str(tmp_path / "o"), timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "o").exists()
