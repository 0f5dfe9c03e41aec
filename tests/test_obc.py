"""OBC / ExactOBS one-shot pruning (Frantar & Alistarh 2022), its calibration and ``sparsetrain prune --method obc``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers.shared import trained_digits_mlp_checkpoint
from torch import nn

from sparsetrain.cli import main
from sparsetrain.maskops import keep_count, nm_mask, topk_count_mask
from sparsetrain.oneshot import exact_obs, layer_hessian, prune_obc, prune_oneshot
from sparsetrain.oneshot.calibration import layer_columns


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = 2 * x.double().T @ x.double() / x.shape[0]
    return h + 0.01 * h.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)


def output_error(w: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.double() - new.double()) @ x.double().T).pow(2).sum() / x.shape[0])


def test_obs_on_a_known_quadratic_removes_the_least_saliency_and_compensates_exactly():
    h = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, -0.3, 0.8]], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    saliency = w[0] ** 2 / hinv.diagonal()
    p = int(saliency.argmin())
    assert p == 1  # by hand: 0.09 / [H^-1]_11 is the smallest of the three
    expected = w[0] - w[0, p] / hinv[p, p] * hinv[:, p]  # the OBS update
    new, mask, error = exact_obs(w, h, keep=2)
    assert mask.tolist() == [[True, False, True]]
    assert new[0, p] == 0 and torch.allclose(new[0], expected, atol=1e-6)
    assert error == pytest.approx(float(saliency[p]) / 2, rel=1e-6)
    # Exact: no other w' with w'_p = 0 is better, and every other single removal costs more.
    delta = new[0] - w[0]
    assert error == pytest.approx(float(delta @ h @ delta) / 2, rel=1e-9)
    for q in (0, 2):
        assert float(saliency[q]) / 2 > error


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_obc_beats_magnitude_on_a_linear_layer_with_correlated_inputs(sparsity):
    x = correlated_inputs(512, 48)
    w = torch.randn(24, 48, generator=torch.Generator().manual_seed(1))
    keep = keep_count(w.numel(), sparsity)
    new, mask, _ = exact_obs(w, hessian_of(x), keep=keep)
    assert int(mask.sum()) == keep and int((new != 0).sum()) == keep and torch.all(new[~mask] == 0)
    magnitude = w * topk_count_mask(w.abs(), keep)
    assert output_error(w, new, x) < 0.7 * output_error(w, magnitude, x)


@pytest.mark.parametrize("keep", [480, 400, 300])
def test_dead_rows_do_not_add_zeros_beyond_the_asked_count(keep):
    # A trained model's dead units (an AC/DC dense twin has them) are rows of zeros. They are removed first, for
    # free; a row limited to fewer removals than its zeros kept the rest as 0 while counting them as kept.
    w = torch.randn(32, 20, generator=torch.Generator().manual_seed(2))
    w[:8] = 0
    new, mask, _ = exact_obs(w, hessian_of(correlated_inputs(256, 20)), keep=keep)
    assert int(mask.sum()) == keep and int((new != 0).sum()) == keep and torch.all(new[~mask] == 0)


def test_prune_obc_on_a_model_with_a_dead_unit_reaches_the_asked_sparsity():
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        model[0].weight[:10] = 0  # ten dead hidden units
    batches = [correlated_inputs(128, 16)]
    for sparsity in (0.4, 0.6):
        pruned = copy.deepcopy(model)
        masks = prune_obc(pruned, sparsity, batches)
        weights = [p for n, p in pruned.named_parameters() if n in masks]
        zeros = sum(int((p == 0).sum()) for p in weights)
        total = sum(p.numel() for p in weights)
        assert zeros == total - keep_count(total, sparsity) == sum(int((~m).sum()) for m in masks.values())


@pytest.mark.parametrize("mask_type,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_nm_pattern_is_exact_on_linear_and_conv(mask_type, n, m):
    x = correlated_inputs(256, 32)
    w = torch.randn(8, 32)
    new, mask, error = exact_obs(w, hessian_of(x), mask_type=mask_type)
    assert torch.all(mask.reshape(-1, m).sum(1) == n) and torch.equal(new != 0, mask)
    magnitude = w * nm_mask(w.abs(), n, m)
    assert output_error(w, new, x) < output_error(w, magnitude, x)
    conv = torch.randn(4, 16, 3, 3)
    h = hessian_of(correlated_inputs(512, 16 * 9))
    new, mask, _ = exact_obs(conv, h, mask_type=mask_type)
    # Groups of M input channels at each kernel position, as maskops.nm_mask lays them out.
    assert torch.all(mask.movedim(1, -1).reshape(-1, m).sum(1) == n) and torch.equal(new != 0, mask)


def test_conv_columns_follow_stride_padding_and_dilation():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=2, dilation=2, bias=False)
    x = torch.randn(2, 3, 9, 9)
    cols = layer_columns(conv, x)
    out = conv(x)
    assert torch.allclose(cols @ conv.weight.reshape(5, -1).T, out.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-5)


def test_a_1x1_conv_is_pruned_like_the_equal_linear_layer():
    torch.manual_seed(0)
    conv_net = nn.Sequential(nn.Conv2d(8, 6, 1))
    linear_net = nn.Sequential(nn.Linear(8, 6))
    linear_net[0].weight.data = conv_net[0].weight.data.reshape(6, 8).clone()
    images = [torch.randn(4, 8, 3, 3) for _ in range(2)]
    vectors = [im.permute(0, 2, 3, 1).reshape(-1, 8) for im in images]
    h_conv = layer_hessian(conv_net, conv_net[0], images)
    assert torch.allclose(h_conv, layer_hessian(linear_net, linear_net[0], vectors))
    prune_obc(conv_net, 0.5, images)
    prune_obc(linear_net, 0.5, vectors)
    assert torch.allclose(conv_net[0].weight.reshape(6, 8), linear_net[0].weight, atol=1e-6)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))


def test_prune_obc_is_sequential_at_magnitudes_allocation():
    torch.manual_seed(0)
    model = mlp()
    batches = [(correlated_inputs(64, 16, seed=s), torch.zeros(64)) for s in range(4)]
    dense = copy.deepcopy(model)
    magnitude = prune_oneshot(copy.deepcopy(model), 0.8)
    errors: dict[str, float] = {}
    masks = prune_obc(model, 0.8, batches, num_samples=200, layer_errors=errors)
    assert set(errors) == set(masks) == {"0.weight", "2.weight", "4.weight"}
    for name, mask in masks.items():
        weight = dict(model.named_parameters())[name]
        assert int(mask.sum()) == int(magnitude[name].sum()) == int((weight != 0).sum())
    # The last layer was solved on the inputs of the already pruned layers before it (200 samples, not 256).
    inputs = [b[0] for b in batches]
    inputs = [torch.cat(inputs)[:200]]
    h = layer_hessian(model, model[4], inputs)
    expected, _, error = exact_obs(dense[4].weight, h, keep=int(magnitude["4.weight"].sum()))
    assert torch.allclose(model[4].weight, expected, atol=1e-6) and error == pytest.approx(errors["4.weight"])
    assert torch.equal(model[4].bias, dense[4].bias)


def test_depthwise_conv_is_left_to_magnitude_with_a_note(caplog):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    with caplog.at_level(logging.INFO, logger="sparsetrain.oneshot.obc"):
        masks = prune_obc(model, 0.5, [torch.randn(8, 4, 6, 6)], distribution="uniform")
    assert "groups=4" in caplog.text and "pruned by magnitude" in caplog.text
    assert int(masks["0.weight"].sum()) == 18 and int((model[0].weight != 0).sum()) == 18


def test_prune_obc_bad_input():
    with pytest.raises(ValueError, match="no calibration data"):
        prune_obc(mlp(), 0.5, [])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        prune_obc(mlp(), 1.0, [torch.randn(4, 16)])
    with pytest.raises(ValueError, match="positive integer"):
        prune_obc(mlp(), 0.5, [torch.randn(4, 16)], num_samples=0)


# ---------------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def trained_mlp_checkpoint(tmp_path_factory):
    """LeNet-300-100 on the 8x8 digits, trained 3 epochs by hand (about 1 s)."""
    return trained_digits_mlp_checkpoint(tmp_path_factory.mktemp("obc") / "run" / "dense_best.pt", epochs=3)


def test_prune_command_obc_writes_checkpoints_that_eval_accepts(trained_mlp_checkpoint, capsys):
    from sparsetrain.train import checkpoint

    out_dir = trained_mlp_checkpoint.parent / "obc"
    argv = ["prune", str(trained_mlp_checkpoint), "--method", "obc", "--sparsity", "0.9", "--calibration", "256",
            "--allocation", "magnitude"]
    assert main([*argv, "--out-dir", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "OBC / ExactOBS on 256 training samples" in out
    magnitude_dir = trained_mlp_checkpoint.parent / "magnitude"
    assert main(["prune", str(trained_mlp_checkpoint), "--sparsity", "0.9", "--out-dir", str(magnitude_dir)]) == 0
    capsys.readouterr()
    obc = checkpoint.load(out_dir / "pruned_s0.9.pt")
    magnitude = checkpoint.load(magnitude_dir / "pruned_s0.9.pt")
    assert obc["kind"] == "pruned" and obc["metrics"]["method"] == "obc"
    assert obc["metrics"]["obc_calibration_samples"] == 256
    for name, tensor in obc["model"].items():  # global magnitude's per-layer counts
        if tensor.dim() >= 2:
            assert int((tensor != 0).sum()) == int((magnitude["model"][name] != 0).sum())
    assert obc["metrics"]["test_acc"] >= magnitude["metrics"]["test_acc"]
    assert main(["eval", str(out_dir / "pruned_s0.9.pt")]) == 0
    assert "acc" in capsys.readouterr().out.lower()


def test_prune_command_obc_reports_the_calibration_samples_it_used(trained_mlp_checkpoint, capsys):
    # More --calibration samples than the training set holds: all of them are used, and that count (not the one
    # asked) is printed and recorded.
    from sparsetrain.train import checkpoint
    from sparsetrain.train.data import load_run_dataset

    train_size = len(load_run_dataset(checkpoint.load(trained_mlp_checkpoint)["config"], None).train)
    out_dir = trained_mlp_checkpoint.parent / "obc-all"
    argv = ["prune", str(trained_mlp_checkpoint), "--method", "obc", "--sparsity", "0.5", "--calibration",
            "1000000", "--allocation", "magnitude", "--exclude", "3.weight", "--out-dir", str(out_dir)]
    assert main(argv) == 0
    assert f"OBC / ExactOBS on {train_size} training samples" in capsys.readouterr().out
    assert checkpoint.load(out_dir / "pruned_s0.5.pt")["metrics"]["obc_calibration_samples"] == train_size < 1000000


def test_prune_command_obc_mistakes(trained_mlp_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own usage error
        main(["prune", str(trained_mlp_checkpoint), "--method", "obs"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'obs'" in capsys.readouterr().err
    for argv, expected in [
        (["--method", "obc", "--calibration", "0"], "--calibration must be a number of training samples >= 1, got 0"),
        (["--calibration", "64"], "needs --method obc"),
    ]:
        assert main(["prune", str(trained_mlp_checkpoint), *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:")


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    batches = [torch.randint(0, 128, (4, 32)) for _ in range(3)]
    return model, batches


@pytest.mark.parametrize("mask_type", ["unstructured", "2:4"])
def test_obc_solves_gpt2_conv1d_layers_better_than_magnitude(mask_type: str, caplog) -> None:
    model, batches = _tiny_gpt2()
    dense = copy.deepcopy(model)
    layer = "transformer.h.0.attn.c_attn"
    seen: list[torch.Tensor] = []
    hook = dense.get_submodule(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for x in batches:
            dense(x)
    hook.remove()
    x = torch.cat(seen).double()
    sparsity = None if mask_type == "2:4" else 0.5
    with caplog.at_level(logging.INFO, logger="sparsetrain"):
        masks = prune_obc(model, sparsity, batches, mask_type=mask_type, distribution="uniform",
                          include="*.c_*.weight")
    assert len(masks) == 4
    for name, mask in masks.items():
        weight = model.get_parameter(name)
        assert mask.shape == weight.shape
        assert int(mask.sum()) == weight.numel() // 2
        assert torch.all(weight[~mask] == 0)
        if mask_type == "2:4":
            assert torch.all(mask.reshape(-1, 4, mask.shape[1]).sum(1) == 2)  # groups of 4 inputs along dim 0
        assert f"OBC: {name} pruned to" in caplog.text
        assert f"OBC: {name} is" not in caplog.text  # no magnitude fallback
    w = dense.get_parameter(layer + ".weight").detach().double()
    if mask_type == "2:4":
        mag = nm_mask(w.abs(), 2, 4, input_dim=0)
    else:
        mag = w.abs() > w.abs().flatten().sort().values[w.numel() // 2 - 1]
    obc_err = torch.linalg.norm(x @ w - x @ model.get_parameter(layer + ".weight").detach().double())
    mag_err = torch.linalg.norm(x @ w - x @ (w * mag))
    assert int(mag.sum()) == w.numel() // 2
    assert obc_err < mag_err
