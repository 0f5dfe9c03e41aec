"""Data-parallel training: real 2-process gloo runs on CPU, and the compressors' statistics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsetrain
from sparsetrain.distributed.compression import (
    natural_decode,
    natural_encode,
    pack_bits,
    pack_nibbles,
    qsgd_decode,
    qsgd_encode,
    unpack_bits,
    unpack_nibbles,
)
from sparsetrain.distributed.hooks import check_hook
from sparsetrain.maskops import keep_count

WORKER = Path(__file__).parent / "helpers" / "distributed_worker.py"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


# ------------------------------------------------------------------------------------------ compressors
def test_packing_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000):
        bits = torch.rand(n, generator=g) < 0.5
        assert torch.equal(unpack_bits(pack_bits(bits), n), bits)
        codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_nibbles(pack_nibbles(codes), n), codes)
        assert pack_nibbles(codes).numel() == (n + 1) // 2 and pack_bits(bits).numel() == (n + 7) // 8


@pytest.mark.parametrize("levels", [7, 127])
def test_qsgd_is_unbiased_within_its_variance_bound(levels):
    g = torch.Generator().manual_seed(1)
    v = torch.randn(300, generator=g)
    draws = 3000
    total = torch.zeros_like(v)
    for _ in range(draws):
        total += qsgd_decode(qsgd_encode(v, levels=levels, bucket_size=100, generator=g), levels=levels,
                             bucket_size=100)  # fmt: skip
    mean = total / draws
    # Per coordinate, Q_i lies within one level ||v|| / s of v_i: variance <= (||v|| / s)^2 / 4.
    norms = v.view(3, 100).norm(dim=1).repeat_interleave(100)
    bound = 5 * (norms / levels / 2) / math.sqrt(draws)  # five standard deviations
    assert torch.all((mean - v).abs() <= bound)
    payload = qsgd_encode(v, levels=levels, bucket_size=100, generator=g)
    bits = 8 * payload.nbytes / v.numel()
    assert bits == pytest.approx((4 if levels == 7 else 8) + 32 / 100)


def test_natural_compression_is_unbiased_with_second_moment_at_most_9_8():
    g = torch.Generator().manual_seed(2)
    v = torch.randn(200, generator=g) * torch.logspace(-3, 3, 200)
    draws = 4000
    first = torch.zeros_like(v)
    second = torch.zeros_like(v)
    for _ in range(draws):
        q = natural_decode(natural_encode(v, generator=g))
        # every decoded value is a signed power of two bracketing v
        assert torch.all(torch.sign(q) == torch.sign(v))
        assert torch.all((q.abs() >= v.abs() / 2) & (q.abs() <= v.abs() * 2))
        first += q
        second += q * q
    # Var(Q) <= (9/8 - 1) v^2 = v^2 / 8, so the mean's standard deviation is at most |v| / sqrt(8 draws).
    assert torch.all((first / draws - v).abs() <= 5 * v.abs() / math.sqrt(8 * draws))
    # E[Q^2] <= 9/8 v^2, with sampling tolerance (Q^2 <= 4 v^2, so its std is at most 4 v^2 / 2).
    assert torch.all(second / draws <= v * v * (9 / 8 + 5 * 2 / math.sqrt(draws)))
    assert torch.all(second / draws <= v * v * 1.3)
    payload = natural_encode(v)
    assert 8 * payload.nbytes / v.numel() == 9.0
    assert torch.equal(natural_decode(natural_encode(torch.zeros(5))), torch.zeros(5))


def test_hook_checks_happen_before_anything_starts():
    with pytest.raises(ValueError, match="unknown comm hook 'zip'"):
        check_hook("zip")
    with pytest.raises(ValueError, match="levels must be in"):
        check_hook("qsgd", options={"levels": 500})
    # The masked hook fits every method: a step that reads the gradients of masked weights (RigL's updates, RDA
    # before its prune: Capability.DENSE_GRADIENTS, needs_dense_gradients()) is all-reduced densely.
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    for method in sparsetrain.list_methods():
        check_hook(
            "masked", sparsetrain.create(method, model, sparsity=0.5, total_steps=100, example_input=torch.zeros(1, 8))
        )
    rigl = sparsetrain.create("rigl", model, sparsity=0.5, total_steps=100, delta=10)
    assert sparsetrain.Capability.DENSE_GRADIENTS in type(rigl).capabilities
    rigl.count = 10
    assert rigl.needs_dense_gradients()


# ------------------------------------------------------------------------------------------ 2 processes
def test_masks_are_identical_on_both_ranks_at_every_step(tmp_path):
    out = tmp_path / "masks.json"
    result = torchrun(str(WORKER), "masks", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    for method, entry in report.items():
        assert entry["mismatches"] == [], method
        assert entry["updates"] >= 3, method
        assert entry["sparsity"] == pytest.approx(0.9, abs=0.01), method


def test_vrpg_scores_masks_and_weights_agree_on_both_ranks(tmp_path):
    """Each rank computes its own batch's two losses: the score step must use their mean over the ranks."""
    out = tmp_path / "vrpg.json"
    result = torchrun(str(WORKER), "vrpg", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mismatches"] == []
    assert report["updates"] >= 3
    assert report["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_identity_hook_is_bitwise_default_ddp_and_masked_hook_sends_less(tmp_path):
    out = tmp_path / "hooks.json"
    result = torchrun(str(WORKER), "hooks", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["identity_bitwise"] is True
    assert report["identity_bits"] == 32.0
    assert report["masked_max_diff"] < 1e-6
    assert report["masked_bits"] < 24  # acdc spends most of the run sparse: far fewer than 32 bits per coordinate


def test_parallel_gap_trains_replicas_apart_then_merges(tmp_path):
    out = tmp_path / "pgap.json"
    result = torchrun(str(WORKER), "pgap", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # Rounds at steps 0-9 and 10-19: the ranks grow different groups, so their masks differ there (20 steps,
    # the merge at step 20 makes them equal); fine-tuning from step 20 keeps them equal to the end.
    assert report["fine_tune_start"] == 20
    assert report["differing_mask_steps"] == 19
    assert report["weights_differ_at_end"] is False
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert report["phase"] == "sparse"


def test_parallel_gap_merge_prunes_every_layer_identically_on_all_ranks(tmp_path):
    """Right after each merge every layer is at the target on both ranks, the group a rank grows next included
    (its weights pruned at the merge re-enter at 0), and the two replicas hold bit-identical values."""
    out = tmp_path / "merges.json"
    result = torchrun(str(WORKER), "pgap_merges", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["groups"] == [["0.weight"], ["2.weight", "4.weight"]]  # 1280 | 4096 + 320 parameters
    assert [m["step"] for m in report["merges"]] == [5, 10, 15]
    for merge in report["merges"]:
        assert merge["bit_identical"], merge["step"]
        if merge["step"] < 15:
            assert merge["grown_on_rank0"], merge  # a group is growing (all-ones masks) while its weights are sparse
        for rank_counts in merge["counts"]:
            for name, (nonzero, numel) in rank_counts.items():
                assert nonzero == keep_count(numel, 0.9), (merge["step"], name, nonzero, numel)


@pytest.mark.skipif(not FASHION.exists(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("hook", ["none", "fp16", "qsgd", "natural", "masked"])
def test_two_process_fashion_mnist_run_with_each_hook(hook, tmp_path):
    out = tmp_path / hook
    args = ["train", "--nproc", "2", "--model", "mlp", "--limit-train", "6000", "--epochs", "3", "--batch-size",
            "100", "--no-progress", "--comm-hook", hook, "--out", str(out), "--set", "check_masks=true",
            "--set", "method_options={unit: epochs, warmup: 1, compressed: 1, decompressed: 1, final: 1}"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "sparsetrain", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["sparse_model"]["test_acc"] > 72
    assert summary["sparse_model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    if hook != "none":
        bits = summary["communication"]["bits_per_coordinate"]
        assert bits < 32
        if hook == "natural":
            assert bits == pytest.approx(9.0, abs=0.01)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # only rank 0 writes


@pytest.mark.parametrize(
    "args, words",
    [
        (["--nproc", "999"], ["999", "processes"]),
        (["--nproc", "2", "--comm-hook", "zip"], ["zip", "qsgd"]),
        (["--nproc", "2", "--comm-hook", "qsgd", "--set", "qsgd_levels=500"], ["500"]),
    ],
)
def test_bad_distributed_input_fails_before_any_process_starts(args, words, tmp_path):
    result = subprocess.run([sys.executable, "-m", "sparsetrain", "train", *args, "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "torch.distributed" not in result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "o").exists()


def test_natural_compression_rounds_subnormals_unbiased_between_zero_and_the_smallest_normal():
    # Below 2^-126 the neighbours are 0 and 2^-126 (exponent bytes 0 and 1): P(2^-126) = |v| / 2^-126.
    smallest = 2.0**-126
    fractions = torch.tensor([0.1, 0.25, 0.5, 0.9, -0.3, -0.75])
    v = torch.ldexp(fractions, torch.tensor(-126))  # subnormal float32 values, exactly representable
    assert torch.all(v.abs() < smallest) and torch.all(v != 0)
    draws = 100_000
    g = torch.Generator().manual_seed(0)
    q = natural_decode(natural_encode(v.repeat(draws), generator=g)).view(draws, -1)
    scaled = torch.ldexp(q, torch.tensor(126)).double()  # in units of 2^-126: each draw is 0 or +-1
    assert set(scaled.abs().unique().tolist()) <= {0.0, 1.0}
    assert torch.all((scaled == 0) | (torch.sign(scaled) == torch.sign(fractions)))
    p = fractions.abs().double()
    bound = 5 * torch.sqrt(p * (1 - p) / draws)  # five standard deviations of the mean
    assert torch.all((scaled.mean(0) - fractions.double()).abs() <= bound)
    # The smallest normal itself is sent exactly, and zero stays zero.
    exact = natural_decode(natural_encode(torch.tensor([smallest, -smallest, 0.0]), generator=g))
    assert exact.tolist() == [smallest, -smallest, 0.0]
