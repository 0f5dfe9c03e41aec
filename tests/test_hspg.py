"""HSPG (Only Train Once, Chen et al. NeurIPS 2021) on hand-worked problems: proximal, subgradient and half-space
steps by hand, groups spanning two parameters, the group-sparsity cap, and an exact state_dict round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.shared import roundtrip

from sparsetrain.optim import HSPG


def two_param_groups():
    """4 groups: row g of W (4x2) together with b[g]."""
    W = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.1, 0.2], [1.0, 1.0], [0.0, 0.05]]))
    b = torch.nn.Parameter(torch.tensor([4.0, 0.1, 1.0, 0.0]))
    return W, b


def test_prox_step_is_the_exact_group_lasso_proximal_operator():
    W, b = two_param_groups()
    lr, lam = 0.5, 1.0
    W.grad = torch.full_like(W, 0.2)
    b.grad = torch.full_like(b, -0.2)
    opt = HSPG([W, b], lr=lr, lam=lam, n_p=10, stage1="prox", groups=[[(W, 0, 1), (b, 0, 1)]])
    z = torch.cat([W.detach() - lr * W.grad, (b.detach() - lr * b.grad)[:, None]], dim=1)
    opt.step()
    norms = z.norm(dim=1)
    expected = z * torch.clamp(1 - lr * lam / norms, min=0)[:, None]
    # group 0: ||z|| = ||(2.9, -0.1, 4.1)|| ~ 5.02 -> shrunk by 0.5; group 1: ||z|| ~ 0.33 < 0.5 -> exactly 0
    got = torch.cat([W.detach(), b.detach()[:, None]], dim=1)
    assert torch.allclose(got, expected, atol=1e-7, rtol=0)
    assert torch.all(got[1] == 0) and not torch.signbit(got[1]).any()
    assert got[0].norm() == pytest.approx(float(norms[0]) - lr * lam, abs=1e-6)


def test_subgradient_step_by_hand():
    W, b = two_param_groups()
    W.grad, b.grad = torch.zeros_like(W), torch.zeros_like(b)
    opt = HSPG([W, b], lr=0.1, lam=2.0, n_p=10, groups=[[(W, 0, 1), (b, 0, 1)]])
    x = torch.cat([W.detach(), b.detach()[:, None]], dim=1)
    opt.step()
    norms = x.norm(dim=1)
    expected = x - 0.1 * 2.0 * torch.where(norms[:, None] > 0, x / norms[:, None], 0)
    assert torch.allclose(torch.cat([W.detach(), b.detach()[:, None]], dim=1), expected, atol=1e-7, rtol=0)


def test_half_space_step_projects_exactly_the_groups_whose_trial_point_leaves_the_half_space():
    x = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
    opt = HSPG([x], lr=1.0, lam=0.0, epsilon=0.0, n_p=0, groups=[[(x, 0, 1)]])
    # trial = x - grad: group 0 -> (-0.1, 0.5): t.x = -0.1 < 0 -> zero; group 1 -> (0.1, 5): t.x = 0.1 >= 0 -> kept;
    # group 2 -> (0.5, 0.5): kept; group 3 is zero and stays zero whatever its gradient.
    x.grad = torch.tensor([[1.1, -0.5], [0.9, -5.0], [0.5, 0.5], [-3.0, 2.0]])
    opt.step()
    assert torch.allclose(x.detach(), torch.tensor([[0.0, 0.0], [0.1, 5.0], [0.5, 0.5], [0.0, 0.0]]), atol=1e-6)
    assert torch.all(x[0] == 0) and torch.all(x[3] == 0) and torch.all(x[1:3] != 0)
    # With epsilon = 0.2 group 1 (t.x = 0.1 < 0.2 ||x||^2 = 0.2) goes too.
    y = torch.nn.Parameter(torch.tensor([[1.0, 0.0]]))
    y.grad = torch.tensor([[0.9, -5.0]])
    HSPG([y], lr=1.0, lam=0.0, epsilon=0.2, groups=[[(y, 0, 1)]]).step()
    assert torch.all(y == 0)


def test_hspg_finds_the_zero_groups_of_a_hand_made_problem():
    """min 0.5 ||x - a||^2 + lam sum_g ||x_g||: groups with ||a_g|| <= lam are 0 at the optimum, the others not.

    A group spans a weight row (dim 0 of W) and a column of V (dim 1), so the set crosses two parameters.
    """
    torch.manual_seed(0)
    a_W = torch.tensor([[2.0, 1.0], [0.05, 0.0], [0.0, -1.5], [0.02, 0.03], [1.0, 1.0], [0.0, 0.01]])
    a_V = torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0, 0.04]])
    W = torch.nn.Parameter(torch.randn(6, 2))
    V = torch.nn.Parameter(torch.randn(1, 6))
    lam = 0.3
    opt = HSPG([W, V], lr=0.1, lam=lam, epsilon=0.0, n_p=50, groups=[[(W, 0, 1), (V, 1, 1)]])
    for _ in range(200):
        opt.zero_grad()
        loss = 0.5 * ((W - a_W).square().sum() + (V - a_V).square().sum())
        loss.backward()
        opt.step()
    rows = torch.cat([W.detach(), V.detach().T], dim=1)
    zero = (rows == 0).all(dim=1)
    assert zero.tolist() == [False, True, False, True, False, True]
    # the survivors sit at the optimum a_g (1 - lam / ||a_g||)
    a = torch.cat([a_W, a_V.T], dim=1)
    for g in (0, 2, 4):
        assert torch.allclose(rows[g], a[g] * (1 - lam / a[g].norm()), atol=1e-4)


def test_cap_on_zero_groups_keeps_the_deepest_candidates():
    x = torch.nn.Parameter(torch.ones(4, 1))
    x.grad = torch.tensor([[1.5], [3.0], [1.2], [0.5]])  # t.x = -0.5, -2, -0.2, 0.5: three candidates
    opt = HSPG([x], lr=1.0, lam=0.0, groups=[[(x, 0, 1)]], max_zero_groups=[2])
    opt.step()
    assert x.detach().squeeze(1).tolist() == [0.0, 0.0, pytest.approx(-0.2), 0.5]  # the two deepest: 1 and 0
    y = torch.nn.Parameter(torch.ones(2, 1))
    z = torch.nn.Parameter(torch.ones(3, 1))
    y.grad, z.grad = torch.tensor([[2.0], [3.0]]), torch.tensor([[1.5], [1.1], [0.0]])
    HSPG([y, z], lr=1.0, lam=0.0, groups=[[(y, 0, 1)], [(z, 0, 1)]], max_zero_groups=2).step()
    # global cap 2: y keeps one group alive (only group 1 of y may go), then z's deepest (group 0)
    assert y.detach().squeeze(1).tolist() == [-1.0, 0.0]
    assert z.detach().squeeze(1).tolist() == [0.0, pytest.approx(-0.1), 1.0]


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(12)]

    def make(m):
        groups = [[(m[0].weight, 0, 1), (m[0].bias, 0, 1)]]
        return HSPG(m.parameters(), lr=0.2, lam=0.05, epsilon=0.1, n_p=4, momentum=0.9, weight_decay=1e-3,
                    groups=groups)  # fmt: skip

    def run(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    opt = make(model)
    run(model, opt, data[:5])
    saved = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    run(model, opt, data[5:])
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    opt2 = make(other)
    other.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["step"] == 5
    run(other, opt2, data[5:])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "option, value", [("lr", -1.0), ("lam", -0.1), ("epsilon", 1.0), ("momentum", 1.0), ("n_p", -1), ("stage1", "x")]
)
def test_bad_options_are_refused_by_name(option, value):
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=option):
        HSPG([p], **{"lr": 0.1, option: value})


def test_a_group_member_outside_the_params_is_refused():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="not among"):
        HSPG([p], lr=0.1, groups=[[(q, 0, 1)]])


# ---------------------------------------------------------------------------------------------- DHSPG (OTOv2)
A_W = torch.tensor([[2.0, 1.0], [0.3, 0.0], [0.0, -1.5], [0.2, 0.2], [1.0, 1.0], [0.0, 0.3]])
A_V = torch.tensor([[1.0, 0.0, 0.5, 0.0, 0.0, 0.1]])


def dhspg_problem(lam=0.01, momentum=0.0, n_p=5, n_end=20, cap=(3,)):
    """0.5 ||x - a||^2 over 6 groups (a row of W with a column of V); groups 1, 3, 5 have small targets a_g
    (norms 0.3), which the gradient defends against the penalty: only an adaptive lambda takes them to zero."""
    # The small groups start above their targets (the gradient points along them), the large ones below.
    start = torch.tensor([0.8, 1.5, 0.8, 1.5, 0.8, 1.5])
    W = torch.nn.Parameter(A_W * start[:, None])
    V = torch.nn.Parameter(A_V * start)
    opt = HSPG([W, V], lr=0.1, lam=lam, momentum=momentum, n_p=n_p, groups=[[(W, 0, 1), (V, 1, 1)]],
               max_zero_groups=list(cap), variant="dhspg", n_end=n_end)  # fmt: skip
    return W, V, opt


def quadratic_step(W, V, opt):
    opt.zero_grad()
    (0.5 * ((W - A_W).square().sum() + (V - A_V).square().sum())).backward()
    opt.step()


def group_rows(W, V):
    return torch.cat([W.detach(), V.detach().T], dim=1)


def test_dhspg_zeroes_exactly_the_redundant_groups_by_the_end_of_the_stage():
    W, V, opt = dhspg_problem()
    # A plain momentum-SGD copy: the loss is separable by group, so important groups must follow it exactly.
    W_sgd, V_sgd = (torch.nn.Parameter(t.detach().clone()) for t in (W, V))
    sgd = torch.optim.SGD([W_sgd, V_sgd], lr=0.1)
    norms = []
    for step in range(30):
        quadratic_step(W, V, opt)
        quadratic_step(W_sgd, V_sgd, sgd)
        rows = group_rows(W, V)
        norms.append(rows.norm(dim=1))
        if step < 5:  # warm-up: no partition, no penalty, every group is the SGD copy's
            assert opt.redundant is None
            assert torch.allclose(rows, group_rows(W_sgd, V_sgd), atol=1e-6, rtol=0)
        else:
            assert opt.redundant[0].tolist() == [False, True, False, True, False, True]  # the 3 small targets
        if step < 18:  # the gradient holds them off zero until the adaptive penalty takes them there
            assert torch.all(rows.norm(dim=1) > 0)
    important, redundant = [0, 2, 4], [1, 3, 5]
    rows = group_rows(W, V)
    # the target count exactly: the redundant groups are exactly zero (+0.0), the important ones are not
    assert torch.all(rows[redundant] == 0) and not torch.signbit(rows[redundant]).any()
    assert torch.all(rows[important].norm(dim=1) > 0.5)
    # the redundant groups were zero by the stage's last step (step index 19), and stayed zero
    assert all(torch.all(n[redundant] == 0) for n in norms[19:])
    # ...gradually: each step from the partition on shrinks them (the gradient alone would keep them at 0.3)
    shrinking = torch.stack(norms[4:20])[:, redundant]
    assert torch.all(shrinking[1:] < shrinking[:-1])
    # important groups never felt the penalty
    assert torch.allclose(rows[important], group_rows(W_sgd, V_sgd)[important], atol=1e-6, rtol=0)
    assert opt.group_sparsity() == 0.5


def test_dhspg_redundant_groups_fade_cubically_along_themselves():
    # No gradient at all: the penalty alone takes a redundant group's norm to ((r - 1) / r)^3 of itself each step
    # (r steps left), i.e. from ||x|| at n_p as (1 - progress)^3 to 0 at n_end; important groups do not move.
    x = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]]))
    opt = HSPG([x], lr=0.1, lam=0.0, n_p=2, n_end=7, groups=[[(x, 0, 1)]], max_zero_groups=[1], variant="dhspg")
    seen = []
    for _ in range(9):
        x.grad = torch.zeros_like(x)
        opt.step()
        seen.append(x.detach().norm(dim=1).tolist())
    assert opt.redundant[0].tolist() == [False, True, False]  # the smallest group
    expected = [0.5, 0.5, 0.5 * 0.8**3, 0.5 * 0.6**3, 0.5 * 0.4**3, 0.5 * 0.2**3, 0.0, 0.0, 0.0]
    assert [s[1] for s in seen] == pytest.approx(expected, abs=1e-6)
    assert all(s[0] == pytest.approx(5.0) and s[2] == pytest.approx(10.0) for s in seen)


def test_dhspg_global_target_counts_over_all_sets_and_keeps_one_group_per_set():
    y = torch.nn.Parameter(torch.tensor([[0.1], [0.2]]))
    z = torch.nn.Parameter(torch.tensor([[0.3], [5.0], [4.0]]))
    opt = HSPG([y, z], lr=0.1, lam=0.0, n_p=0, n_end=3, groups=[[(y, 0, 1)], [(z, 0, 1)]], max_zero_groups=2,
               variant="dhspg")  # fmt: skip
    for _ in range(3):
        y.grad, z.grad = torch.zeros_like(y), torch.zeros_like(z)
        opt.step()
    # the two smallest groups are y's, but y keeps one: y[0] and z[0] go
    assert [r.tolist() for r in opt.redundant] == [[True, False], [True, False, False]]
    assert y.detach().squeeze(1).tolist() == [0.0, pytest.approx(0.2)]
    assert z.detach().squeeze(1).tolist() == [0.0, 5.0, 4.0]


def test_dhspg_state_dict_keeps_the_partition():
    W, V, opt = dhspg_problem()
    for _ in range(8):
        quadratic_step(W, V, opt)
    saved = roundtrip({"W": W.detach().clone(), "V": V.detach().clone(), "opt": opt.state_dict()})
    for _ in range(15):
        quadratic_step(W, V, opt)
    W2, V2, opt2 = dhspg_problem(n_p=5)
    with torch.no_grad():
        W2.copy_(saved["W"])
        V2.copy_(saved["V"])
    opt2.load_state_dict(saved["opt"])
    assert [r.tolist() for r in opt2.redundant] == [r.tolist() for r in opt.redundant]
    for _ in range(15):
        quadratic_step(W2, V2, opt2)
    assert torch.equal(W, W2) and torch.equal(V, V2)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(variant="otov3"), "variant"),
        (dict(variant="dhspg", n_end=10), "max_zero_groups"),
        (dict(variant="dhspg", max_zero_groups=[1], n_p=5, n_end=5), "n_end"),
        (dict(variant="dhspg", max_zero_groups=[1]), "n_end"),
    ],
)
def test_dhspg_bad_options_are_refused(options, match):
    p = torch.nn.Parameter(torch.ones(2, 1))
    with pytest.raises(ValueError, match=match):
        HSPG([p], lr=0.1, groups=[[(p, 0, 1)]], **options)


# ------------------------------------------------------------------------------- DHSPG pruning periods
# W and V of dhspg_problem(momentum=0.9) after steps 12 (redundant groups half faded) and 24 (after the stage), as
# the one-partition DHSPG (before pruning periods existed) computed them: periods=1 must reproduce them bit for bit.
ONE_PARTITION = {
    12: (["0x1.0d0a96p+1", "0x1.0d0a96p+0", "0x1.ec3f38p-6", "0x0p+0", "0x0p+0", "-0x1.938fe4p+0", "0x1.482a18p-6",
          "0x1.482a18p-6", "0x1.0d0a96p+0", "0x1.0d0a96p+0", "0x0p+0", "0x1.ec3f38p-6"],
         ["0x1.0d0a96p+0", "0x0p+0", "0x1.0d0a96p-1", "0x0p+0", "0x0p+0", "0x1.482a18p-7"]),
    24: (["0x1.02968p+1", "0x1.02968p+0", "0x0p+0", "0x0p+0", "0x0p+0", "-0x1.83e1bep+0", "0x0p+0", "0x0p+0",
          "0x1.02968p+0", "0x1.02968p+0", "0x0p+0", "0x0p+0"],
         ["0x1.02968p+0", "0x0p+0", "0x1.02968p-1", "0x0p+0", "0x0p+0", "0x0p+0"]),
}  # fmt: skip


def test_dhspg_one_period_is_the_one_partition_dhspg_bit_for_bit():
    W, V, opt = dhspg_problem(momentum=0.9)
    assert opt.periods == 1  # the optimizer's default
    for step in range(25):
        quadratic_step(W, V, opt)
        if step in ONE_PARTITION:
            w, v = (torch.tensor([float.fromhex(h) for h in values]) for values in ONE_PARTITION[step])
            assert torch.equal(W.detach().flatten(), w) and torch.equal(V.detach().flatten(), v), step


def shrinking_problem(periods):
    """4 groups of norms 0.5, 1, 2, 3: with no gradient the two smallest (0 and 1) are the most salient, but the
    loss pulls group 3 towards 0.2 during the first period, after the first partition (steps 3 to 6)."""
    x = torch.nn.Parameter(torch.tensor([[0.3, 0.4], [0.6, 0.8], [1.2, 1.6], [1.8, 2.4]]))
    opt = HSPG([x], lr=0.5, lam=0.0, n_p=2, n_end=12, groups=[[(x, 0, 1)]], max_zero_groups=[2], variant="dhspg",
               periods=periods)  # fmt: skip
    return x, opt


def shrinking_step(x, opt, step):
    x.grad = torch.zeros_like(x)
    if 3 <= step < 7:
        with torch.no_grad():
            x.grad[3] = x[3] - torch.tensor([0.12, 0.16])
    opt.step()


def test_dhspg_later_periods_choose_by_the_saliency_at_their_start():
    x, opt = shrinking_problem(periods=2)  # periods [2, 7) and [7, 12), one group each
    norms = []
    for step in range(14):
        shrinking_step(x, opt, step)
        norms.append(x.detach().norm(dim=1))
        if 2 <= step < 7:  # the first period: the smallest group, chosen at step 2
            assert opt.redundant[0].tolist() == [True, False, False, False] and opt.period == 1
        if step >= 7:  # the second: group 3, by then the smallest of the others (group 1 was smaller at step 2)
            assert opt.redundant[0].tolist() == [True, False, False, True] and opt.period == 2
            assert opt.active[0].tolist() == [False, False, False, True]
    assert all(n[0] == 0 for n in norms[6:])  # zero by its period's last step (6), and stays zero
    assert all(n[3] > 0 for n in norms[:11]) and all(n[3] == 0 for n in norms[11:])  # by the stage's last step
    assert norms[-1][1] == pytest.approx(1.0) and norms[-1][2] == pytest.approx(2.0)  # important: untouched
    assert opt.group_sparsity() == 0.5
    # One partition at step 2 takes the two smallest groups then, and keeps them.
    x1, opt1 = shrinking_problem(periods=1)
    for step in range(14):
        shrinking_step(x1, opt1, step)
    assert opt1.redundant[0].tolist() == [True, True, False, False]
    assert (x1.detach().norm(dim=1) == 0).tolist() == [True, True, False, False]


@pytest.mark.parametrize("cap", [[3], 3])
def test_dhspg_periods_reach_the_target_in_shares(cap):
    # 6 groups, target 3 over 3 periods of 5 steps from step 5: 1, 2, 3 zero groups by steps 9, 14, 19.
    W, V, opt = dhspg_problem(momentum=0.9)
    opt = HSPG([W, V], lr=0.1, lam=0.01, momentum=0.9, n_p=5, groups=[[(W, 0, 1), (V, 1, 1)]], max_zero_groups=cap,
               variant="dhspg", n_end=20, periods=3)  # fmt: skip
    zeros = []
    for _ in range(25):
        quadratic_step(W, V, opt)
        zeros.append(int((group_rows(W, V).norm(dim=1) == 0).sum()))
    assert zeros[4] == 0 and zeros[9] == 1 and zeros[14] == 2 and zeros[19:] == [3] * 6
    assert [int(opt.redundant[0].sum()), opt.period] == [3, 3]
    assert torch.equal(group_rows(W, V).norm(dim=1) == 0, opt.redundant[0])


def test_dhspg_state_dict_round_trip_across_a_period_boundary():
    def problem():
        W, V, _ = dhspg_problem()
        opt = HSPG([W, V], lr=0.1, lam=0.01, momentum=0.9, n_p=5, groups=[[(W, 0, 1), (V, 1, 1)]],
                   max_zero_groups=[3], variant="dhspg", n_end=20, periods=3)  # fmt: skip
        return W, V, opt

    W, V, opt = problem()
    for _ in range(10):  # the next step (10) starts the second period
        quadratic_step(W, V, opt)
    saved = roundtrip({"W": W.detach().clone(), "V": V.detach().clone(), "opt": opt.state_dict()})
    for _ in range(15):
        quadratic_step(W, V, opt)
    W2, V2, opt2 = problem()
    with torch.no_grad():
        W2.copy_(saved["W"])
        V2.copy_(saved["V"])
    opt2.load_state_dict(saved["opt"])
    for _ in range(15):
        quadratic_step(W2, V2, opt2)
    assert torch.equal(W, W2) and torch.equal(V, V2)
    assert [opt2.redundant[0].tolist(), opt2.active[0].tolist(), opt2.period] == [
        opt.redundant[0].tolist(), opt.active[0].tolist(), opt.period]  # fmt: skip
    # A state saved with other periods is refused.
    W3, V3, opt3 = dhspg_problem()
    with pytest.raises(ValueError, match="periods=3"):
        opt3.load_state_dict(saved["opt"])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(variant="dhspg", max_zero_groups=[1], n_p=5, n_end=10, periods=0), "periods must be an integer"),
        (dict(variant="dhspg", max_zero_groups=[1], n_p=5, n_end=10, periods=True), "periods must be an integer"),
        (dict(variant="dhspg", max_zero_groups=[1], n_p=5, n_end=10, periods=6), r"n_end - n_p = 5"),
        (dict(periods=2), "variant 'dhspg' only"),
    ],
)
def test_bad_periods_are_refused(options, match):
    p = torch.nn.Parameter(torch.ones(2, 1))
    with pytest.raises(ValueError, match=match):
        HSPG([p], lr=0.1, groups=[[(p, 0, 1)]], **options)


@pytest.mark.parametrize("partition", [[[1, 3, 9]], [[1, "3"]], [[-1]]])
def test_dhspg_refuses_a_saved_partition_that_names_no_group(partition):
    W, V, opt = dhspg_problem()
    for _ in range(6):
        quadratic_step(W, V, opt)
    state = opt.state_dict()
    state["redundant"] = state["active"] = partition
    _, _, fresh = dhspg_problem()
    with pytest.raises(ValueError, match=r"partition of group set 0 .* in \[0, 6\)"):
        fresh.load_state_dict(state)
