"""Exact counts of the one-shot solvers over many small random layouts (property style).

The contract, for SparseGPT and ExactOBS alike: the mask keeps exactly the asked count, pruned weights are exactly
0, and weights that are already 0 (dead units, dead or pruned inputs, a sparse model pruned further) are the
first, free removals. So, unstructured, the returned weight has exactly ``max(asked zeros, zeros it had)`` zeros,
and when it had at least the asked number it comes back unchanged (error 0). N:M: a kept weight is 0 only if it
was 0 already, in a group that had more zeros than M-N.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from sparsetrain.maskops import keep_count
from sparsetrain.oneshot import allocate_levels, build_database, exact_obs, prune_obc, prune_oneshot, sparsegpt
from sparsetrain.oneshot.database import _stitch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hessian(d: int, n: int, gen: torch.Generator, dead: list[int]) -> torch.Tensor:
    """The damped ``2 X^T X / n`` of correlated inputs; ``dead`` inputs are always 0 (zero row and column)."""
    x = torch.randn(n, d, generator=gen) @ (torch.eye(d) + torch.randn(d, d, generator=gen) / d**0.5)
    x[:, dead] = 0
    h = 2 * x.double().T @ x.double() / n
    mean = float(h.diagonal().mean())
    return h + (0.01 * mean if mean > 0 else 1.0) * torch.eye(d, dtype=torch.float64)


def random_layer(rng: random.Random, gen: torch.Generator):
    rows, channels = rng.randint(1, 6), rng.randint(1, 9)
    shape = rng.choice([(rows, channels), (rows, channels), (rows, channels, 2, 1), (rows, channels, 2, 2)])
    w = torch.randn(shape, generator=gen)
    flat = w.view(rows, -1)
    d = flat.shape[1]
    kind = rng.choice(["dense", "sparse already", "dead rows", "dead inputs", "all of them"])
    if kind in ("sparse already", "all of them"):  # e.g. an AC/DC model pruned further
        flat[torch.rand(flat.shape, generator=gen) < rng.random()] = 0
    if kind in ("dead rows", "all of them"):
        flat[torch.rand(rows, generator=gen) < 0.4] = 0
    dead = [j for j in range(d) if rng.random() < 0.3] if kind in ("dead inputs", "all of them") else []
    if kind == "dead inputs" and rng.random() < 0.5:
        flat[:, dead] = 0  # an input pruned away earlier, whose weights are 0 too
    return w, hessian(d, rng.randint(1, 40), gen, dead), kind


def check_unstructured(w, new, mask, keep, error, what):
    total, had = w.numel() - keep, int((w == 0).sum())
    assert int(mask.sum()) == keep, what
    assert torch.all(new[~mask] == 0), what
    assert int((new == 0).sum()) == max(total, had), what
    if had >= total:
        assert torch.equal(new, w) and error == 0.0, what


def check_nm(w, new, mask, n, m, what):
    assert int(mask.sum()) == w.numel() * n // m, what
    assert torch.all(new[~mask] == 0), what
    assert not torch.any((new == 0) & mask & (w != 0)), what  # a kept weight is 0 only if it was 0 already


@pytest.mark.parametrize("solve", [sparsegpt, exact_obs], ids=["sparsegpt", "exact_obs"])
def test_solvers_keep_exact_counts_over_random_layouts(solve):
    rng = random.Random(0)
    for case in range(120):
        gen = torch.Generator().manual_seed(case)
        w, h, kind = random_layer(rng, gen)
        channels, d = w.shape[1], w[0].numel()
        block = rng.randint(1, d + 3)
        sparsity = rng.choice([0.0, 1e-9, 0.001, 0.1, 0.5, 0.77, 0.999, None])
        keep = keep_count(w.numel(), sparsity) if sparsity is not None else rng.randint(0, w.numel())
        what = f"case {case}: {kind}, shape {tuple(w.shape)}, block {block}, keep {keep}"
        options = {"block_size": block} if solve is sparsegpt else {}
        new, mask, error = solve(w, h, keep=keep, **options)
        check_unstructured(w, new, mask, keep, error, what)
        for n, m in [(1, 2), (2, 4), (1, 3)]:
            if channels % m == 0:
                check_nm(w, *solve(w, h, mask_type=f"{n}:{m}", **options)[:2], n, m, f"{n}:{m} {what}")


def test_sparsegpt_removes_a_pruned_input_first_even_when_its_block_quota_is_smaller():
    # Input 3 is dead and its weights are 0 (a channel pruned earlier). Its block (columns 3-4) had an even quota
    # of 3 removals for 4 zeros: one zero was counted as kept and stayed 0 (no update reaches a dead input), so the
    # layer ended with 7 zeros for 6 asked.
    gen = torch.Generator().manual_seed(318)
    w = torch.randn(4, 5, generator=gen)
    w[:, 3] = 0
    new, mask, _ = sparsegpt(w, hessian(5, 30, gen, [3]), keep=14, block_size=3)
    assert int(mask.sum()) == 14 and int((new == 0).sum()) == 6 and not torch.any(mask[:, 3])


def test_sparsegpt_on_an_already_sparse_layer_prunes_its_zeros_first():
    # Column by column (block 1), the first column's quota was 0: its zero stayed, counted as kept.
    w = torch.tensor([[0.0, 0.0, 0.0, 0.8, 0.0, 0.1, 0.0, 0.0, 0.0, 1.0]])
    new, mask, _ = sparsegpt(w, hessian(10, 30, torch.Generator().manual_seed(0), []), keep=2, block_size=1)
    assert int(mask.sum()) == 2 and int((new == 0).sum()) == 8
    assert not torch.any(mask[w == 0]) and int(mask[w != 0].sum()) == 2  # the seven zeros and one more weight


@pytest.mark.parametrize("keep", [60, 48])
def test_exact_obs_leaves_a_layer_with_more_zeros_than_asked_unchanged(keep):
    # Only weights already 0 are removed: the optimum is the weight itself. The closed-form solve turned the kept
    # zeros into values of 1e-17 and so on (fewer zeros than the layer had, a nonzero error for no change).
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=gen)
    w[w.abs() < 0.4] = 0
    new, mask, error = exact_obs(w, hessian(10, 50, gen, []), keep=keep)
    assert int(mask.sum()) == keep and torch.equal(new, w) and error == 0.0


@pytest.mark.parametrize("solver", ["sparsegpt", "exact"])
def test_prune_obc_on_an_already_sparse_model_reaches_the_asked_sparsity(solver):
    # A model pruned earlier (by AC/DC, say) whose first 64 inputs are always 0 (image borders) and whose weights
    # on them went to 0, pruned further by OBC. SparseGPT's first block of 128 columns held more zeros than its
    # even share of the removals: the rest stayed 0, counted as kept (0.3 asked, 0.40 reached on the first layer).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(320, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(model[0].weight.shape) < 0.1] = 0
        model[0].weight[:, :64] = 0
    x = torch.randn(512, 320)
    x[:, :64] = 0
    for sparsity in (0.3, 0.5):
        pruned = copy.deepcopy(model)
        masks = prune_obc(pruned, sparsity, [x], solver=solver, distribution="uniform")
        for name, mask in masks.items():
            weight = pruned.get_parameter(name)
            asked = weight.numel() - keep_count(weight.numel(), sparsity)
            assert int((~mask).sum()) == asked and int((weight == 0).sum()) == asked, (solver, sparsity, name)


@pytest.mark.parametrize("solver", ["exact", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.4, 0.5])
def test_database_allocation_of_an_already_sparse_model_is_exact(sparsity, solver):
    # The first layer is 70% zeros already. Its database levels below 0.7 hold those zeros too (SparseGPT left
    # them; ExactOBS turned them into values of 1e-17), but were counted at their nominal sparsity: the stitched
    # model had more zeros than asked (379 for 378 at 0.4 with SparseGPT).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        model[0].weight[torch.rand(32, 16) < 0.7] = 0
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=gen)
    batches = [torch.randn(64, 16, generator=gen) @ mix for _ in range(4)]
    db = build_database(model, batches, solver=solver)
    target = sum(int((~m).sum()) for m in prune_oneshot(copy.deepcopy(model), sparsity).values())
    levels = allocate_levels([db.errors[n].tolist() for n in db.names], [db.zeros(n) for n in db.names], target)
    stitched = copy.deepcopy(model)
    with torch.no_grad():
        masks = _stitch(stitched, db, levels, target, {})
    assert sum(int((stitched.get_parameter(n) == 0).sum()) for n in masks) == target
    assert sum(int((~m).sum()) for m in masks.values()) == target
    assert db.zeros("0.weight")[0] == int((model[0].weight == 0).sum())  # level 0: the layer as it is
    pruned = copy.deepcopy(model)
    masks = prune_obc(pruned, sparsity, batches, allocation="database")
    assert sum(int((pruned.get_parameter(n) == 0).sum()) for n in masks) == target
