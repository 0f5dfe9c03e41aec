"""M-FAC: the block-wise Woodbury inverse-Fisher-vector product and diagonal, and the M-FAC optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.errors import TrainingDiverged
from sparsetrain.mfac import MFACInverse
from sparsetrain.optim import MFAC


def _dense_inverse(grads: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """(damp I + G^T G / m)^-1, block-diagonal over blocks of ``block`` consecutive weights."""
    m, d = grads.shape
    block = block or d
    fisher = torch.zeros(d, d, dtype=grads.dtype)
    for start in range(0, d, block):
        end = min(start + block, d)
        g = grads[:, start:end]
        fisher[start:end, start:end] = damp * torch.eye(end - start, dtype=grads.dtype) + g.T @ g / m
    return torch.linalg.inv(fisher)


@pytest.mark.parametrize(
    ("m", "d", "block"),
    [(1, 50, None), (7, 300, None), (32, 200, None), (64, 500, None), (16, 301, 64), (16, 300, 100), (8, 97, 1)],
)
def test_ihvp_and_diag_equal_the_dense_inverse(m, d, block):
    gen = torch.Generator().manual_seed(m * 1000 + d)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    damp = 0.05
    dense = _dense_inverse(grads, damp, block)
    inverse = MFACInverse(grads, damp, block)
    for _ in range(3):
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        expected = dense @ v
        assert ((inverse.ihvp(v) - expected).norm() / expected.norm()).item() < 1e-4
    assert ((inverse.diag() - dense.diagonal()).norm() / dense.diagonal().norm()).item() < 1e-4


def test_blocks_differ_from_the_full_inverse_and_block_d_equals_it():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(8, 120, generator=gen, dtype=torch.float64)
    v = torch.randn(120, generator=gen, dtype=torch.float64)
    full = MFACInverse(grads, 0.1).ihvp(v)
    torch.testing.assert_close(MFACInverse(grads, 0.1, 120).ihvp(v), full)
    assert not torch.allclose(MFACInverse(grads, 0.1, 40).ihvp(v), full)


@pytest.mark.parametrize(
    ("grads", "damp", "block", "match"),
    [
        (torch.zeros(0, 10), 0.1, None, "m >= 1.*got m = 0"),
        (torch.zeros(10), 0.1, None, "2-D tensor"),
        (torch.zeros(3, 10), 0.0, None, "damp.*> 0, got 0.0"),
        (torch.zeros(3, 10), -1.0, None, "damp.*> 0, got -1.0"),
        (torch.zeros(3, 10), float("nan"), None, "damp.*got nan"),
        (torch.zeros(3, 10), 0.1, 0, r"block_size.*\[1, d = 10\], got 0"),
        (torch.zeros(3, 10), 0.1, 11, r"block_size.*\[1, d = 10\], got 11"),
        (torch.zeros(3, 10, dtype=torch.long), 0.1, None, "floating point"),
    ],
)
def test_bad_inputs_raise(grads, damp, block, match):
    with pytest.raises(ValueError, match=match):
        MFACInverse(grads, damp, block)


def test_ihvp_checks_the_vector_shape():
    with pytest.raises(ValueError, match=r"shape \(10,\), got \(9,\)"):
        MFACInverse(torch.randn(3, 10), 0.1).ihvp(torch.randn(9))


# ---------------------------------------------------------------------------------------------------- optimizer
def _regression(seed: int = 0):
    """Noisy least squares with feature scales over 1.5 decades (Hessian condition number 1000)."""
    gen = torch.Generator().manual_seed(seed)
    d = 20
    scales = torch.logspace(0, -1.5, d, dtype=torch.float64)
    xs = torch.randn(4000, d, generator=gen, dtype=torch.float64) * scales
    ys = xs @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        4000, generator=gen, dtype=torch.float64
    )
    best = torch.linalg.lstsq(xs, ys).solution
    return xs, ys, (0.5 * (xs @ best - ys).square().mean()).item()


def _excess_loss(make_optimizer, xs, ys, optimum, steps=300) -> float:
    w = torch.zeros(xs.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([w])
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(xs), (8,), generator=gen)
        optimizer.zero_grad()
        (0.5 * (xs[idx] @ w - ys[idx]).square().mean()).backward()
        optimizer.step()
    with torch.no_grad():
        return (0.5 * (xs @ w - ys).square().mean()).item() - optimum


def test_mfac_beats_sgd_on_an_ill_conditioned_quadratic():
    xs, ys, optimum = _regression()
    lr, damp = 0.01, 0.01
    mfac = _excess_loss(lambda p: MFAC(p, lr=lr, damp=damp, ngrads=64), xs, ys, optimum)
    sgd = _excess_loss(lambda p: torch.optim.SGD(p, lr=lr), xs, ys, optimum)
    # SGD at lr / damp: the largest gain M-FAC gives any direction; a larger step is not what makes M-FAC faster.
    sgd_scaled = _excess_loss(lambda p: torch.optim.SGD(p, lr=lr / damp), xs, ys, optimum)
    assert mfac < 0.1 * sgd, (mfac, sgd)
    assert mfac < 0.5 * sgd_scaled, (mfac, sgd_scaled)


def test_mfac_direction_is_the_inverse_fisher_of_the_window():
    """Each step moves by lr * F^-1 g for the Fisher of the last m gradients (zero rows before m steps)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m, damp, lr = 3, 0.05, 0.1
    optimizer = MFAC(net.parameters(), lr=lr, damp=damp, ngrads=m)
    seen = []
    for _ in range(5):
        optimizer.zero_grad()
        net(torch.randn(6, 5, dtype=torch.float64)).square().sum().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        before = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        seen.append(grad)
        recent = seen[-m:]
        window = torch.stack(recent + [torch.zeros_like(grad)] * (m - len(recent)))
        optimizer.step()
        after = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        expected = MFACInverse(window, damp).ihvp(grad)
        torch.testing.assert_close((before - after) / lr, expected, rtol=1e-8, atol=1e-8)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def _train(net, optimizer, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 10, generator=gen)
        y = torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()


def test_mfac_resume_is_bit_identical(tmp_path):
    def make(net):
        groups = [{"params": [net[0].weight, net[0].bias], "lr": 0.002}, {"params": list(net[2:].parameters())}]
        return MFAC(groups, lr=0.001, momentum=0.9, weight_decay=1e-4, damp=0.1, ngrads=4)

    straight = _mlp()
    optimizer = make(straight)
    _train(straight, optimizer, 7, seed=0)
    _train(straight, optimizer, 5, seed=1)

    resumed = _mlp()
    first = make(resumed)
    _train(resumed, first, 7, seed=0)  # 7 steps: the ring buffer has wrapped and its slot is mid-window
    torch.save({"model": resumed.state_dict(), "optim": first.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    restarted = _mlp()
    restarted.load_state_dict(saved["model"])
    second = make(restarted)
    second.load_state_dict(saved["optim"])
    _train(restarted, second, 5, seed=1)
    for a, b in zip(straight.parameters(), restarted.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mfac_param_groups_set_the_lr():
    net = _mlp()
    frozen = MFAC([{"params": net[0].parameters(), "lr": 0.0}, {"params": net[2:].parameters()}], lr=0.01, damp=0.1)
    before = copy.deepcopy(net)
    _train(net, frozen, 3)
    assert all(torch.equal(a, b) for a, b in zip(net[0].parameters(), before[0].parameters(), strict=True))
    assert not torch.equal(net[4].weight, before[4].weight)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"damp": 0.0}, "damp must be a finite number > 0, got 0.0"),
        ({"ngrads": 0}, "ngrads.*>= 1, got 0"),
        ({"momentum": 1.0}, r"momentum.*\[0, 1\), got 1.0"),
        ({"lr": -1.0}, "lr.*>= 0, got -1.0"),
        ({"weight_decay": -0.1}, "weight_decay.*>= 0, got -0.1"),
    ],
)
def test_mfac_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        MFAC(_mlp().parameters(), **{"lr": 0.01, **options})


def test_mfac_needs_one_fisher_for_all_groups():
    net = _mlp()
    with pytest.raises(ValueError, match="ngrads defines the one Fisher.*got 32 and 8"):
        MFAC([{"params": net[0].parameters()}, {"params": net[2].parameters(), "ngrads": 8}], lr=0.01)


@pytest.mark.parametrize("method", ["gmp", "acdc"])
def test_masks_hold_with_a_sparsifier_attached_to_mfac(method):
    net = _mlp()
    optimizer = MFAC(net.parameters(), lr=0.001, momentum=0.9, damp=0.1, ngrads=8)
    sparsifier = sparsetrain.create(method, net, sparsity=0.8, total_steps=30)
    sparsifier.attach(optimizer)
    gen = torch.Generator().manual_seed(0)
    pruned_at_some_step = False
    for _ in range(30):
        x, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        for name, mask in sparsifier.masks.items():
            param = sparsifier.params[name]
            assert torch.all(param[~mask] == 0), name
            pruned_at_some_step |= bool((~mask).any())
    assert pruned_at_some_step
    assert sparsifier.sparsity().overall > 0.5


def test_mfac_indefinite_window_raises_before_the_weights_turn_nan():
    """damp tiny against |g|^2 in float32 with near-identical gradients: a clear error, weights still finite."""
    torch.manual_seed(0)
    net = nn.Linear(200, 10)
    optimizer = MFAC(net.parameters(), lr=1e-9, damp=1e-10, ngrads=16)
    x, y = torch.randn(64, 200), torch.randint(0, 10, (64,))
    with pytest.raises(TrainingDiverged, match=r"not positive definite in torch.float32 \(damp=1e-10.*raise damp"):
        for i in range(40):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x * (1 + 1e-4 * i)), y).backward()
            optimizer.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
