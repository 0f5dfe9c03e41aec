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
                           num_samples=20, prior_keep=0.05, gate_init=0.5, threshold=0.4,
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
            dead = [t < 0.4 for t in s.theta()]
            assert torch.all(model[0].weight[dead[0]] == 0) and torch.all(model[2].weight[:, dead[0]] == 0)
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
