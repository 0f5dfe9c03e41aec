"""Tests for sparsetrain.distributions: uniform, ERK (Evci et al. 2020) and its dense-layer fix-up."""

from __future__ import annotations

import math

import pytest

from sparsetrain.distributions import DISTRIBUTIONS, check_distribution, erk, layer_sparsities, uniform

# LeNet-5: conv1, conv2, fc1, fc2, fc3.
LENET5 = {
    "conv1": (6, 1, 5, 5),
    "conv2": (16, 6, 5, 5),
    "fc1": (120, 400),
    "fc2": (84, 120),
    "fc3": (10, 84),
}
# Written out by hand: numel and sum(dims) of each layer.
NUMEL = {"conv1": 150, "conv2": 2400, "fc1": 48000, "fc2": 10080, "fc3": 840}
DIM_SUM = {"conv1": 17, "conv2": 32, "fc1": 520, "fc2": 204, "fc3": 94}
TOTAL = 61470


def _kept(sparsities: dict[str, float], numel: dict[str, int]) -> float:
    return sum((1.0 - sparsities[n]) * numel[n] for n in numel)


def test_hand_tables_are_consistent():
    # Guard against a typo in the tables above.
    assert {n: math.prod(s) for n, s in LENET5.items()} == NUMEL
    assert {n: sum(s) for n, s in LENET5.items()} == DIM_SUM
    assert sum(NUMEL.values()) == TOTAL


# ----------------------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_uniform(sparsity):
    out = uniform(LENET5, sparsity)
    assert out == {n: sparsity for n in LENET5}
    assert layer_sparsities("uniform", LENET5, sparsity) == {n: sparsity for n in LENET5}


# ----------------------------------------------------------------------------------------------- ERK
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.98])
def test_erk_total_kept_matches_target(sparsity):
    out = erk(LENET5, sparsity)
    assert set(out) == set(LENET5)
    target = (1.0 - sparsity) * TOTAL
    assert _kept(out, NUMEL) == pytest.approx(target, rel=1e-6)
    for s in out.values():
        assert 0.0 <= s < 1.0
    assert layer_sparsities("erk", LENET5, sparsity) == out


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.98])
def test_erk_density_proportional_to_sum_over_prod(sparsity):
    out = erk(LENET5, sparsity)
    density = {n: 1.0 - s for n, s in out.items()}
    raw = {n: DIM_SUM[n] / NUMEL[n] for n in LENET5}
    # fc1 and conv2 have the smallest raw densities: they stay sparse at every target here.
    sparse = [n for n in LENET5 if density[n] < 1.0]
    assert {"fc1", "conv2", "fc2"} <= set(sparse)
    for a in sparse:
        for b in sparse:
            assert density[a] / density[b] == pytest.approx(raw[a] / raw[b], rel=1e-9)


@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_erk_no_fixup_needed(sparsity):
    # Sum of raw * numel = sum of dim sums = 867. At 90% the scale is 0.1 * 61470 / 867 = 7.09: conv1 (raw
    # 17/150) gets density 0.80 and fc3 (raw 94/840) 0.79, both < 1, so every layer follows the formula.
    scale = (1.0 - sparsity) * TOTAL / sum(DIM_SUM.values())
    assert sum(DIM_SUM.values()) == 867
    out = erk(LENET5, sparsity)
    for name in LENET5:
        assert 1.0 - out[name] == pytest.approx(scale * DIM_SUM[name] / NUMEL[name], rel=1e-9)
        assert out[name] > 0.0


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_erk_fixup_makes_conv1_and_fc3_dense(sparsity):
    # At 80% the raw scale 0.2 * 61470 / 867 = 14.18 puts conv1 at density 1.61 (raw 0.1133, the largest):
    # it becomes dense; re-solved with (12294 - 150) / 850 = 14.29, fc3 (raw 0.1119) reaches 1.60 and becomes
    # dense too; conv2, fc1 and fc2 share what is left, (12294 - 150 - 840) / 756, fc2 at density 0.30.
    # At 50% the same two layers overflow (scales 35.45 and 35.98), fc2 ends at density 0.80.
    out = erk(LENET5, sparsity)
    assert out["conv1"] == 0.0
    assert out["fc3"] == 0.0
    scale = ((1.0 - sparsity) * TOTAL - 150 - 840) / (DIM_SUM["conv2"] + DIM_SUM["fc1"] + DIM_SUM["fc2"])
    for name in ("conv2", "fc1", "fc2"):
        assert 1.0 - out[name] == pytest.approx(scale * DIM_SUM[name] / NUMEL[name], rel=1e-9)
        assert 0.0 < out[name] < 1.0
    assert _kept(out, NUMEL) == pytest.approx((1.0 - sparsity) * TOTAL, rel=1e-6)


def test_erk_tiny_layer_becomes_exactly_dense():
    shapes = {"tiny": (10, 3), "big": (1000, 1000)}
    out = erk(shapes, 0.5)
    assert out["tiny"] == 0.0
    # The big layer carries the rest of the budget: (0.5 * 1_000_030 - 30) / 1_000_000 kept.
    assert 1.0 - out["big"] == pytest.approx((0.5 * 1_000_030 - 30) / 1_000_000, rel=1e-9)
    assert _kept(out, {"tiny": 30, "big": 1_000_000}) == pytest.approx(0.5 * 1_000_030, rel=1e-6)


def test_erk_order_of_layers_does_not_matter():
    reversed_shapes = dict(reversed(list(LENET5.items())))
    a, b = erk(LENET5, 0.8), erk(reversed_shapes, 0.8)
    for name in LENET5:
        assert a[name] == pytest.approx(b[name], rel=1e-12)


def test_erk_zero_sparsity_is_dense():
    out = erk(LENET5, 0.0)
    for name in LENET5:
        assert out[name] == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------- dispatch
def test_global_has_no_table():
    assert layer_sparsities("global", LENET5, 0.9) is None


def test_distributions_listed():
    assert set(DISTRIBUTIONS) == {"global", "uniform", "erk"}
    for name in ("global", "uniform", "erk"):
        assert check_distribution(name) == name


@pytest.mark.parametrize("bad", ["ERK", "er", "random", ""])
def test_unknown_distribution_lists_choices(bad):
    with pytest.raises(ValueError) as info:
        layer_sparsities(bad, LENET5, 0.9)
    message = str(info.value)
    assert repr(bad) in message
    for name in ("global", "uniform", "erk"):
        assert name in message
