"""``channel_multiple``: channel masks whose kept count per channel set is rounded to a multiple (oneDNN-friendly
widths), shared by every method with channel masks (magnitude, gmp, acdc, oto, variational)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.maskops import channel_keep_count, check_channel_multiple, keep_count
from sparsetrain.methods._groupwise import group_sparsity_for_flops
from sparsetrain.models import build_model
from sparsetrain.structured import groups, kept_channels, slim

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def resnet20() -> tuple[nn.Module, torch.Tensor]:
    """ResNet-20 on 14x14 inputs (its channel sets: 16, 32 and 64 wide), eval mode, random batch-norm state."""
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(1, 14, 14), num_classes=10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.2)
    return model.eval(), torch.randn(8, 1, 14, 14, generator=torch.Generator().manual_seed(1))


def kept_by_width(model: nn.Module, sample: torch.Tensor) -> dict[int, set[int]]:
    zigs = groups(model, sample)
    counts = {s.name: len(k) for s, k in zip(zigs.sets, kept_channels(model, zigs).values())}
    out: dict[int, set[int]] = {}
    for s in zigs.sets:
        out.setdefault(s.width, set()).add(counts[s.name])
    return out


# ----------------------------------------------------------------------------------------- the rounding itself
@pytest.mark.parametrize(
    ("width", "kept", "multiple", "rounded"),
    [
        (16, 11, 8, 8),  # 11 is nearer 8 than 16
        (16, 12, 8, 8),  # a tie goes to the smaller count
        (16, 13, 8, 16),
        (32, 23, 8, 24),
        (64, 45, 8, 48),
        (64, 1, 8, 8),  # under the multiple: the multiple
        (6, 4, 8, 4),  # a set narrower than the multiple is not rounded
        (84, 83, 8, 84),  # the width itself is a candidate (83 is nearer 84 than 80)
        (84, 82, 8, 80),  # tie between 80 and the width 84
        (120, 79, 8, 80),
        (64, 45, 16, 48),
        (64, 40, 16, 32),  # tie between 32 and 48
        (64, 45, 1, 45),
    ],
)
def test_channel_keep_count_rounds_to_the_nearest_multiple(width, kept, multiple, rounded):
    sparsity = 1 - kept / width  # keep_count gives back `kept` at this sparsity
    assert keep_count(width, sparsity) == kept
    assert channel_keep_count(width, sparsity, multiple) == rounded


def test_channel_keep_count_default_is_keep_count_and_rounding_is_monotone():
    grid = [i / 200 for i in range(200)]
    for width in (1, 3, 6, 16, 32, 64, 84, 120):
        assert [channel_keep_count(width, s) for s in grid] == [max(1, keep_count(width, s)) for s in grid]
        for multiple in (2, 4, 8, 16):
            counts = [channel_keep_count(width, s, multiple) for s in grid]
            assert counts == sorted(counts, reverse=True)  # never more kept at a higher sparsity
            assert counts[0] == width
            if width >= multiple:
                assert all(c % multiple == 0 or c == width for c in counts)


@pytest.mark.parametrize("bad", [0, -8, 8.0, True, "8", None])
def test_a_bad_channel_multiple_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match=r"channel_multiple must be a positive integer.*got"):
        check_channel_multiple(bad)
    model, x = resnet20()
    with pytest.raises(ValueError, match="channel_multiple must be a positive integer"):
        sparsetrain.create("gmp", model, sparsity=0.3, mask_type="channel", example_input=x[:1], total_steps=10,
                           channel_multiple=bad)  # fmt: skip


def test_channel_multiple_is_refused_without_channel_masks_or_with_a_global_ranking():
    model, x = resnet20()
    with pytest.raises(ValueError, match="mask_type='channel'.*got mask_type='unstructured'"):
        sparsetrain.create("gmp", model, sparsity=0.5, total_steps=10, channel_multiple=8)
    with pytest.raises(ValueError, match="'uniform' distribution.*got distribution='global'"):
        sparsetrain.create("magnitude", model, sparsity=0.5, mask_type="channel", distribution="global",
                           example_input=x[:1], total_steps=10, channel_multiple=8)  # fmt: skip


# ------------------------------------------------------------------------------------- the FLOPs target, slim
def test_flops_target_with_a_multiple_is_met_by_multiples_and_slim_equals_masked():
    model, x = resnet20()
    sample = x[:1]
    plain = group_sparsity_for_flops(model, sample, 0.5)
    rounded = group_sparsity_for_flops(model, sample, 0.5, channel_multiple=8)
    dense_flops = groups(model, sample).dense_flops
    for sparsity, expected in ((plain, {16: {11}, 32: {23}, 64: {45}}), (rounded, {16: {8}, 32: {24}, 64: {48}})):
        multiple = 8 if sparsity == rounded else 1
        masked = build_model("resnet20", input_shape=(1, 14, 14), num_classes=10)
        masked.load_state_dict(model.state_dict())
        masked.eval()
        s = sparsetrain.create("magnitude", masked, sparsity=sparsity, mask_type="channel", example_input=sample,
                               total_steps=10, channel_multiple=multiple)  # fmt: skip
        assert s.group_sparsity() > 0
        assert kept_by_width(masked, sample) == expected
        small = slim(masked, sample)
        assert 1 - groups(small, sample).dense_flops / dense_flops >= 0.5  # 50.6% removed; 55.3% when rounded
        with torch.no_grad():
            assert (small(x) - masked(x)).abs().max() <= 1e-5 * max(1.0, float(masked(x).abs().max()))
    # Rounded: the lowest sparsity whose rounded model meets the target (one step lower keeps 16 in stage 1).
    below = rounded - 1e-3
    assert [channel_keep_count(w, below, 8) for w in (16, 32, 64)] != [8, 24, 48]


def test_an_unreachable_flops_target_is_refused():
    class Net(nn.Module):  # one set of 8 channels: with multiple 8 nothing can be removed
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match=r"target_flops 0.5 cannot be met with channel_multiple 8.*0.0%"):
        sparsetrain.create("oto", Net(), target_flops=0.5, total_steps=10, example_input=torch.zeros(1, 1, 6, 6),
                           channel_multiple=8)  # fmt: skip
    s = sparsetrain.create("oto", Net(), target_flops=0.5, total_steps=10, example_input=torch.zeros(1, 1, 6, 6),
                           channel_multiple=4)  # fmt: skip
    assert s.max_dead == [4]


# ---------------------------------------------------------------------------------------------- the methods
def train(model: nn.Module, s, optimizer, steps: int, x: torch.Tensor, record=None) -> None:
    y = torch.arange(len(x)) % 10
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if record is not None:
            record.append(kept_by_width(model, x[:1]))


def test_gmp_ramp_keeps_multiples_at_every_update_and_ends_at_the_target():
    model, x = resnet20()
    model.train()
    sparsity = group_sparsity_for_flops(model, x[:1], 0.5, channel_multiple=8)
    s = sparsetrain.create("gmp", model, sparsity=sparsity, mask_type="channel", example_input=x[:1],
                           total_steps=8, unit="steps", start=1, end=6, frequency=1, channel_multiple=8)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    s.attach(optimizer)
    seen: list[dict[int, set[int]]] = []
    train(model, s, optimizer, 8, x, seen)
    assert all(k % 8 == 0 for counts in seen for ks in counts.values() for k in ks)
    assert len({tuple(sorted((w, min(k)) for w, k in c.items())) for c in seen}) > 2  # the ramp moved in steps
    assert seen[-1] == {16: {8}, 32: {24}, 64: {48}}


@pytest.mark.parametrize("method", ["oto", "variational"])
def test_group_pruning_methods_reach_the_rounded_target_and_slim_exactly(method):
    model, x = resnet20()
    model.train()
    options = {"finish": 4, "n_p": 2} if method == "oto" else {"finish": 4, "num_samples": 64}
    s = sparsetrain.create(method, model, target_flops=0.5, total_steps=6, unit="steps", example_input=x[:1],
                           channel_multiple=8, **options)  # fmt: skip
    assert s.max_dead == [8, 8, 8, 8, 8, 8, 8, 8, 16, 16, 16, 16]  # 16 -> 8, 32 -> 24, 64 -> 48 kept
    optimizer = s.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    s.attach(optimizer)
    train(model, s, optimizer, 6, x)
    model.eval()
    assert kept_by_width(model, x[:1]) == {16: {8}, 32: {24}, 64: {48}}
    small = slim(model, x[:1])
    with torch.no_grad():
        assert (small(x) - model(x)).abs().max() <= 1e-5 * max(1.0, float(model(x).abs().max()))


def test_channel_acdc_compresses_to_multiples():
    model, x = resnet20()
    model.train()
    sparsity = group_sparsity_for_flops(model, x[:1], 0.5, channel_multiple=8)
    s = sparsetrain.create("acdc", model, sparsity=sparsity, mask_type="channel", example_input=x[:1],
                           total_steps=6, unit="steps", warmup=1, compressed=2, decompressed=1, final=2,
                           channel_multiple=8)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    s.attach(optimizer)
    train(model, s, optimizer, 6, x)
    assert kept_by_width(model, x[:1]) == {16: {8}, 32: {24}, 64: {48}}


def test_the_default_multiple_is_the_unrounded_masks_bit_for_bit():
    model, x = resnet20()
    masks = []
    for options in ({}, {"channel_multiple": 1}):
        s = sparsetrain.create("magnitude", copy.deepcopy(model), sparsity=0.289, mask_type="channel",
                               example_input=x[:1],
                               total_steps=10, **options)  # fmt: skip
        masks.append(s.masks)
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    # The sparsity the unrounded search found before channel_multiple existed, to the last bit.
    assert group_sparsity_for_flops(model, x[:1], 0.5, channel_multiple=1) == 0.2890625007580966


def test_the_cli_takes_channel_multiple_and_refuses_it_without_channel_masks(tmp_path):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "sparsetrain", "train", "--model", "lenet5", "--limit-train", "256", "--method",
            "gmp", "--sparsity", "0.5", "--epochs", "1", "--threads", "1", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([*args, "--set", "method_options.channel_multiple=8", "--out", str(tmp_path / "a")],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: channel_multiple") and "Traceback" not in bad.stderr
    good = subprocess.run([*args, "--mask-type", "channel", "--set", "method_options.channel_multiple=8", "--out",
                           str(tmp_path / "b")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert good.returncode == 0, good.stderr
    from sparsetrain.train.checkpoint import load, restore_model

    model = restore_model(load(str(tmp_path / "b" / "sparse_final.pt")), tmp_path / "b")
    # LeNet-5's sets of 6 (narrower than 8: unrounded), 16, 120 and 84 channels at half: 3, 8, 56 (60: a tie goes
    # to the smaller count) and 40 (42)
    assert kept_by_width(model, torch.zeros(1, 1, 28, 28)) == {6: {3}, 16: {8}, 120: {56}, 84: {40}}
