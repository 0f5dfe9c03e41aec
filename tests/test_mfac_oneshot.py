"""One-shot M-FAC pruning: the OBS step on known Fishers, against magnitude on a trained model, and the command."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.shared import trained_digits_mlp_checkpoint
from torch import nn

from sparsetrain.cli import main
from sparsetrain.mfac import MFACInverse
from sparsetrain.oneshot import prune_mfac, prune_oneshot
from sparsetrain.oneshot.mfac import obs_remove


def dense_fisher(g: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """The block-diagonal damp I + G^T G / m as a dense d x d matrix (small d only)."""
    m, d = g.shape
    block = block or d
    f = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, d, block):
        e = min(d, s + block)
        f[s:e, s:e] = damp * torch.eye(e - s, dtype=torch.float64) + g[:, s:e].T @ g[:, s:e] / m
    return f


def half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.squeeze(1) - y).square().mean() / 2


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """LeNet-300-100 on the 8x8 digits, trained 3 epochs (about 1 s), as a checkpoint ``sparsetrain prune`` takes."""
    return trained_digits_mlp_checkpoint(tmp_path_factory.mktemp("mfac") / "run" / "dense_best.pt", epochs=3)


def test_obs_step_on_a_quadratic_removes_the_least_saliency_weight_and_compensates_exactly():
    # A linear model under half squared error: sample i's gradient is r_i x_i (r_i its residual), so the
    # per-sample empirical Fisher is known in closed form and the whole pipeline can be checked against it.
    torch.manual_seed(0)
    d, m, damp = 8, 12, 0.05
    x = torch.randn(m, d) @ torch.randn(d, d)  # correlated inputs: OBS and magnitude disagree
    y = torch.randn(m)
    model = nn.Linear(d, 1, bias=False)
    w = model.weight.detach().double().reshape(-1).clone()
    residual = (x.double() @ w - y.double())
    g = residual.unsqueeze(1) * x.double()
    fisher_inv = torch.linalg.inv(dense_fisher(g, damp, None))
    saliency = w.square() / (2 * torch.diagonal(fisher_inv))
    q = int(saliency.argmin())
    assert q != int(w.abs().argmin())  # the test tells OBS from magnitude
    expected = w - fisher_inv[:, q] * w[q] / fisher_inv[q, q]

    masks = prune_mfac(model, 1 / d, [(x, y)], num_gradients=m, damp=damp, loss_fn=half_squared_error)
    new = model.weight.detach().double().reshape(-1)
    assert (~masks["weight"]).reshape(-1).nonzero().squeeze(1).tolist() == [q]
    assert new[q] == 0
    assert torch.allclose(new, expected, atol=1e-5, rtol=1e-4)
    # Exact compensation: the quadratic model (w' - w)^T F (w' - w) / 2 has zero gradient on the kept weights.
    kept = torch.arange(d) != q
    stationarity = torch.linalg.inv(fisher_inv) @ (expected - w)
    assert stationarity[kept].abs().max() < 1e-10


@pytest.mark.parametrize("block", [None, 10, 7])
def test_set_removal_equals_the_dense_obs_formula_block_by_block(block):
    torch.manual_seed(1)
    m, d, damp = 8, 30, 0.05
    g = torch.randn(m, d, dtype=torch.float64)
    w = torch.randn(d, dtype=torch.float64)
    remove = torch.zeros(d, dtype=torch.bool)
    remove[[1, 4, 7, 8, 9, 20, 29]] = True
    dw, increase = obs_remove(MFACInverse(g, damp, block), w, remove)
    fisher_inv = torch.linalg.inv(dense_fisher(g, damp, block))
    q = remove.nonzero().squeeze(1)
    x = torch.linalg.solve(fisher_inv[q][:, q], w[q])
    assert torch.allclose(dw, -fisher_inv[:, q] @ x, atol=1e-12)
    assert torch.all((w + dw)[remove] == 0)
    assert increase == pytest.approx(float(w[q] @ x) / 2, rel=1e-10)


def test_mfac_beats_magnitude_at_high_sparsity_and_one_block_equals_block_d(checkpoint_path):
    from sparsetrain.train.checkpoint import load, restore_model
    from sparsetrain.train.data import iterate_batches, load_dataset
    from sparsetrain.train.evaluation import evaluate

    dense = restore_model(load(checkpoint_path), str(checkpoint_path))  # LeNet-300-100 trained on the 8x8 digits
    splits = load_dataset("digits")
    calibration = list(iterate_batches(splits.train, 64, shuffle=True, seed=0))
    for sparsity in (0.9, 0.95):
        magnitude = copy.deepcopy(dense)
        prune_oneshot(magnitude, sparsity)
        mfac = copy.deepcopy(dense)
        masks = prune_mfac(mfac, sparsity, calibration, num_gradients=64)
        kept = sum(int(mask.sum()) for mask in masks.values())
        assert kept == sum(int((p != 0).sum()) for p in mfac.parameters() if p.dim() >= 2)
        loss_magnitude = evaluate(magnitude, splits.test, 1000, torch.device("cpu"))["loss"]
        loss_mfac = evaluate(mfac, splits.test, 1000, torch.device("cpu"))["loss"]
        assert loss_mfac < 0.8 * loss_magnitude, (sparsity, loss_mfac, loss_magnitude)
    d = sum(p.numel() for p in dense.parameters() if p.dim() >= 2)
    one, whole = copy.deepcopy(dense), copy.deepcopy(dense)
    masks_one = prune_mfac(one, 0.9, calibration, num_gradients=16, damp=1e-3, block_size=None)
    masks_whole = prune_mfac(whole, 0.9, calibration, num_gradients=16, damp=1e-3, block_size=d)
    assert all(torch.equal(masks_one[n], masks_whole[n]) for n in masks_one)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), whole.parameters()))


def test_blocks_steps_and_nm_keep_exact_counts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    batches = [(torch.randn(32, 16), torch.randint(0, 4, (32,)))]
    report: dict = {}
    masks = prune_mfac(model, 0.8, batches, num_gradients=8, num_samples=32, block_size=100, steps=3,
                       distribution="uniform", report=report)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            assert int(masks[name].sum()) == int((p != 0).sum()) == round(0.2 * p.numel())
    assert report["samples_per_gradient"] == 4 and report["steps"] == 3 and report["damp"] > 0
    nm = copy.deepcopy(model)
    torch.manual_seed(0)
    nm = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    prune_mfac(nm, None, batches, num_gradients=8, mask_type="2:4")
    assert torch.all((nm[0].weight != 0).reshape(-1, 4).sum(1) == 2)


def test_prune_mfac_bad_input():
    model = nn.Sequential(nn.Linear(4, 3))  # 12 pruned weights
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    for kwargs, message in [
        (dict(num_gradients=0), "num_gradients .* >= 1, got 0"),
        (dict(damp=0.0), "damp .* > 0, got 0.0"),
        (dict(damp=-1.0), "> 0, got -1.0"),
        (dict(block_size=0), r"block_size .* \[1, 12\] .* got 0"),
        (dict(block_size=13), r"\[1, 12\] .*got 13"),
        (dict(num_gradients=4, num_samples=2), "num_samples must be >= num_gradients"),
        (dict(num_gradients=16), "fewer than the 16"),
        (dict(steps=0), "steps"),
    ]:
        with pytest.raises(ValueError, match=message):
            prune_mfac(copy.deepcopy(model), 0.5, batches, **kwargs)
    with pytest.raises(ValueError, match="targets"):
        prune_mfac(model, 0.5, [torch.randn(8, 4)], num_gradients=2)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune_mfac(model, 1.0, batches)


# ---------------------------------------------------------------------------------------------------- the command
def test_prune_command_mfac_end_to_end(checkpoint_path, capsys):
    from sparsetrain.train import checkpoint

    out_dir = checkpoint_path.parent / "mfac"
    argv = ["prune", str(checkpoint_path), "--method", "mfac", "--sparsity", "0.5,0.9", "--gradients", "32",
            "--block", "4096", "--calibration", "64", "--out-dir", str(out_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "M-FAC, OBS with the empirical Fisher of 32 gradients of 2 training samples each, blocks of 4096" in out
    assert "pruned acc" in out and "pruned_s0.9.pt" in out
    magnitude_dir = checkpoint_path.parent / "magnitude"
    assert main(["prune", str(checkpoint_path), "--sparsity", "0.9", "--out-dir", str(magnitude_dir)]) == 0
    capsys.readouterr()
    pruned = checkpoint.load(out_dir / "pruned_s0.9.pt")
    magnitude = checkpoint.load(magnitude_dir / "pruned_s0.9.pt")
    assert pruned["kind"] == "pruned" and pruned["metrics"]["method"] == "mfac"
    assert pruned["metrics"]["mfac"]["gradients"] == 32 and pruned["metrics"]["mfac"]["block_size"] == 4096
    assert pruned["metrics"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert pruned["metrics"]["test_acc"] >= magnitude["metrics"]["test_acc"]
    assert main(["eval", str(out_dir / "pruned_s0.9.pt")]) == 0
    assert "acc" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("argv, expected", [
    (["--gradients", "0"], "--gradients must be a number of gradients >= 1, got 0"),
    (["--block", "0"], "--block must be a number of weights >= 1 per block, got 0"),
    (["--block", "10000000"], "--block 10000000 is larger than the model: it prunes 50200 weights"),
    (["--damp", "0"], "--damp must be a finite number > 0 (the Fisher's dampening), got 0"),
    (["--damp=-1e-3"], "got -0.001"),
    (["--damp", "nan"], "got nan"),
    (["--gradients", "64", "--calibration", "10"], "--calibration must be at least --gradients"),
])
def test_prune_command_mfac_mistakes(checkpoint_path, capsys, argv, expected):
    assert main(["prune", str(checkpoint_path), "--method", "mfac", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")


def test_prune_command_mfac_options_need_method_mfac(checkpoint_path, capsys):
    for argv in (["--gradients", "8"], ["--method", "obc", "--block", "64"], ["--damp", "1e-4"]):
        assert main(["prune", str(checkpoint_path), *argv]) == 2
        err = capsys.readouterr().err
        assert "needs --method mfac" in err and err.startswith("error:")


def test_prune_command_mfac_on_a_language_model(tmp_path, capsys):
    # A GPT on the text dataset: the Fisher's gradients are of the per-token loss. The default cross-entropy was
    # given (batch, tokens, vocabulary) logits and failed with a traceback ("Expected target size [1, 256]").
    from sparsetrain.models import build_model, model_spec
    from sparsetrain.train import checkpoint
    from sparsetrain.train.config import defaults
    from sparsetrain.train.evaluation import checkpoint_payload

    options = {"layers": 1, "heads": 2, "width": 16}
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(16,), num_classes=256, options=options)
    config = {**defaults(), "model": "gpt", "dataset": "text", "method": "gmp", "model_options": options,
              "dataset_options": {"context": 16, "max_bytes": 20000}}
    path = tmp_path / "sparse_final.pt"
    checkpoint.save_atomic(checkpoint_payload(model, model_spec("gpt", (16,), 256, options), config,
                                              kind="sparse_final"), path)
    assert main(["prune", str(path), "--method", "mfac", "--sparsity", "0.5", "--gradients", "8"]) == 0
    assert "0.5000" in capsys.readouterr().out
    pruned = checkpoint.load(tmp_path / "pruned_s0.5.pt")
    assert pruned["metrics"]["sparsity"] == pytest.approx(0.5)  # measured on the weights
    weights = [t for n, t in pruned["model"].items() if t.dim() == 2 and "emb" not in n and n != "head.weight"]
    assert len(weights) == 6 and sum(int((w == 0).sum()) for w in weights) * 2 == sum(w.numel() for w in weights)
