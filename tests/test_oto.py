"""The ``oto`` method: HSPG zeroes whole groups during training, the run ends at the target, slim needs no tuning."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.optim import HSPG
from sparsetrain.structured import groups, slim


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + x)  # residual: conv1 and conv2 channels are tied
        return self.fc(x.mean((2, 3)))


def train(model, sparsifier, optimizer, steps, start=0):
    for step in range(start, steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_oto_zeroes_groups_by_half_space_projection_and_slims_exactly():
    torch.manual_seed(0)
    model = Net()
    sample = torch.zeros(1, 1, 6, 6)
    s = sparsetrain.create(
        "oto", model, sparsity=0.5, total_steps=40, unit="steps", n_p=5, lam=0.5, example_input=sample
    )
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    assert isinstance(optimizer, HSPG) and optimizer.max_zero_groups == [4]  # one tied set of 8 channels
    s.attach(optimizer)
    train(model, s, optimizer, 39)
    # Before the final step the projection alone has reached the target: the top-up has nothing to add.
    assert s.phase == "half-space" and optimizer.group_sparsity() == 0.5 and s.mask_version == 0
    train(model, s, optimizer, 40, start=39)
    assert s.mask_version == 1 and s.group_sparsity() == 0.5
    zeros = [h for h in s.history if h["event"] == "mask_update"]
    assert len(zeros) == 1 and zeros[0]["reason"] == "oto: prune to target"
    model.eval()
    small = slim(model, sample)
    assert small.conv1.out_channels == small.conv2.out_channels == small.fc.in_features == 4
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5


def test_target_flops_sets_the_group_sparsity():
    torch.manual_seed(0)
    model = Net()
    sample = torch.zeros(1, 1, 6, 6)
    s = sparsetrain.create("oto", model, target_flops=0.7, total_steps=10, example_input=sample)
    # conv1's and fc's FLOPs scale with the kept channels k of 8, conv2's with k^2: k = 4 leaves 0.278 of them,
    # k = 5 leaves 0.417, so 70% removed means keeping 4 (the smallest sparsity that rounds to 4 kept: 7/16).
    assert sparsetrain.maskops.keep_count(8, s.final_sparsity) == 4
    assert s.final_sparsity == pytest.approx(7 / 16)
    dense = groups(model, sample).dense_flops
    for kept, fraction in ((4, 0.278), (5, 0.417)):
        small = sparsetrain.structured.apply_keep(Net(), groups(Net(), sample), {"conv1": list(range(kept))})
        assert groups(small, sample).dense_flops / dense == pytest.approx(fraction, abs=1e-3)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(mask_type="2:4"), "N:M"),
        (dict(example_input=None), "example_input"),
        (dict(lam=-1.0), "lam"),
        (dict(epsilon=1.5), "epsilon"),
        (dict(stage1="adam"), "stage1"),
        (dict(n_p=2.0), "n_p"),
        (dict(target_flops=1.0), "target_flops"),
        (dict(variant="otov3"), "variant"),
    ],
)
def test_bad_options_are_refused(options, match):
    kwargs = {"sparsity": 0.5, "total_steps": 10, "example_input": torch.zeros(1, 1, 6, 6), **options}
    with pytest.raises(ValueError, match=match):
        sparsetrain.create("oto", Net(), **kwargs)


def test_a_plain_optimizer_is_refused():
    model = Net()
    s = sparsetrain.create("oto", model, sparsity=0.5, total_steps=10, example_input=torch.zeros(1, 1, 6, 6))
    with pytest.raises(ValueError, match="wrap_optimizer"):
        s.attach(torch.optim.SGD(model.parameters(), lr=0.1))


def dhspg_run(seed=0, **extra):
    extra.setdefault("periods", 1)  # one partition unless a test says otherwise (whatever oto's default)
    torch.manual_seed(seed)
    model = Net()
    s = sparsetrain.create("oto", model, sparsity=0.5, total_steps=30, unit="steps", n_p=5, finish=20,
                           variant="dhspg", example_input=torch.zeros(1, 1, 6, 6), **extra)  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    s.attach(optimizer)
    return model, s, optimizer


def zero_channels(model: Net) -> int:
    """Channels of the tied conv1/conv2 set whose zero-invariant parameters are all exactly zero."""
    rows = [model.conv1.weight.flatten(1), model.conv1.bias[:, None], model.bn1.weight[:, None],
            model.bn1.bias[:, None], model.conv2.weight.flatten(1), model.conv2.bias[:, None],
            model.bn2.weight[:, None], model.bn2.bias[:, None]]  # fmt: skip
    return int((torch.cat(rows, dim=1) == 0).all(dim=1).sum())


def test_dhspg_zeroes_exactly_the_target_by_finish_and_slims_exactly():
    model, s, optimizer = dhspg_run()
    assert s.phase == "warm-up"
    for step in range(30):
        train(model, s, optimizer, step + 1, start=step)
        if step < 5:
            assert optimizer.redundant is None and zero_channels(model) == 0
        elif step < 19:  # the redundant groups shrink towards zero during the stage (n_p to finish)
            assert s.phase == "half-space" and optimizer.redundant[0].sum() == 4 and zero_channels(model) < 4
        else:  # zero by the stage's last step, and never more than the target afterwards
            assert zero_channels(model) == 4, step
    redundant = optimizer.redundant[0]
    assert torch.all(model.conv1.weight[redundant] == 0) and torch.all(model.conv1.weight[~redundant] != 0)
    assert s.group_sparsity() == 0.5 and [h["reason"] for h in s.history if h["event"] == "mask_update"] == [
        "oto: prune to target"
    ]
    model.eval()
    small = slim(model, torch.zeros(1, 1, 6, 6))
    assert small.conv1.out_channels == small.conv2.out_channels == 4
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5


# before the partition, inside the stage, after finish; periods 5-10, 10-15, 15-20: at a period's first step
# (the partition of the second period runs after the resume), inside it, at the third's first step
@pytest.mark.parametrize("periods, split", [(1, 3), (1, 10), (1, 20), (3, 10), (3, 12), (3, 15)])
def test_dhspg_resume_is_bit_identical(periods, split):
    from helpers.shared import roundtrip

    model, s, optimizer = dhspg_run(periods=periods)
    train(model, s, optimizer, split)
    saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsifier": s.state_dict()})
    train(model, s, optimizer, 30, start=split)

    model2, s2, optimizer2 = dhspg_run(seed=123, periods=periods)  # other initial weights: all from the checkpoint
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    s2.load_state_dict(saved["sparsifier"])
    train(model2, s2, optimizer2, 30, start=split)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert [r.tolist() for r in optimizer2.redundant] == [r.tolist() for r in optimizer.redundant]
    assert all(torch.equal(s.masks[n], s2.masks[n]) for n in s.masks) and s2.history == s.history


def test_dhspg_periods_reach_exactly_the_target_in_shares_and_slim_exactly():
    # 3 periods from n_p = 5 to finish = 20: 1, 2, then all 4 of the 8 tied channels zero by steps 9, 14, 19.
    model, s, optimizer = dhspg_run(periods=3)
    zeros, chosen = [], []
    for step in range(30):
        train(model, s, optimizer, step + 1, start=step)
        zeros.append(zero_channels(model))
        chosen.append(None if optimizer.redundant is None else int(optimizer.redundant[0].sum()))
    assert chosen[4] is None and chosen[5:10] == [1] * 5 and chosen[10:15] == [2] * 5 and chosen[15:] == [4] * 15
    assert zeros[9] == 1 and zeros[14] == 2 and zeros[19:] == [4] * 11
    assert all(a <= b for a, b in zip(zeros, zeros[1:]))  # zero groups stay zero
    assert torch.equal((model.conv1.weight.flatten(1) == 0).all(dim=1), optimizer.redundant[0])
    assert s.group_sparsity() == 0.5 and [h["reason"] for h in s.history if h["event"] == "mask_update"] == [
        "oto: prune to target"
    ]
    model.eval()
    small = slim(model, torch.zeros(1, 1, 6, 6))
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        assert small.conv1.out_channels == 4 and (small(x) - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(variant="dhspg", periods=0), "periods must be an integer >= 1, got 0"),
        (dict(variant="dhspg", periods=16), r"periods \(16\) must not exceed the steps from n_p to finish \(15\)"),
        (dict(variant="hspg", periods=2), "variant 'dhspg' only"),
    ],
)
def test_bad_periods_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        sparsetrain.create("oto", Net(), sparsity=0.5, total_steps=30, unit="steps", n_p=5, finish=20,
                           example_input=torch.zeros(1, 1, 6, 6), **options)  # fmt: skip


def test_dhspg_needs_n_p_before_finish():
    with pytest.raises(ValueError, match="n_p must come before finish"):
        sparsetrain.create("oto", Net(), sparsity=0.5, total_steps=30, unit="steps", n_p=20, finish=20,
                           variant="dhspg", example_input=torch.zeros(1, 1, 6, 6))  # fmt: skip


def test_groups_zeroed_just_before_finish_count_towards_the_target():
    # DHSPG zeroes its redundant groups at the stage's last step, right before the prune to target. The prune
    # ranks groups by magnitude including the next layer's slices, so where those are large it would rank the
    # just-zeroed groups above live ones: they must be counted as dead first, or the run ends over the target.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[:3] *= 0.01  # small groups: the partition makes them redundant
        model[2].weight[:, :3] *= 100.0  # ...but the layer reading them weighs them heavily
    s = sparsetrain.create("oto", model, sparsity=0.5, total_steps=12, unit="steps", n_p=2, finish=8,
                           variant="dhspg", example_input=torch.zeros(1, 4))  # fmt: skip
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    s.attach(optimizer)
    for step in range(12):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    zero = (torch.cat([model[0].weight, model[0].bias[:, None]], dim=1) == 0).all(dim=1)
    assert int(optimizer.redundant[0].sum()) == 3 and torch.equal(zero, optimizer.redundant[0])
    assert s.group_sparsity() == 0.5
