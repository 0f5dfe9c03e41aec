"""Sparse-aware init (``rescale_init``): the helpers by hand, scaled exactly once, off means untouched, the signal
scale at init, a real run.

Methods that mask a freshly initialised model from step 0 multiply each kept weight by sqrt(fan_in / active
fan-in) of its output unit (Evci et al., AAAI 2022); GaP, whose step-0 mask can be a magnitude top-k, scales each
unit's kept weights back to the unit's dense weight norm instead. Without it LeNet-5 on Fashion-MNIST can stay at
chance.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.shared import roundtrip
from torch import nn

import sparsetrain
from sparsetrain.maskops import keep_count, sparse_init_scale
from sparsetrain.methods.gap import norm_preserving_scale, unit_sq_norms

FROM_SCRATCH = ["static", "set", "rigl", "gap", "pgap"]
SCHEDULES = {
    "set": dict(unit="steps", delta=3, t_end=20),
    "rigl": dict(unit="steps", delta=3, t_end=20),
    "gap": dict(unit="steps", groups=3, rounds=2, period=4),
    "pgap": dict(unit="steps", period=5, rounds=2),
}
TOTAL = 30


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def build(method: str, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = mlp()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparsifier = sparsetrain.create(method, model, sparsity=0.75, total_steps=TOTAL,
                                    **{**SCHEDULES.get(method, {}), **options})  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier, initial


def train_step(model, optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def expected_weight(initial: torch.Tensor, mask: torch.Tensor, method: str = "static") -> torch.Tensor:
    """Written from the definition: row r keeps its kept weights times sqrt(fan_in / kept in row r); for GaP
    times sqrt(dense |row r|^2 / kept |row r|^2)."""
    out = torch.zeros_like(initial)
    fan_in = mask[0].numel()
    for r in range(mask.shape[0]):
        active = int(mask[r].sum())
        if "gap" in method:
            dense, kept = float(initial[r].double().pow(2).sum()), float((initial[r] * mask[r]).double().pow(2).sum())
            factor = math.sqrt(dense / kept) if kept else 1.0
        else:
            factor = math.sqrt(fan_in / active) if active else 1.0
        out[r] = initial[r] * mask[r] * factor
    return out


# ----------------------------------------------------------------------------------------------- the helper
def test_sparse_init_scale_by_hand():
    mask = torch.tensor(
        [
            [1, 1, 1, 1],  # all 4 inputs active: 1
            [1, 0, 0, 0],  # 1 of 4: sqrt(4) = 2
            [0, 0, 0, 0],  # no active input: untouched, 1
            [0, 1, 0, 1],  # 2 of 4: sqrt(2)
        ],
        dtype=torch.bool,
    )
    scale = sparse_init_scale(mask)
    assert scale.shape == (4, 1)
    assert torch.allclose(scale.flatten(), torch.tensor([1.0, 2.0, 1.0, math.sqrt(2)]))
    weight = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.0, 0.0, 0.0], [0.0] * 4, [0.0, -1.0, 0.0, 3.0]])
    assert torch.allclose(weight * scale, torch.tensor(
        [[1.0, -2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4, [0.0, -math.sqrt(2), 0.0, 3 * math.sqrt(2)]]
    ))  # fmt: skip


def test_sparse_init_scale_of_a_conv_counts_channels_and_kernel():
    # (out=2, in=2, kh=1, kw=2): fan-in 4 per output channel; channel 0 keeps 1 (factor 2), channel 1 keeps 3.
    mask = torch.tensor([[[[1, 0]], [[0, 0]]], [[[1, 1]], [[0, 1]]]], dtype=torch.bool)
    scale = sparse_init_scale(mask)
    assert scale.shape == (2, 1, 1, 1)
    assert torch.allclose(scale.flatten(), torch.tensor([2.0, math.sqrt(4 / 3)]))


def test_norm_preserving_scale_by_hand():
    # Row 0 keeps 3 and 4 of (3, 4, 12): |kept|^2 = 25, dense 169, factor 13 / 5. Row 1 keeps everything: 1.
    # Row 2 keeps nothing: 1. Unlike sqrt(fan_in / active) = sqrt(3 / 2), the factor depends on which weights stay.
    dense = torch.tensor([[3.0, 4.0, 12.0], [1.0, -1.0, 2.0], [5.0, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    scale = norm_preserving_scale(dense * mask, unit_sq_norms(dense))
    assert scale.shape == (3, 1)
    assert torch.allclose(scale.flatten(), torch.tensor([13 / 5, 1.0, 1.0]))
    assert torch.allclose(unit_sq_norms(dense * mask * scale)[:2], unit_sq_norms(dense)[:2])


# ----------------------------------------------------------------------------------------------- the option
@pytest.mark.parametrize("method", FROM_SCRATCH)
def test_option_is_on_by_default_for_the_sparse_from_scratch_methods(method):
    assert sparsetrain.method_options(method)["rescale_init"] is True


@pytest.mark.parametrize("method", ["dense", "gmp", "acdc", "imp", "magnitude"])
def test_methods_that_start_dense_have_no_such_option(method):
    assert "rescale_init" not in sparsetrain.method_options(method)


def test_option_must_be_a_bool():
    with pytest.raises(ValueError, match="rescale_init"):
        sparsetrain.create("static", mlp(), sparsity=0.5, rescale_init="no")


@pytest.mark.parametrize("method", FROM_SCRATCH)
def test_kept_weights_scaled_once_at_step_0(method):
    model, _, sparsifier, initial = build(method)
    assert sparsifier.init_rescaled
    assert [e["event"] for e in sparsifier.history].count("init_rescale") == 1
    for name, param in sparsifier.params.items():
        mask = sparsifier.masks[name]
        assert torch.allclose(param.detach(), expected_weight(initial[name], mask, method), rtol=1e-5, atol=0)
        assert torch.all(param.detach()[~mask] == 0)
        # the counts are the masks' own: scaling never turns a kept weight into a zero
        assert int(torch.count_nonzero(param)) == int(mask.sum())
    for name, param in model.named_parameters():
        if name not in sparsifier.params:
            assert torch.equal(param.detach(), initial[name])  # biases untouched


def test_static_keeps_exact_layer_counts():
    _, _, sparsifier, _ = build("static")
    for param in sparsifier.params.values():
        assert int(torch.count_nonzero(param)) == keep_count(param.numel(), 0.75)


@pytest.mark.parametrize("method", FROM_SCRATCH)
def test_off_leaves_kept_weights_as_initialised(method):
    _, _, sparsifier, initial = build(method, rescale_init=False)
    assert not sparsifier.init_rescaled
    assert all(e["event"] != "init_rescale" for e in sparsifier.history)
    for name, param in sparsifier.params.items():
        mask = sparsifier.masks[name]
        assert torch.equal(param.detach(), initial[name] * mask)


@pytest.mark.parametrize("method", FROM_SCRATCH)
def test_resume_does_not_scale_again(method):
    split = 10
    model, optimizer, sparsifier, _ = build(method)
    for step in range(TOTAL):
        if step == split:
            saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "sparsifier": sparsifier.state_dict()})  # fmt: skip
        train_step(model, optimizer, step)
    assert saved["sparsifier"]["init_rescaled"] is True

    # A fresh process: new weights, scaled by the new sparsifier at its step 0; then the checkpoint replaces them.
    model2, optimizer2, sparsifier2, _ = build(method, seed=123)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    assert sparsifier2.init_rescaled
    sparsifier2.rescale_kept_weights()  # the state says it was done: a no-op
    assert all(torch.equal(a, b) for a, b in zip(saved["model"].values(), model2.state_dict().values()))
    for step in range(split, TOTAL):
        train_step(model2, optimizer2, step)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert sparsifier2.history == sparsifier.history


def test_state_at_step_0_round_trips():
    model, _, sparsifier, _ = build("static")
    saved = roundtrip({"model": model.state_dict(), "sparsifier": sparsifier.state_dict()})
    model2, _, sparsifier2, _ = build("static", seed=7)
    model2.load_state_dict(saved["model"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    sparsifier2.rescale_kept_weights()
    assert all(torch.equal(a, b) for a, b in zip(saved["model"].values(), model2.state_dict().values()))


# ----------------------------------------------------------------------------------------------- signal scale
def deep_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))  # fmt: skip


def lenet5_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))  # fmt: skip


NETS = {"mlp": (deep_mlp, (512, 64)), "lenet5": (lenet5_like, (256, 1, 28, 28))}


@torch.no_grad()
def output_stds(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Each Linear/Conv layer's output scale: every unit's std over the inputs (and positions), RMS over units."""
    stds = []
    for module in model:
        x = module(x)
        if isinstance(module, nn.Linear | nn.Conv2d):
            per_unit = x.transpose(0, 1).reshape(x.shape[1], -1)
            stds.append(float(per_unit.var(dim=1).mean().sqrt()))
    return stds


def std_ratios(method: str, net: str, seed: int, **options) -> list[float]:
    """Sparse init's output std over the dense init's, per layer, on the same random inputs (sparsity 0.9)."""
    make, shape = NETS[net]
    torch.manual_seed(seed)
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(99))
    dense = output_stds(model, x)
    sparsetrain.create(method, model, sparsity=0.9, total_steps=100, **options)
    return [s / d for s, d in zip(output_stds(model, x), dense)]


# Measured before GaP's norm-preserving factor: the fan-in factor after a magnitude top-k made each pruned layer
# ~1.65x louder, compounding to 2.2-4.5x at the last layer of both nets. Now the worst layer over seeds 0-9 is
# within 18% at 0.9; at 0.98 the 10-unit layers of LeNet-5 with ~2 kept inputs per unit reach 30-60% either way.
@pytest.mark.parametrize("init_mask", ["magnitude", "random"])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", ["gap", "pgap"])
def test_gap_init_keeps_every_layer_within_20_percent_of_the_dense_scale(method, net, init_mask):
    for seed in range(5):
        ratios = std_ratios(method, net, seed, init_mask=init_mask)
        assert all(0.8 <= r <= 1.2 for r in ratios), (seed, [round(r, 2) for r in ratios])


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", ["static", "set", "rigl"])
def test_random_mask_init_keeps_the_dense_scale_on_average(method, net):
    # The fan-in factor is exact in expectation over a random mask; one draw of a layer with 2-3 kept weights per
    # unit (LeNet-5's first conv at 0.9 uniform) can be 30-50% off, so the mean over seeds is what it promises.
    per_seed = [std_ratios(method, net, seed) for seed in range(5)]
    means = [sum(layer) / len(layer) for layer in zip(*per_seed)]
    assert all(0.8 <= m <= 1.2 for m in means), [round(m, 2) for m in means]


# ----------------------------------------------------------------------------------------------- a real run
# Measured (Fashion-MNIST, 4000 samples, 2 epochs, batch 32, static 0.9, seeds 0-4): without the option the
# train loss stays at ln 10 = 2.303 and test accuracy at exactly 10.00; with it the loss ends at 0.73-1.33 and
# test accuracy at 64-75%.
@pytest.mark.parametrize("seed", [0, 1])
def test_lenet5_static_learns_only_with_rescaled_init(seed, tmp_path):
    pytest.importorskip("yaml")
    from sparsetrain.train.config import resolve
    from sparsetrain.train.data import DataError
    from sparsetrain.train.loop import Run

    results = {}
    for rescale in (False, True):
        config = resolve(None, dict(dataset="fashion-mnist", model="lenet5", method="static", sparsity=0.9,
                                    seed=seed, epochs=2, limit_train=4000, batch_size=32, threads=1, plots=False,
                                    method_options={"rescale_init": rescale},
                                    out=str(tmp_path / f"rescale{int(rescale)}")))  # fmt: skip
        run = Run(config)
        try:
            summary = run.run()
        except DataError:
            pytest.skip("Fashion-MNIST not installed")
        results[rescale] = (run.metrics[-1]["train_loss"], summary["sparse_model"]["test_acc"])
        assert summary["sparse_model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    (loss_off, acc_off), (loss_on, acc_on) = results[False], results[True]
    assert loss_off > 2.25 and acc_off < 15, "the failure this option fixes no longer shows without it"
    assert loss_on < 2.0 and acc_on > 40
