"""The ``variational`` method: the KL term by hand, gates that remove groups during training, the slim model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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
