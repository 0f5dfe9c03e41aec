"""Tests for sparsetrain.flops against hand-computed multiply-accumulate counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.flops import (
    FlopCounter,
    FlopReport,
    TrainingFlops,
    forward_flops,
    training_flops_ratio,
)


def _conv_net() -> nn.Sequential:
    # Layer names in the Sequential: "0", "2", "4", "6".
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 8x8 out: 64 positions x 36 weights = 2304
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),  # 4x4 out: 16 x 288 = 4608
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise, 4x4 out: 16 x 72 = 1152
        nn.Flatten(),
        nn.Linear(128, 10),  # 1 x 1280 = 1280
    )


EXPECTED = {
    "0": ("Conv2d", (4, 1, 3, 3), 64, 2304),
    "2": ("Conv2d", (8, 4, 3, 3), 16, 4608),
    "4": ("Conv2d", (8, 1, 3, 3), 16, 1152),
    "6": ("Linear", (10, 128), 1, 1280),
}
DENSE_TOTAL = 2304 + 4608 + 1152 + 1280


def _by_name(report: FlopReport) -> dict:
    return {layer.name: layer for layer in report.layers}


def test_conv_net_per_layer_and_totals() -> None:
    torch.manual_seed(0)
    report = forward_flops(_conv_net(), torch.randn(2, 1, 8, 8))
    layers = _by_name(report)
    assert list(layers) == ["0", "2", "4", "6"]
    for name, (kind, shape, positions, dense) in EXPECTED.items():
        layer = layers[name]
        assert layer.kind == kind
        assert layer.weight_shape == shape
        assert layer.positions == positions
        assert layer.dense == dense
        # Randomly initialised weights are all nonzero.
        assert layer.sparse == dense
    assert report.dense_total == DENSE_TOTAL == 9344
    assert report.sparse_total == DENSE_TOTAL
    assert report.ratio == 1.0


@pytest.mark.parametrize("batch", [1, 5])
def test_counts_are_per_sample(batch: int) -> None:
    report = forward_flops(_conv_net(), torch.randn(batch, 1, 8, 8))
    assert report.dense_total == DENSE_TOTAL


def test_zeroed_weights_halve_sparse_count() -> None:
    model = _conv_net()
    counter = FlopCounter(model, torch.randn(2, 1, 8, 8))
    # Zeroing after construction must show up without another forward pass.
    with torch.no_grad():
        model[6].weight[:5].zero_()
    report = counter.forward()
    layers = _by_name(report)
    assert layers["6"].dense == 1280
    assert layers["6"].sparse == 640
    for name in ("0", "2", "4"):
        assert layers[name].sparse == layers[name].dense
    assert report.sparse_total == DENSE_TOTAL - 640
    assert report.ratio == pytest.approx((DENSE_TOTAL - 640) / DENSE_TOTAL)


def test_mask_overrides_weight_count() -> None:
    model = _conv_net()
    counter = FlopCounter(model, torch.randn(2, 1, 8, 8))
    with torch.no_grad():
        model[0].weight.zero_()
    mask0 = torch.zeros(4, 1, 3, 3, dtype=torch.bool)
    mask0.view(-1)[:9] = True
    mask4 = torch.ones(8, 1, 3, 3, dtype=torch.bool)
    layers = _by_name(counter.forward({"0.weight": mask0, "4.weight": mask4, "unrelated.weight": mask0}))
    # Mask wins over the (all-zero) weight: 9 of 36 kept.
    assert layers["0"].sparse == 64 * 9
    assert layers["4"].sparse == 1152
    # Unmasked layers fall back to the weight's nonzeros.
    assert layers["2"].sparse == 4608
    # Without masks the zeroed weight counts as zero.
    assert _by_name(counter.forward())["0"].sparse == 0


def test_mask_of_wrong_size_is_rejected() -> None:
    counter = FlopCounter(_conv_net(), torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="0.weight"):
        counter.forward({"0.weight": torch.ones(3, dtype=torch.bool)})


def test_conv1d_and_sequence_linear() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 5, kernel_size=4, stride=2)  # L 20 -> 9; 60 weights
            self.proj = nn.Linear(5, 7)  # applied to (B, 9, 5): 9 positions x 35 weights

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.conv(x).transpose(1, 2))

    layers = _by_name(forward_flops(Net(), torch.randn(3, 3, 20)))
    assert layers["conv"].kind == "Conv1d"
    assert layers["conv"].positions == 9
    assert layers["conv"].dense == 9 * 60 == 540
    assert layers["proj"].kind == "Linear"
    assert layers["proj"].positions == 9
    assert layers["proj"].dense == 9 * 35


def test_module_applied_twice_counts_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    report = forward_flops(Twice(), torch.randn(2, 4))
    (layer,) = report.layers
    assert layer.positions == 2
    assert layer.dense == 32


def test_subclass_counted_and_unused_module_skipped() -> None:
    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = MyLinear(6, 3)
            self.unused_head = nn.Linear(3, 100)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    report = forward_flops(Net(), torch.randn(2, 6))
    assert [(layer.name, layer.kind, layer.dense) for layer in report.layers] == [("fc", "Linear", 18)]


def test_modes_restored_and_eval_during_pass() -> None:
    seen: list[bool] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.training)
            return x

    model = nn.Sequential(nn.Linear(4, 4), Probe(), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[2].eval()  # a deliberately frozen batch-norm must stay frozen
    FlopCounter(model, torch.randn(3, 4))
    assert seen == [False]
    assert model.training
    assert [m.training for m in model] == [True, True, False, True]

    model.eval()
    FlopCounter(model, torch.randn(3, 4))
    assert not any(m.training for m in model.modules())


def _all_hooks_empty(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


def test_hooks_removed() -> None:
    model = _conv_net()
    FlopCounter(model, torch.randn(2, 1, 8, 8))
    assert _all_hooks_empty(model)


def test_hooks_removed_and_mode_restored_on_error() -> None:
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc(x)
            raise RuntimeError("boom")

    model = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        FlopCounter(model, torch.randn(2, 4))
    assert _all_hooks_empty(model)
    assert model.training and model.fc.training


def test_no_grad_during_pass() -> None:
    model = _conv_net()
    FlopCounter(model, torch.randn(2, 1, 8, 8))
    assert all(p.grad is None for p in model.parameters())


def test_training_step() -> None:
    model = _conv_net()
    counter = FlopCounter(model, torch.randn(2, 1, 8, 8))
    with torch.no_grad():
        model[6].weight[:5].zero_()
    assert counter.training_step(32) == 3 * (DENSE_TOTAL - 640) * 32
    mask = torch.zeros(10, 128, dtype=torch.bool)
    assert counter.training_step(4, {"6.weight": mask}) == 3 * (DENSE_TOTAL - 1280) * 4


def test_training_flops_dense_then_sparse() -> None:
    model = nn.Linear(10, 10)  # 100 weights, 1 position
    tracker = TrainingFlops(FlopCounter(model, torch.randn(2, 10)))
    assert tracker.ratio == 1.0
    for _ in range(10):
        tracker.add(32)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0] = True  # forward ratio 10 / 100
    for _ in range(10):
        tracker.add(32, {"weight": mask})
    assert tracker.dense == 20 * 3 * 100 * 32
    assert tracker.sparse == 10 * 3 * 100 * 32 + 10 * 3 * 10 * 32
    assert tracker.samples == 20 * 32
    assert tracker.ratio == pytest.approx(0.55)


def test_root_module_mask_key_matches_named_parameters() -> None:
    model = nn.Linear(10, 10)
    (param_name,) = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0, :4] = True
    assert FlopCounter(model, torch.randn(1, 10)).forward({param_name: mask}).sparse_total == 4


def test_training_flops_cached_forward_value() -> None:
    tracker = TrainingFlops(FlopCounter(nn.Linear(10, 10), torch.randn(1, 10)))
    tracker.add(8, forward_flops=10)
    assert tracker.sparse == 3 * 10 * 8
    assert tracker.dense == 3 * 100 * 8
    with pytest.raises(ValueError):
        tracker.add(-1)


def test_training_flops_state_dict_round_trip() -> None:
    counter = FlopCounter(_conv_net(), torch.randn(2, 1, 8, 8))
    tracker = TrainingFlops(counter)
    tracker.add(16)
    tracker.add(16, forward_flops=DENSE_TOTAL // 4)
    state = tracker.state_dict()
    assert all(type(v) is int for v in state.values())

    resumed = TrainingFlops(counter)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert (resumed.sparse, resumed.dense) == (tracker.sparse, tracker.dense)
    assert resumed.ratio == tracker.ratio
    # Counting continues from the restored totals.
    resumed.add(16)
    assert resumed.dense == tracker.dense + 3 * DENSE_TOTAL * 16


@pytest.mark.parametrize("f", [0.0, 0.1, 0.25, 1.0])
def test_training_flops_ratio_acdc_imagenet(f: float) -> None:
    steps_per_epoch = 5005  # ImageNet at batch 256
    phases = [(50 * steps_per_epoch, 1.0), (50 * steps_per_epoch, f)]
    assert training_flops_ratio(phases) == pytest.approx(0.5 + 0.5 * f)


def test_training_flops_ratio_weighting_and_edge_cases() -> None:
    assert training_flops_ratio([(10, 1.0), (10, 0.1)]) == pytest.approx(0.55)
    assert training_flops_ratio([(30, 0.2), (10, 1.0)]) == pytest.approx(0.4)
    assert training_flops_ratio([]) == 1.0
    with pytest.raises(ValueError):
        training_flops_ratio([(-1, 0.5)])


def test_training_flops_ratio_matches_tracker() -> None:
    # The pure schedule arithmetic and the step-by-step tracker must agree.
    model = nn.Linear(10, 10)
    tracker = TrainingFlops(FlopCounter(model, torch.randn(1, 10)))
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:3] = True
    for _ in range(7):
        tracker.add(4)
    for _ in range(13):
        tracker.add(4, {"weight": mask})
    assert tracker.ratio == pytest.approx(training_flops_ratio([(7, 1.0), (13, 0.3)]))


def test_dense_gradient_step_costs_two_sparse_passes_and_one_dense() -> None:
    # Linear 10x10, one position: f_D = 100, a mask of 10 weights gives f_S = 10 (RigL paper, appendix H).
    tracker = TrainingFlops(FlopCounter(nn.Linear(10, 10), torch.randn(1, 10)))
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[0] = True
    tracker.add(32, {"weight": mask})
    assert tracker.sparse == 3 * 10 * 32  # 960
    tracker.add(32, {"weight": mask}, dense_gradients=True)
    assert tracker.sparse == 960 + (2 * 10 + 100) * 32  # 960 + 3840
    assert tracker.dense == 2 * 3 * 100 * 32  # the dense run it is compared with does not change
    assert tracker.ratio == pytest.approx((960 + 3840) / 19200)  # 0.25
    tracker.add(32, forward_flops=100, dense_gradients=True)  # at full density both conventions agree
    assert tracker.sparse == 960 + 3840 + 3 * 100 * 32


def _run(tmp_path, method: str, **options):
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import Run

    config = resolve(None, dict(dataset="digits", model="mlp", method=method, sparsity=0.9, epochs=2, batch_size=64,
                                threads=1, plots=False, progress=False, out=str(tmp_path / method),
                                method_options=options))  # fmt: skip
    run = Run(config)
    run.run()
    return run


def test_trainer_charges_rigl_update_steps_the_dense_weight_gradient(tmp_path) -> None:
    run = _run(tmp_path, "rigl", delta=4)
    steps, batch = run.total_steps, 64
    # The update steps: 0 < t < end_step (75% of the run), t a multiple of delta.
    updates = [t for t in range(steps) if run.sparsifier.is_update_step(t)]
    assert updates and len(updates) == (run.sparsifier.end_step - 1) // 4
    f_dense = run.flop_counter.dense_total
    f_sparse = run.flop_counter.forward(run.sparsifier.masks).sparse_total  # RigL keeps each layer's count
    assert f_sparse < f_dense / 5
    expected = steps * batch * 3 * f_sparse + len(updates) * batch * (f_dense - f_sparse)
    assert run.train_flops.sparse == expected
    assert run.train_flops.dense == steps * batch * 3 * f_dense


def test_trainer_charges_set_its_sparse_cost_on_skipped_update_steps(tmp_path) -> None:
    run = _run(tmp_path, "set", delta=4)  # random growth reads no gradient: 3 f_S on every step
    f_sparse = run.flop_counter.forward(run.sparsifier.masks).sparse_total
    assert run.train_flops.sparse == run.total_steps * 64 * 3 * f_sparse


def test_trainer_charges_rda_the_dense_weight_gradient_before_its_prune(tmp_path) -> None:
    # No prune: every step computes the dense gradient of the dual average, so each costs at least f_D of 3 f_D,
    # however sparse the penalty makes the weights (the ratio is 1/3 + 2/3 of the mean forward ratio).
    run = _run(tmp_path, "rda", lam=1e-2, prune_to_target=False)
    assert run.sparsifier.sparsity_of_masks() > 0.9
    assert 1 / 3 < run.train_flops.ratio < 1 / 3 + 2 / 3 * 0.5  # 3 f_S per step would have given under 1/3
