"""The ``variational`` method: the KL term by hand, gates that remove groups during training, the slim model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import sparsetrain
from sparsetrain.structured import slim


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_kl_term_by_hand():
    torch.manual_seed(0)
    model = mlp()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, prior_keep=0.3, gate_init=0.8,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    W, b = model[0].weight.detach(), model[0].bias.detach()
    var_w, var_b = float(W.square().mean()), float(b.square().mean())
    theta, pi = 0.8, 0.3
    expected = 0.0
    for g in range(3):
        scaled = float(W[g].square().sum()) / var_w + float(b[g] ** 2) / var_b
        bern = theta * math.log(theta / pi) + (1 - theta) * math.log((1 - theta) / (1 - pi))
        expected += theta * scaled / 2 + bern
    assert float(s.kl().detach()) == pytest.approx(expected, rel=1e-5)


def test_gates_remove_groups_during_training_and_the_slim_model_matches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=60, unit="steps", finish=50,
                           num_samples=20, prior_keep=0.05, gate_init=0.5, threshold=0.4, gate_lr=0.2,
                           kl_warmup=0,
                           example_input=torch.zeros(1, 8))  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    s.attach(optimizer)
    first_removal = None
    for step in range(60):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if first_removal is None and s.support_version > 0:
            first_removal = s.count
            assert 0 < s.group_sparsity() <= 0.5 and s.mask_version == 0
            theta = s.theta()[0]
            masked = ~s._active_groups(s.channel_groups.sets[0])
            assert torch.all(theta[masked] < 0.4) and int(masked.sum()) <= 8  # never more than the target
            # more gates under the threshold than the target allows: the lowest theta go first
            if int((theta < 0.4).sum()) > int(masked.sum()) > 0:
                assert theta[masked].max() <= theta[~masked].min()
            assert torch.all(model[0].weight[masked] == 0) and torch.all(model[2].weight[:, masked] == 0)
    assert first_removal is not None and first_removal < 50, "no gate fell under the threshold before finish"
    assert s.mask_version == 1 and s.group_sparsity() == 0.5 and not s._handles  # gates gone after the prune
    model.eval()
    small = slim(model, torch.zeros(1, 8))
    assert small[0].out_features == small[2].out_features == 8
    x = torch.randn(64, 8)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5


def test_a_plain_optimizer_is_refused_and_step_needs_attach():
    model = mlp()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4))
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="wrap_optimizer"):
        s.attach(plain)
    with pytest.raises(RuntimeError, match="attach"):
        s.step(plain)


@pytest.mark.parametrize("option", ["threshold", "gate_init", "num_samples", "temperature"])
def test_bad_options_are_refused_by_name(option):
    with pytest.raises(ValueError, match=option):
        sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4),
                           **{option: -1})  # fmt: skip


def test_the_gate_step_size_survives_the_trainer_rewriting_every_groups_lr():
    # The trainer writes the scheduled lr into every param group before each step; the gates keep their own scale.
    torch.manual_seed(0)
    model = mlp()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, gate_lr=0.0,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    s.attach(optimizer)
    before = [p.detach().clone() for p in s.logits]
    for _ in range(3):
        for group in optimizer.param_groups:
            group["lr"] = 0.1
        optimizer.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(s.logits, before))


def test_the_gates_take_the_natural_gradient_step_of_the_elbo():
    # With no data gradient, one step moves each logit towards logit(pi) - keep cost at rate gate_lr:
    # logit -= gate_lr * dKL/dtheta = gate_lr * (logit - logit(pi) + |w_g / s|^2 / 2), whatever num_samples.
    torch.manual_seed(0)
    model = mlp()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, prior_keep=0.3, gate_init=0.8,
                           gate_lr=0.1, kl_warmup=0, num_samples=50000,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    # lr 1e-30: the weights stay put (the gates step at gate_lr whenever the run trains at all)
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-30, momentum=0.9))
    s.attach(optimizer)
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    cost = W.square().sum(1) / W.square().mean() / 2 + b.square() / b.square().mean() / 2
    logit = math.log(0.8 / 0.2)
    optimizer.zero_grad()
    (0.0 * model(torch.randn(8, 4)).sum()).backward()
    optimizer.step()
    expected = logit - 0.1 * (logit - math.log(0.3 / 0.7) + cost)
    assert torch.allclose(s.logits[0].detach(), expected, atol=1e-4)


def test_the_kl_weight_warms_up_and_a_bad_warmup_is_refused():
    s = sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=100, unit="steps", kl_warmup=40,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    assert s.kl_weight(0) == pytest.approx(1 / 40) and s.kl_weight(19) == pytest.approx(0.5)
    assert s.kl_weight(39) == s.kl_weight(90) == 1.0
    with pytest.raises(ValueError, match="kl_warmup"):
        sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=100, unit="steps", kl_warmup=500,
                           example_input=torch.zeros(1, 4))  # fmt: skip


def test_a_set_at_its_target_loses_its_gates_and_its_logits_stop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=100, unit="steps", kl_warmup=0,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
    s.attach(optimizer)
    with torch.no_grad():
        s.logits[0][:5] = -20.0  # five gates of the first set closed: the target allows four
    x = torch.randn(16, 4)

    def step() -> None:
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()

    step()
    assert s.settled()[0] and not s.settled()[1]
    masked = ~s._active_groups(s.channel_groups.sets[0])
    assert int(masked.sum()) == 4 and bool(masked[:5].sum() == 4)
    before = s.logits[0].detach().clone()
    step()
    assert torch.equal(s.logits[0].detach(), before)
    # In training, the first set's outputs pass ungated (z = 1); the second set's are still gated.
    model.train()
    hidden = model[0](x)
    assert torch.equal(hidden, nn.functional.linear(x, model[0].weight, model[0].bias))


def test_the_prune_to_target_ranks_by_theta_times_the_group_rms():
    torch.manual_seed(0)
    model = mlp()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4))
    with torch.no_grad():
        s.logits[0].copy_(torch.tensor([3.0, 0.0, -3.0]))
    W, b, W2 = model[0].weight.detach(), model[0].bias.detach(), model[2].weight.detach()
    rms = ((W.square().sum(1) + b.square() + W2.square().sum(0)) / (4 + 1 + 2)).sqrt()
    expected = torch.sigmoid(torch.tensor([3.0, 0.0, -3.0])) * rms
    assert torch.allclose(s.group_scores(s.magnitude_scores())[0], expected, atol=1e-6)


def test_the_empirical_slab_is_the_elbos_maximiser_in_s_and_the_kl_carries_its_normaliser():
    torch.manual_seed(0)
    model = mlp()
    logits = torch.tensor([2.0, -1.0, 0.5])
    for nu in (0.0, 0.5):
        s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, prior_keep=0.3, slab="empirical",
                               slab_prior_weight=nu, example_input=torch.zeros(1, 4))  # fmt: skip
        with torch.no_grad():
            s.logits[0].copy_(logits)
            model[0].weight.mul_(torch.tensor([[3.0], [0.5], [1.0]]))  # the weights moved away from their init
        theta = torch.sigmoid(logits).double()
        W, b = model[0].weight.detach().double(), model[0].bias.detach().double()
        (_, _, w0), (_, _, b0) = s.slab0[0]
        s.update_slab()
        (_, _, var_w), (_, _, var_b) = s.slab[0]
        # (nu n v0 + sum_g theta_g |w_g|^2) / (nu n + sum_g theta_g |g|): 4 weights per unit in W (n = 12), 1 in b
        squares_w = (theta * W.square().sum(1)).sum()
        assert var_w == pytest.approx(float((nu * 12 * w0 + squares_w) / (nu * 12 + 4 * theta.sum())))
        assert var_b == pytest.approx(float((nu * 3 * b0 + (theta * b.square()).sum()) / (nu * 3 + theta.sum())))

        # It maximises the ELBO's terms in v (with the inverse-Gamma hyper-prior a + 1 = nu n / 2, b = nu n v0 / 2).
        def elbo_in_v(v: float, squares: Tensor, size: int, v0: float, theta: Tensor = theta, nu: float = nu) -> float:
            slab = -(theta * (squares / (2 * v) + size * math.log(v) / 2)).sum()
            n = 3 * size
            return float(slab - (nu * n / 2) * math.log(v) - nu * n * v0 / 2 / v)

        for v, squares, size, v0 in ((var_w, W.square().sum(1), 4, w0), (var_b, b.square(), 1, b0)):
            best = elbo_in_v(v, squares, size, v0)
            assert best > elbo_in_v(v * 1.01, squares, size, v0) and best > elbo_in_v(v * 0.99, squares, size, v0)

        # The KL by hand: theta (|w / s|^2 / 2 + |g| log(s / s0)) + the Bernoulli's KL, per group.
        expected = 0.0
        for g in range(3):
            t = float(theta[g])
            keep = float(W[g].square().sum()) / var_w / 2 + float(b[g] ** 2) / var_b / 2
            keep += 4 * 0.5 * math.log(var_w / w0) + 0.5 * math.log(var_b / b0)
            expected += t * keep + t * math.log(t / 0.3) + (1 - t) * math.log((1 - t) / 0.7)
        assert float(s.kl().detach()) == pytest.approx(expected, rel=1e-5)


def test_the_empirical_slab_is_estimated_before_each_step_and_fixed_stays_put():
    torch.manual_seed(0)
    model = mlp()
    fixed = sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4))
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, slab="empirical", gate_lr=0.0,
                           example_input=torch.zeros(1, 4))  # fmt: skip
    assert fixed.slab_mode == "fixed"  # the default
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=1e-30))  # the weights stay put
    s.attach(optimizer)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    theta = s.theta()[0].double()
    optimizer.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    W = model[0].weight.detach().double()
    expected = float((theta * W.square().sum(1)).sum() / (4 * theta.sum()))
    assert s.slab[0][0][2] == pytest.approx(expected) and s.slab0[0][0][2] == pytest.approx(expected / 4, rel=1e-5)


def test_a_bad_slab_is_refused_with_the_modes_allowed():
    with pytest.raises(ValueError, match=r"slab must be one of 'fixed', 'empirical', got 'learned'"):
        sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4),
                           slab="learned")  # fmt: skip
    with pytest.raises(ValueError, match="slab_prior_weight"):
        sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4),
                           slab="empirical", slab_prior_weight=-1.0)  # fmt: skip


def _conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 4))  # fmt: skip


def _build(seed: int, **options) -> tuple[nn.Module, torch.optim.Optimizer, sparsetrain.Sparsifier]:
    torch.manual_seed(seed)
    model = _conv_bn()
    s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=30, unit="steps", finish=20,
                           threshold=0.45, gate_init=0.5, num_samples=10, prior_keep=0.05, gate_lr=0.05,
                           example_input=torch.zeros(1, 2, 8, 8), **options)  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
    s.attach(optimizer)
    return model, optimizer, s


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 2, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("nu", [0.0, 1.0])
def test_resume_with_the_empirical_slab_is_bit_identical(nu):
    from helpers.shared import roundtrip

    split = 10
    model, optimizer, s = _build(0, slab="empirical", slab_prior_weight=nu)
    for step in range(30):
        if step == split:
            saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "sparsifier": s.state_dict()})  # fmt: skip
            slab_at_split = [list(x) for x in s.slab]
        _train_step(model, optimizer, step)
    assert slab_at_split != s.slab0  # the estimate moved away from the initial scale before the split
    model2, optimizer2, s2 = _build(123, slab="empirical", slab_prior_weight=nu)  # other initial weights
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    s2.load_state_dict(saved["sparsifier"])
    assert s2.slab == slab_at_split and s2.slab0 == s.slab0
    for step in range(split, 30):
        _train_step(model2, optimizer2, step)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert s2.slab == s.slab and all(torch.equal(a, b) for a, b in zip(s.logits, s2.logits))
    assert all(torch.equal(s.masks[n], s2.masks[n]) for n in s.masks) and s2.history == s.history


def test_a_checkpoint_without_initial_scales_loads_them_as_its_fixed_slab():
    model, optimizer, s = _build(0)
    state = s.state_dict()
    del state["extra"]["slab0"]
    _, _, s2 = _build(123)
    s2.load_state_dict(state)
    assert s2.slab0 == s2.slab == s.slab


def test_the_slab_can_price_the_gates_without_pulling_on_the_weights():
    # slab_on_weights=False: the KL's value and its gradient in the gate logits stay; the weights get none of it.
    grads = {}
    for on_weights in (True, False):
        torch.manual_seed(0)
        model = mlp()
        s = sparsetrain.create("variational", model, sparsity=0.5, total_steps=10, prior_keep=0.3, gate_init=0.8,
                               example_input=torch.zeros(1, 4), slab_on_weights=on_weights)  # fmt: skip
        kl = s.kl()
        weight_grad, logit_grad = torch.autograd.grad(kl, [model[0].weight, s.logits[0]], allow_unused=True)
        grads[on_weights] = (float(kl.detach()), weight_grad, logit_grad)
    (kl_on, w_on, l_on), (kl_off, w_off, l_off) = grads[True], grads[False]
    assert kl_off == kl_on
    torch.testing.assert_close(l_off, l_on, rtol=0, atol=0)
    assert w_on is not None and float(w_on.abs().sum()) > 0  # the ELBO's weight penalty: theta w / s^2
    assert w_off is None or float(w_off.abs().sum()) == 0
    with pytest.raises(ValueError, match="slab_on_weights must be true or false, got 'no'"):
        sparsetrain.create("variational", mlp(), sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 4),
                           slab_on_weights="no")  # fmt: skip
