"""Gradual M-FAC pruning (method ``mfac``): saliency, OBS update, fallback, recording window, options."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import sparsetrain


def _dense_inverse(grads: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """(damp I + G^T G / m)^-1, block-diagonal over blocks of ``block`` consecutive weights, formed densely."""
    m, d = grads.shape
    block = block or d
    fisher = torch.zeros(d, d, dtype=torch.float64)
    for start in range(0, d, block):
        end = min(start + block, d)
        g = grads[:, start:end]
        fisher[start:end, start:end] = damp * torch.eye(end - start, dtype=torch.float64) + g.T @ g / m
    return torch.linalg.inv(fisher)


def _run_to_first_update(ngrads: int, start: int, block: int | None, damp: float = 1e-2):
    """A bias-free linear model trained at lr 0 (fixed weights, gradients of fixed random batches) up to the
    first update step ``start`` (at 50% sparsity already).

    Returns the weights before it, the gradients of the steps before it, the sparsifier and the model.
    """
    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False)
    sparsifier = sparsetrain.create(
        "mfac", model, sparsity=0.5, distribution="global", total_steps=20, unit="steps",
        start=start, end=start + 4, frequency=4, initial_sparsity=0.5, ngrads=ngrads, damp=damp, block_size=block,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsifier.attach(optimizer)
    weights = model.weight.detach().clone()
    grads = []
    gen = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0, 0.5])
    for _ in range(start):
        # Inputs on different scales: the Fisher's diagonal varies by input, so its ranking is not |w|'s.
        x, y = torch.randn(4, 6, generator=gen) * scales, torch.randn(4, 3, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        grads.append(model.weight.grad.detach().reshape(-1).double().clone())
        optimizer.step()
    return weights, torch.stack(grads) if grads else None, sparsifier, model


@pytest.mark.parametrize("block", [None, 5])
def test_masks_and_obs_update_equal_the_dense_formulas(block):
    weights, grads, sparsifier, model = _run_to_first_update(ngrads=3, start=3, block=block)
    assert sparsifier.mask_version == 1  # the update at step 3 happened
    finv = _dense_inverse(grads[-3:], 1e-2, block)
    w = weights.reshape(-1).double()
    saliency = w.square() / (2 * finv.diagonal())
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[saliency.argsort(descending=True)[: w.numel() // 2]] = True
    mask = sparsifier.masks["weight"].reshape(-1)
    assert torch.equal(mask, keep)
    # The M-FAC ranking is not the magnitude one on this problem (else the test would not tell them apart).
    by_magnitude = torch.zeros_like(keep)
    by_magnitude[w.abs().argsort(descending=True)[: w.numel() // 2]] = True
    assert not torch.equal(keep, by_magnitude)
    # OBS: delta = -F^-1 v with v_q = w_q / [F^-1]_qq on the pruned q; the pruned weights are exact zeros.
    v = torch.where(~keep, w / finv.diagonal(), torch.zeros_like(w))
    expected = torch.where(keep, w - finv @ v, torch.zeros_like(w))
    after = model.weight.detach().reshape(-1).double()
    assert torch.allclose(after, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(after[keep], w[keep])  # the kept weights did move
    assert (after[~keep] == 0).all()
    assert sparsifier.grads == []  # the buffer is freed after the update (the next window is not open)


@pytest.mark.parametrize(("ngrads", "start"), [(3, 0), (5, 3)])
def test_too_few_gradients_fall_back_to_magnitude(ngrads, start):
    weights, _, sparsifier, model = _run_to_first_update(ngrads=ngrads, start=start, block=None)
    assert sparsifier.mask_version == 1
    w = weights.reshape(-1)
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[w.abs().argsort(descending=True)[: w.numel() // 2]] = True
    assert torch.equal(sparsifier.masks["weight"].reshape(-1), keep)
    assert torch.equal(model.weight.detach().reshape(-1), torch.where(keep, w, torch.zeros_like(w)))


def test_records_only_the_ngrads_steps_before_each_update():
    model = nn.Linear(4, 2, bias=False)
    sparsifier = sparsetrain.create(
        "mfac", model, sparsity=0.5, total_steps=20, unit="steps", start=5, end=13, frequency=4, ngrads=2
    )
    assert sparsifier.update_steps == [5, 9, 13]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sparsifier.attach(optimizer)
    held = []
    for _ in range(15):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
        held.append(len(sparsifier.grads))
    # Counts after steps 0..14: the windows are steps 3-4, 7-8, 11-12; each update frees the buffer.
    assert held == [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]


def test_same_schedule_as_gmp():
    opts = dict(sparsity=0.9, total_steps=100)
    gmp = sparsetrain.create("gmp", nn.Linear(4, 4), **opts)
    mfac = sparsetrain.create("mfac", nn.Linear(4, 4), **opts)
    assert mfac.update_steps == gmp.update_steps
    assert [mfac.target_sparsity_at(t) for t in range(100)] == [gmp.target_sparsity_at(t) for t in range(100)]


@pytest.mark.parametrize(
    ("option", "value"), [("ngrads", 0), ("ngrads", 1.5), ("damp", 0.0), ("damp", -1.0), ("block_size", 0)]
)
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(ValueError, match=option):
        sparsetrain.create("mfac", nn.Linear(4, 4), sparsity=0.5, total_steps=10, **{option: value})


def test_methods_command_lists_mfac():
    out = subprocess.run(
        [sys.executable, "-m", "sparsetrain", "methods", "mfac"], capture_output=True, text=True, check=True
    ).stdout
    assert "mfac" in out and "ngrads=16" in out
