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
