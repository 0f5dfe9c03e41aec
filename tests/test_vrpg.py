"""vrpg: the projection, the variance-reduced estimator, the two-pass step, the fixed end, the options."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

import sparsetrain
from sparsetrain.maskops import keep_count
from sparsetrain.methods.vrpg import budget_shift, project_scores, vrpg_gradient


# ------------------------------------------------------------------------------------------ the projection
def reference_projection(s: np.ndarray, budget: float) -> np.ndarray:
    """argmin ||x - s||^2 subject to 0 <= x <= 1, sum(x) <= budget, by a generic QP solver."""
    result = minimize(
        lambda x: float(((x - s) ** 2).sum()),
        np.full_like(s, min(1.0, budget / len(s))),  # a feasible start
        jac=lambda x: 2 * (x - s),
        bounds=[(0, 1)] * len(s),
        constraints=[{"type": "ineq", "fun": lambda x: budget - x.sum(), "jac": lambda x: -np.ones_like(x)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert result.success, result.message
    return result.x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [0.0, 0.5, 2.0, 3.7, 10.0])
def test_projection_is_the_euclidean_projection_onto_the_budget(seed, budget):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(7, generator=g, dtype=torch.float64) * 1.6 - 0.3  # some below 0, some above 1
    (x,) = project_scores([s], budget)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.sum()) <= budget + 1e-9  # feasible, never above the budget
    np.testing.assert_allclose(x.numpy(), reference_projection(s.numpy(), budget), atol=1e-6)
    v = budget_shift([s], budget)
    if float(s.clamp(0, 1).sum()) <= budget:
        assert v == 0.0 and torch.equal(x, s.clamp(0, 1))  # already inside: only the box clamps
    else:
        assert v > 0 and abs(float(x.sum()) - budget) < 1e-8  # the budget binds (complementary slackness)


def test_projection_shares_one_shift_over_several_tensors():
    g = torch.Generator().manual_seed(3)
    parts = [torch.rand(4, 3, generator=g), torch.rand(5, generator=g)]
    joined = project_scores([torch.cat([p.flatten() for p in parts])], 3.0)[0]
    split = project_scores(parts, 3.0)
    assert [tuple(p.shape) for p in split] == [(4, 3), (5,)]
    torch.testing.assert_close(torch.cat([p.flatten() for p in split]), joined)
    assert all(torch.equal(a, b) for a, b in zip(parts, [parts[0], parts[1]]))  # inputs untouched


def cold_bisection(scores, budget, tol=1e-9):
    """The plain bisection on [0, max(s)] in float64 (the paper's method): the answer budget_shift must give."""

    def total(v):
        return sum(float((s.double() - v).clamp_(0, 1).sum()) for s in scores)

    if total(0.0) <= budget:
        return 0.0
    lo, hi = 0.0, max(float(s.max()) for s in scores)
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) > budget else (lo, mid)
    return hi


def polarised(g, n):
    """Scores like a trained vrpg's: most exactly 0, some exactly 1, a few in between, some stepped past the box."""
    s = torch.rand(n, generator=g)
    kind = torch.rand(n, generator=g)
    s = torch.where(kind < 0.8, torch.zeros(()), torch.where(kind < 0.9, torch.ones(()), s))
    return s + (torch.rand(n, generator=g) - 0.5) * 0.2 * (torch.rand(n, generator=g) < 0.3)


@pytest.mark.parametrize("seed", range(4))
def test_warm_started_shift_is_the_cold_bisection_bit_for_bit_and_stays_feasible(seed):
    """Over a drifting sequence of score sets, the shift started from the previous one (or from a poor hint, or
    none) is exactly the cold bisection's, and the projected scores never exceed the budget."""
    g = torch.Generator().manual_seed(seed)
    parts = [polarised(g, 3000).view(60, 50), polarised(g, 700), torch.full((40,), 0.37)]  # a block of ties
    budget = 0.1 * sum(p.numel() for p in parts)
    previous = None
    for _ in range(12):
        parts = [p + (torch.rand(p.shape, generator=g) - 0.45) * 0.05 for p in parts]
        cold = cold_bisection(parts, budget)
        assert cold > 0
        for start in (None, previous, cold, 0.5 * cold, 3.0, -1.0):
            assert budget_shift(parts, budget, start=start) == cold
        projected = project_scores(parts, budget, start=previous)
        # Feasible up to the float32 rounding of s - v (the shift itself fits in float64).
        assert sum(float(x.double().sum()) for x in projected) <= budget * (1 + 1e-6)
        assert sum(float((p.double() - cold).clamp(0, 1).sum()) for p in parts) <= budget
        assert all(torch.equal(x, (p - cold).clamp(0, 1)) for x, p in zip(projected, parts))
        previous = cold
        parts = projected


@pytest.mark.parametrize("budget", [0.0, 1.0, 5.0, 20.0, 39.0])
def test_shift_with_all_scores_tied_is_the_cold_bisection(budget):
    s = [torch.full((8, 5), 0.6), torch.full((3,), 1.4)]
    assert budget_shift(s, budget) == cold_bisection(s, budget)
    assert budget_shift(s, budget, start=0.3) == cold_bisection(s, budget)


def test_projection_refuses_a_negative_budget():
    with pytest.raises(ValueError, match="budget must be a finite number >= 0, got -1"):
        budget_shift([torch.rand(3)], -1)


# ------------------------------------------------------------------------------------------ the estimator
def test_estimator_expectation_is_the_exact_gradient_by_enumeration():
    """E over two independent masks of (L1 - L2)/2 (m1 - m2)/(s(1 - s)) = d/ds sum_m p(m|s) L(m), exactly."""
    torch.manual_seed(0)
    n = 3
    w, x, y = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64), torch.tensor(0.7).double()
    masks = [torch.tensor(bits, dtype=torch.bool) for bits in itertools.product([0, 1], repeat=n)]
    loss = {tuple(m.tolist()): float((x @ (w * m) - y) ** 2) for m in masks}
    s = torch.tensor([0.2, 0.55, 0.9], dtype=torch.float64, requires_grad=True)

    def prob(m, s):
        return torch.prod(torch.where(m, s, 1 - s))

    expected = sum(prob(m, s) * loss[tuple(m.tolist())] for m in masks)
    (exact,) = torch.autograd.grad(expected, s)
    s = s.detach()
    mean = torch.zeros(n, dtype=torch.float64)
    for m1, m2 in itertools.product(masks, masks):
        weight = prob(m1, s) * prob(m2, s)
        mean += weight * vrpg_gradient(loss[tuple(m1.tolist())], loss[tuple(m2.tolist())], m1, m2, s)
    torch.testing.assert_close(mean, exact, rtol=1e-12, atol=1e-12)
    assert exact.abs().min() > 1e-3  # a real gradient, not a trivial 0 = 0


def test_estimator_is_zero_where_the_masks_agree_and_finite_at_the_box():
    s = torch.tensor([0.0, 1.0, 0.5, 0.5])
    m1 = torch.tensor([False, True, True, False])
    m2 = torch.tensor([False, True, True, True])
    g = vrpg_gradient(2.0, 1.0, m1, m2, s)
    assert torch.equal(g, torch.tensor([0.0, 0.0, 0.0, -2.0]))  # (2 - 1)/2 * (0 - 1)/(0.25)


# ------------------------------------------------------------------------------------------ the method
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def make(total=20, lr=0.1, momentum=0.0, seed=0, **options):
    torch.manual_seed(seed)
    model = mlp()
    sparsifier = sparsetrain.create("vrpg", model, sparsity=0.75, total_steps=total, **options)
    optimizer = sparsifier.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


def step(model, optimizer, i):
    x, y = batch(i)

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return optimizer.step(closure)


def masked_passes(model, latent, masks, x, y):
    """By hand, what each of vrpg's passes computes: the loss of a copy whose sparsified weights are
    ``latent * mask``, and its gradients (masked for the sparsified weights, as the sparse chain rule keeps them)."""
    losses, grads = [], []
    for mask in masks:
        twin = copy.deepcopy(model)
        named = dict(twin.named_parameters())
        with torch.no_grad():
            for name in latent:
                named[name].copy_(latent[name] * mask[name])
        loss = nn.functional.cross_entropy(twin(x), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append({n: p.grad * mask[n] if n in mask else p.grad for n, p in named.items()})
    return losses, grads


def test_one_step_is_the_sparse_chain_rule_and_the_projected_score_step():
    """Weights: w - lr * mean_j(m_j * grad L at w * m_j); scores: P(s - score_lr * estimate). Checked by hand."""
    model, optimizer, sparsifier = make(score_optimizer="sgd", score_lr=0.05)
    latent = sparsifier.latent_weights()
    s0 = {n: s.clone() for n, s in sparsifier.s.items()}
    m1, m2 = sparsifier.sample(0)
    assert any(not torch.equal(m1[n], m2[n]) for n in m1)
    x, y = batch(0)
    losses, grads = masked_passes(model, latent, (m1, m2), x, y)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n not in latent}
    returned = step(model, optimizer, 0)
    assert float(returned.detach()) == pytest.approx(losses[0], abs=1e-6)
    after = sparsifier.latent_weights()
    for name, w in latent.items():
        expected = w - 0.1 * (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6)
        untouched = ~(m1[name] | m2[name])
        assert torch.equal(after[name][untouched], w[untouched])  # in neither pass: not moved at all
    named = dict(model.named_parameters())
    for name, b in biases.items():
        torch.testing.assert_close(named[name].detach(), b - 0.1 * (grads[0][name] + grads[1][name]) / 2)
    stepped = [s0[n] - 0.05 * vrpg_gradient(losses[0], losses[1], m1[n], m2[n], s0[n]) for n in s0]
    for got, want in zip(sparsifier.s.values(), project_scores(stepped, sparsifier.budget)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_between_steps_the_model_is_the_top_k_of_the_scores_at_the_exact_count():
    model, optimizer, sparsifier = make(momentum=0.9)
    n = sum(p.numel() for p in sparsifier.params.values())
    for i in range(6):
        step(model, optimizer, i)
        total = sum(float(s.sum()) for s in sparsifier.s.values())
        assert total <= sparsifier.budget + 1e-4
        assert all(float(s.min()) >= 0 and float(s.max()) <= 1 for s in sparsifier.s.values())
        top = sparsifier.top_k()
        assert all(torch.equal(top[name], sparsifier.masks[name]) for name in top)
        assert sum(int(m.sum()) for m in sparsifier.masks.values()) == keep_count(n, 0.75)
        for name, p in sparsifier.params.items():
            outside = p.detach()[~sparsifier.masks[name]]
            assert torch.all(outside == 0) and not torch.signbit(outside).any()


def test_the_mask_is_fixed_at_end_exactly_sparse_with_hard_zeros():
    model, optimizer, sparsifier = make(total=12, unit="steps", end=8, momentum=0.9)
    assert sparsifier.phase == "sampled" and sparsifier.needs_dense_gradients()
    for i in range(8):
        step(model, optimizer, i)
    assert sparsifier.phase == "sparse" and sparsifier.hidden is None and not sparsifier.needs_dense_gradients()
    version, scores = sparsifier.mask_version, {n: s.clone() for n, s in sparsifier.s.items()}
    masks = {n: m.clone() for n, m in sparsifier.masks.items()}
    for i in range(8, 12):
        before = {n: p.detach().clone() for n, p in sparsifier.params.items()}
        step(model, optimizer, i)
        assert any(not torch.equal(before[n], p) for n, p in sparsifier.params.items())  # still training
    assert sparsifier.mask_version == version
    assert all(torch.equal(masks[n], sparsifier.masks[n]) for n in masks)
    assert all(torch.equal(scores[n], sparsifier.s[n]) for n in scores)
    n = sum(p.numel() for p in sparsifier.params.values())
    report = sparsifier.sparsity()
    assert report.zeros == n - keep_count(n, 0.75)  # exact: every kept weight is nonzero here
    assert any(e["event"] == "mask_fixed" for e in sparsifier.history)


def test_resume_inside_the_sampled_phase_is_bit_identical(tmp_path):
    """Model, optimizer and sparsifier states (scores, Adam moments of the scores, the weights outside the top-k
    and their momentum) saved at step 5 and loaded into a fresh process's objects give the same run."""
    model, optimizer, sparsifier = make(momentum=0.9)
    for i in range(5):
        step(model, optimizer, i)
    torch.save({"m": model.state_dict(), "o": optimizer.state_dict(), "s": sparsifier.state_dict()}, tmp_path / "c")
    for i in range(5, 12):
        step(model, optimizer, i)
    saved = torch.load(tmp_path / "c", weights_only=True)
    model2, optimizer2, sparsifier2 = make(momentum=0.9, seed=7)
    model2.load_state_dict(saved["m"])
    optimizer2.load_state_dict(saved["o"])
    sparsifier2.load_state_dict(saved["s"])
    for i in range(5, 12):
        step(model2, optimizer2, i)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(sparsifier.s[n], sparsifier2.s[n]) for n in sparsifier.s)
    assert all(torch.equal(sparsifier.hidden[n], sparsifier2.hidden[n]) for n in sparsifier.hidden)


def test_outside_the_top_k_weights_keep_their_momentum_across_steps():
    """A weight that leaves the top-k keeps its latent value and its momentum buffer for the next step."""
    model, optimizer, sparsifier = make(momentum=0.9)
    for i in range(3):
        step(model, optimizer, i)
    kept = sparsifier.hidden_state
    assert any(float(b["momentum_buffer"].abs().sum()) > 0 for b in kept.values())
    for name, p in sparsifier.params.items():
        buffer = optimizer.state[p]["momentum_buffer"]
        assert torch.all(buffer[~sparsifier.masks[name]] == 0)  # the optimizer's own copy: zero where masked


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"score_lr": -0.1}, "score_lr must be a finite number >= 0, got -0.1"),
        ({"score_lr": True}, "score_lr must be a finite number >= 0, got True"),
        ({"score_init": 0.0}, r"score_init must be None or a number in \(0, 1\], got 0.0"),
        ({"score_init": 1.5}, r"score_init must be None or a number in \(0, 1\], got 1.5"),
        ({"score_optimizer": "rmsprop"}, "score_optimizer must be 'adam' or 'sgd', got 'rmsprop'"),
        ({"granularity": "row"}, "granularity must be 'weight' or 'channel', got 'row'"),
        ({"score_schedule": "linear"}, "score_schedule must be 'constant' or 'cosine', got 'linear'"),
        ({"distribution": "erk"}, "one global budget.*distribution='erk' is not supported"),
        ({"unit": "steps", "end": 50}, "vrpg needs 0 <= end <= total; got end=50"),
        ({"mask_type": "2:4"}, "does not support N:M masks"),
        ({"lr": 0.1}, "has no option 'lr'"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(options, match):
    with pytest.raises(ValueError, match=match):
        sparsetrain.create("vrpg", mlp(), sparsity=0.9, total_steps=20, **options)


def test_needs_its_own_optimizer_and_a_closure():
    model = mlp()
    sparsifier = sparsetrain.create("vrpg", model, sparsity=0.9, total_steps=20)
    with pytest.raises(ValueError, match="wrap_optimizer"):
        sparsifier.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    optimizer = sparsifier.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    sparsifier.attach(optimizer)
    with pytest.raises(TypeError, match="closure"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="attach"):
        sparsetrain.create("vrpg", mlp(), sparsity=0.9, total_steps=20).step(optimizer)


@pytest.mark.parametrize("case", ["spread", "polarised", "tied at the threshold", "few positive", "all tied"])
def test_top_k_is_the_global_top_k_of_maskops_exactly(case):
    """vrpg's faster selection gives exactly ``maskops.global_topk_masks``'s masks (the count, the ties)."""
    from sparsetrain.maskops import global_topk_masks

    model, _, sparsifier = make()
    g = torch.Generator().manual_seed(5)
    for name, s in sparsifier.s.items():
        n = s.numel()
        values = {
            "spread": torch.rand(n, generator=g),
            "polarised": (torch.rand(n, generator=g) < 0.4) * torch.rand(n, generator=g).mul(1.5).clamp(0.2, 1),
            "tied at the threshold": (torch.rand(n, generator=g) < 0.5) * 0.5,
            "few positive": (torch.rand(n, generator=g) < 0.1) * torch.rand(n, generator=g),
            "all tied": torch.full((n,), 0.25),
        }[case]
        sparsifier.s[name] = values.view(s.shape).float()
    got, want = sparsifier.top_k(), global_topk_masks(sparsifier.s, 0.75)
    assert all(torch.equal(got[n], want[n]) and got[n].shape == sparsifier.s[n].shape for n in want)
    assert sum(int(m.sum()) for m in got.values()) == keep_count(sum(s.numel() for s in sparsifier.s.values()), 0.75)


# ------------------------------------------------------------------------------------------ channel granularity
def test_channel_granularity_learns_one_score_per_output_unit_under_a_channel_budget():
    """'channel': scores of shape (out, 1), a budget of round((1 - s) * channels), and each sampled or top-k mask
    keeps or drops whole rows; the step is the same sparse chain rule and projected estimate, per channel."""
    model, optimizer, sparsifier = make(granularity="channel", score_optimizer="sgd", score_lr=0.05)
    assert {n: tuple(s.shape) for n, s in sparsifier.s.items()} == {"0.weight": (8, 1), "2.weight": (3, 1)}
    assert sparsifier.budget == keep_count(8 + 3, 0.75) == 3
    latent = sparsifier.latent_weights()
    s0 = {n: s.clone() for n, s in sparsifier.s.items()}
    m1, m2 = sparsifier.sample(0)
    x, y = batch(0)
    losses, grads = masked_passes(model, latent, (m1, m2), x, y)  # channel masks broadcast over rows
    step(model, optimizer, 0)
    after = sparsifier.latent_weights()
    for name, w in latent.items():
        torch.testing.assert_close(after[name], w - 0.1 * (grads[0][name] + grads[1][name]) / 2, rtol=0, atol=1e-6)
    stepped = [s0[n] - 0.05 * vrpg_gradient(losses[0], losses[1], m1[n], m2[n], s0[n]) for n in s0]
    for got, want in zip(sparsifier.s.values(), project_scores(stepped, sparsifier.budget)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for i in range(1, 6):
        step(model, optimizer, i)
        top = sparsifier.top_k()
        assert sum(int(m.sum()) for m in top.values()) == 3  # exactly k channels
        for name, p in sparsifier.params.items():
            mask = sparsifier.masks[name]
            assert mask.shape == p.shape and torch.equal(mask, top[name].expand(p.shape))  # whole rows
            assert torch.all(p.detach()[~mask] == 0)


def test_channel_granularity_fixes_whole_rows_at_end_and_resumes_bit_identically(tmp_path):
    model, optimizer, sparsifier = make(total=12, unit="steps", end=6, momentum=0.9, granularity="channel")
    for i in range(4):
        step(model, optimizer, i)
    torch.save({"m": model.state_dict(), "o": optimizer.state_dict(), "s": sparsifier.state_dict()}, tmp_path / "c")
    for i in range(4, 12):
        step(model, optimizer, i)
    assert sparsifier.phase == "sparse"
    rows = {n: m.all(dim=1) for n, m in sparsifier.masks.items()}
    assert all(torch.equal(m, rows[n][:, None].expand_as(m)) for n, m in sparsifier.masks.items())
    assert sum(int(r.sum()) for r in rows.values()) == 3
    saved = torch.load(tmp_path / "c", weights_only=True)
    model2, optimizer2, sparsifier2 = make(total=12, unit="steps", end=6, momentum=0.9, granularity="channel",
                                           seed=7)  # fmt: skip
    model2.load_state_dict(saved["m"])
    optimizer2.load_state_dict(saved["o"])
    sparsifier2.load_state_dict(saved["s"])
    for i in range(4, 12):
        step(model2, optimizer2, i)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    # A per-weight state does not load into a per-channel sparsifier: the shapes say which was saved.
    _, _, weighted = make(total=12, unit="steps", end=6)
    with pytest.raises(ValueError, match=r"scores of '0.weight' have shape \(8, 6\), expected \(8, 1\)"):
        sparsifier2.load_state_dict(weighted.state_dict())


# ------------------------------------------------------------------------------------------ score schedule
def test_cosine_score_schedule_decays_the_score_step_to_zero_at_end():
    """'cosine': the score step at step t is score_lr * (1 + cos(pi t / end)) / 2, applied by update_scores."""
    model, optimizer, sparsifier = make(total=12, unit="steps", end=10, score_optimizer="sgd", score_lr=0.05,
                                        score_schedule="cosine")  # fmt: skip
    assert [sparsifier.score_lr_at(t) for t in (0, 5, 10, 11)] == pytest.approx([0.05, 0.025, 0.0, 0.0])
    _, _, constant = make(total=12, unit="steps", end=10, score_lr=0.05)
    assert constant.score_lr_at(7) == 0.05
    for i in range(4):
        step(model, optimizer, i)
    assert sparsifier.count == 4
    s0 = {n: s.clone() for n, s in sparsifier.s.items()}
    m1, m2 = sparsifier.sample(4)
    sparsifier.update_scores(1.0, 0.25, m1, m2)
    lr = 0.05 * (1 + math.cos(math.pi * 4 / 10)) / 2
    stepped = [s0[n] - lr * vrpg_gradient(1.0, 0.25, m1[n], m2[n], s0[n]) for n in s0]
    for got, want in zip(sparsifier.s.values(), project_scores(stepped, sparsifier.budget)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    full = project_scores([s0[n] - 0.05 * vrpg_gradient(1.0, 0.25, m1[n], m2[n], s0[n]) for n in s0],
                          sparsifier.budget)  # fmt: skip
    assert any(not torch.allclose(a, b) for a, b in zip(sparsifier.s.values(), full))  # the decay is visible
