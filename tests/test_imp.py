"""IMP's retraining learning rates against the run's real schedules, and full rewinding (weights, buffers, lr)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.shared import conv_bn_net, roundtrip
from torch import nn

import sparsetrain
from sparsetrain.train.lr_schedules import lr_factor

TOTAL, STEPS_PER_EPOCH, PRETRAIN, ROUND = 100, 10, 40, 30


def _imp(retrain: str, **options) -> sparsetrain.Sparsifier:
    model = nn.Sequential(nn.Linear(4, 4))
    return sparsetrain.create("imp", model, sparsity=0.5, total_steps=TOTAL, unit="steps", rounds=2,
                              pretrain=PRETRAIN, retrain=retrain, **options)  # fmt: skip


def _base(**config):
    settings = {"schedule": "cosine", "warmup_epochs": 0.0, "milestones": [0.5, 0.75], "gamma": 0.1, **config}
    return lambda step: lr_factor(step, TOTAL, STEPS_PER_EPOCH, settings)


@pytest.mark.parametrize("config", [dict(warmup_epochs=1.0), dict(schedule="onecycle")], ids=["warmup", "onecycle"])
@pytest.mark.parametrize("retrain", ["clr", "slr"])
def test_restarts_peak_at_the_schedule_maximum_not_its_first_value(config, retrain) -> None:
    base = _base(**config)
    assert base(0) <= 0.1  # the schedule starts low: a warm-up from 1/10, or one-cycle's 1/25
    sparsifier = _imp(retrain)
    round_lrs = [sparsifier.lr_factor(step, base) for step in range(PRETRAIN, PRETRAIN + ROUND)]
    pretrain_lrs = [sparsifier.lr_factor(step, base) for step in range(PRETRAIN)]
    assert max(round_lrs) == pytest.approx(max(pretrain_lrs)) == pytest.approx(1.0)
    # 10% warm-up (3 steps) rising along a half cosine, then the peak.
    assert round_lrs[:4] == pytest.approx([0.25, 0.75, 1.0, 1.0])
    assert round_lrs[-1] < 0.1  # and the round still anneals


def test_clr_anneals_to_the_smallest_lr_after_the_peak() -> None:
    base = _base(warmup_epochs=1.0)
    sparsifier = _imp("clr")
    floor = min(sparsifier.lr_factor(step, base) for step in range(4, PRETRAIN))  # after the warm-up's peak
    t = 10  # 7 of the 27 steps after the warm-up
    expected = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 7 / 27))
    assert sparsifier.lr_factor(PRETRAIN + t, base) == pytest.approx(expected)
    assert sparsifier.lr_factor(PRETRAIN + ROUND + t, base) == pytest.approx(expected)  # every round restarts


def test_slr_holds_the_peak_over_the_original_warm_up_then_replays_the_schedule() -> None:
    base = _base(warmup_epochs=1.0)  # peak at step 10 of 100 = pre-training step 4
    sparsifier = _imp("slr")
    # After the 3 warm-up steps, the 27 remaining steps replay the 40 pre-training steps: u = (t - 3) * 40 / 27.
    assert sparsifier.lr_factor(PRETRAIN + 3, base) == pytest.approx(1.0)  # u = 0, inside the warm-up: held
    assert sparsifier.lr_factor(PRETRAIN + 5, base) == pytest.approx(1.0)  # u = 2.96, still before the peak
    t = 20
    u = (t - 3) * PRETRAIN / 27
    assert sparsifier.lr_factor(PRETRAIN + t, base) == pytest.approx(base(int(u * TOTAL / PRETRAIN)))


def test_rewind_schedule_replays_pre_training_from_the_rewind_point() -> None:
    base = _base(warmup_epochs=1.0)
    sparsifier = _imp("rewind", rewind=5)
    pre = [sparsifier.lr_factor(step, base) for step in range(PRETRAIN)]
    assert sparsifier.lr_factor(PRETRAIN, base) == pytest.approx(pre[5])  # the position at the rewind point
    last = 5 + (ROUND - 1) * (PRETRAIN - 5) / ROUND  # then to the end of pre-training, compressed into the round
    assert sparsifier.lr_factor(PRETRAIN + ROUND - 1, base) == pytest.approx(base(int(last * TOTAL / PRETRAIN)))
    assert sparsifier.lr_factor(PRETRAIN + ROUND, base) == pytest.approx(pre[5])


def test_rewinding_options_need_a_rewind_point() -> None:
    with pytest.raises(ValueError, match="rewind"):
        _imp("rewind")
    with pytest.raises(ValueError, match="rewind"):
        _imp("lrw", rewind_buffers=True)


def _train(rewind_buffers: bool, resume_at: int | None = None) -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = conv_bn_net()
    options = dict(sparsity=0.5, total_steps=12, unit="steps", rounds=1, pretrain=6, rewind=2)
    sparsifier = sparsetrain.create("imp", model, rewind_buffers=rewind_buffers, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier.attach(optimizer)
    snapshot: dict = {}
    for step in range(6):
        if step == 2:
            snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        if step == resume_at:  # a fresh sparsifier resumes from the saved state
            sparsifier.detach()
            state = roundtrip(sparsifier.state_dict())
            sparsifier = sparsetrain.create("imp", model, rewind_buffers=rewind_buffers, **options)
            sparsifier.load_state_dict(state)
            sparsifier.attach(optimizer)
        optimizer.zero_grad()
        model(torch.randn(8, 1, 8, 8)).logsumexp(1).sum().backward()
        optimizer.step()
    return model, snapshot, sparsifier.masks


@pytest.mark.parametrize("resume_at", [None, 4])
def test_rewind_buffers_restores_batch_norm_statistics(resume_at) -> None:
    model, snapshot, masks = _train(rewind_buffers=True, resume_at=resume_at)
    state = model.state_dict()
    stats = [k for k in state if "running" in k or "num_batches" in k]
    assert stats and all(torch.equal(state[k], snapshot[k]) for k in stats)
    assert torch.equal(state["0.weight"], snapshot["0.weight"] * masks["0.weight"])


def test_weights_only_rewinding_keeps_the_current_statistics() -> None:
    model, snapshot, _ = _train(rewind_buffers=False)
    state = model.state_dict()
    assert not torch.equal(state["1.running_mean"], snapshot["1.running_mean"])
    assert int(state["1.num_batches_tracked"]) == 6
