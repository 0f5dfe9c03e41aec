"""CrAM: a hand-worked step, frozen batch-norm statistics, reproducible draws, state, the method, bad input."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.shared import conv_bn_net, roundtrip
from torch import nn

import sparsetrain
from sparsetrain.maskops import keep_count
from sparsetrain.optim import CrAM

W = [[0.4, -0.1, 0.3, 0.05]]
TARGET = torch.tensor([[0.0, 0.5, 0.1, -0.2]], dtype=torch.float64)


def quadratic(weight: nn.Parameter, optimizer: torch.optim.Optimizer):
    """loss = 0.5 ||w - target||^2, so the gradient at any point p is p - target."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * ((weight - TARGET) ** 2).sum()
        loss.backward()
        return loss

    return closure


def hand_case(**options) -> tuple[nn.Parameter, torch.Tensor]:
    weight = nn.Parameter(torch.tensor(W, dtype=torch.float64))
    optimizer = CrAM([weight], torch.optim.SGD([weight], lr=0.1), rho=0.25, sparsities=(0.5,), **options)
    loss = optimizer.step(quadratic(weight, optimizer))
    return weight, loss


def close(a: torch.Tensor, rows) -> bool:
    return torch.allclose(a.detach(), torch.tensor(rows, dtype=torch.float64), rtol=0, atol=1e-12)


def test_one_step_by_hand():
    # g = w - t = [0.4, -0.6, 0.2, 0.25]; w + 0.25 g = [0.5, -0.25, 0.35, 0.1125]; top-2 of 4 keeps 0.5 and 0.35:
    # mask [1, 0, 1, 0], compressed point [0.5, 0, 0.35, 0]; g' = [0.5, -0.5, 0.25, 0.2], masked [0.5, 0, 0.25, 0];
    # CrAM+: g' + g = [0.9, -0.6, 0.45, 0.25]; SGD lr 0.1 from the restored w.
    weight, loss = hand_case()
    assert close(weight, [[0.31, -0.04, 0.255, 0.025]])
    assert loss.item() == pytest.approx(0.5 * (0.16 + 0.36 + 0.04 + 0.0625), abs=1e-12)  # the clean loss


def test_one_step_by_hand_without_plus_or_mask():
    weight, _ = hand_case(plus=False, mask_gradient=False)  # g' = [0.5, -0.5, 0.25, 0.2] alone
    assert close(weight, [[0.35, -0.05, 0.275, 0.03]])
    weight, _ = hand_case(plus=False)  # masked g' = [0.5, 0, 0.25, 0]
    assert close(weight, [[0.35, -0.1, 0.275, 0.05]])


def test_rho_zero_without_plus_is_a_step_at_the_compressed_weights():
    weight = nn.Parameter(torch.tensor(W, dtype=torch.float64))
    optimizer = CrAM([weight], torch.optim.SGD([weight], lr=0.1), rho=0.0, sparsities=(0.5,), plus=False)
    optimizer.step(quadratic(weight, optimizer))
    # Compressed w = [0.4, 0, 0.3, 0] (top-2), g' masked = [0.4, 0, 0.2, 0].
    assert close(weight, [[0.36, -0.1, 0.28, 0.05]])


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def bn_step(with_model: bool) -> tuple[BNNet, BNNet]:
    torch.manual_seed(0)
    net = BNNet()
    reference = BNNet()
    reference.load_state_dict(net.state_dict())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizer = CrAM(
        list(net.parameters()), torch.optim.SGD(net.parameters(), lr=0.1), rho=0.5, model=net if with_model else None
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    reference(x)  # one clean forward pass in train mode: what the statistics must reflect
    return net, reference


def test_batchnorm_statistics_see_only_the_clean_pass():
    net, reference = bn_step(with_model=True)
    assert torch.equal(net.bn.running_mean, reference.bn.running_mean)
    assert torch.equal(net.bn.running_var, reference.bn.running_var)
    assert int(net.bn.num_batches_tracked) == 1
    unprotected, reference = bn_step(with_model=False)  # without the model the second pass leaks in
    assert int(unprotected.bn.num_batches_tracked) == 2
    assert not torch.equal(unprotected.bn.running_mean, reference.bn.running_mean)


def test_sparsity_draw_is_a_function_of_seed_and_step():
    def make(seed: int) -> CrAM:
        weight = nn.Parameter(torch.ones(4, 4))
        return CrAM([weight], torch.optim.SGD([weight], lr=0.1), sparsities=(0.5, 0.7, 0.9), seed=seed)

    a, b, other = make(3), make(3), make(4)
    draws = [a.sparsity_at(step) for step in range(300)]
    assert draws == [b.sparsity_at(step) for step in range(300)]
    assert draws != [other.sparsity_at(step) for step in range(300)]
    assert set(draws) == {0.5, 0.7, 0.9}
    assert all(60 <= draws.count(s) <= 140 for s in (0.5, 0.7, 0.9))  # uniform: 100 each expected
    assert [a.sparsity_at(step) for step in range(300)] == draws  # asking again draws nothing new

    weight = nn.Parameter(torch.randn(4, 4))
    optimizer = CrAM([weight], torch.optim.SGD([weight], lr=0.01), seed=3)
    seen = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (weight**2).sum()
        loss.backward()
        return loss

    for _ in range(6):
        optimizer.step(closure)
        seen.append(optimizer.last_sparsity)
    assert seen == draws[:6]


def test_compression_counts_are_exact_global_and_nm():
    torch.manual_seed(0)
    layers = [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8))]
    optimizer = CrAM(layers, torch.optim.SGD(layers, lr=0.1))
    assert optimizer.compressed == layers[:2]  # dim >= 2 by default: the bias is perturbed, not compressed
    masks = optimizer.compression_masks(0.7)
    assert sum(int(m.sum()) for m in masks) == keep_count(96, 0.7)
    nm = CrAM(layers, torch.optim.SGD(layers, lr=0.1), mask_type="2:4")
    assert nm.sparsity_at(5) == 0.5
    for mask in nm.compression_masks(0.5):
        assert torch.all(mask.reshape(-1, 4).sum(1) == 2)


def test_gradient_mask_keeps_pruned_coordinates_to_the_clean_gradient():
    weight = nn.Parameter(torch.tensor(W, dtype=torch.float64))
    optimizer = CrAM([weight], torch.optim.SGD([weight], lr=0.1), rho=0.25, sparsities=(0.5,))
    seen = {}

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.5 * ((weight - TARGET) ** 2).sum()
        loss.backward()
        seen.setdefault("first", weight.detach().clone())
        seen["second"] = weight.detach().clone()
        return loss

    optimizer.step(closure)
    assert close(seen["first"], W)
    assert close(seen["second"], [[0.5, 0.0, 0.35, 0.0]])  # the compressed perturbed point


def test_state_dict_round_trip_resumes_bit_identically():
    def build(seed: int):
        torch.manual_seed(seed)
        net = BNNet()
        base = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return net, CrAM(list(net.parameters()), base, seed=1, model=net)

    def steps(net, optimizer, indices):
        for i in indices:
            g = torch.Generator().manual_seed(i)
            x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
            optimizer.step(functools.partial(_loss, optimizer, net, x, y))

    net, optimizer = build(0)
    steps(net, optimizer, range(4))
    saved = roundtrip({"model": net.state_dict(), "optimizer": optimizer.state_dict()})
    steps(net, optimizer, range(4, 10))
    net2, optimizer2 = build(5)
    net2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    assert optimizer2.steps_taken == 4
    assert "momentum_buffer" in optimizer2.state[next(net2.parameters())]  # shared with the base optimizer
    steps(net2, optimizer2, range(4, 10))
    for (name, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), name


def test_bad_input():
    weight = nn.Parameter(torch.ones(4, 4))
    base = torch.optim.SGD([weight], lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        CrAM([weight], base, rho=-0.1)
    with pytest.raises(ValueError, match=r"sparsities must be in \[0, 1\)"):
        CrAM([weight], base, sparsities=(0.5, 1.0))
    with pytest.raises(ValueError, match="at least one sparsity"):
        CrAM([weight], base, sparsities=())
    with pytest.raises(ValueError, match="mask_type"):
        CrAM([weight], base, mask_type="2-4")
    with pytest.raises(ValueError, match="multiple of 8"):
        CrAM([weight], base, mask_type="2:8")
    with pytest.raises(TypeError, match="constructed torch.optim.Optimizer"):
        CrAM([weight], torch.optim.SGD)
    with pytest.raises(ValueError, match="not trained by base_optimizer"):
        CrAM([weight, nn.Parameter(torch.ones(2, 2))], base)
    optimizer = CrAM([weight], base)
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="written by CrAM.state_dict"):
        optimizer.load_state_dict(base.state_dict())


# ---------------------------------------------------------------------------------------------------- the method
def test_cram_method_is_dense_and_drives_the_wrapper():
    torch.manual_seed(0)
    net = BNNet()
    sparsifier = sparsetrain.create("cram", net, sparsity=0.9, total_steps=10, rho=0.1, sparsities=(0.8,), seed=2)
    assert sparsetrain.Capability.OWN_OPTIMIZER | sparsetrain.Capability.CLOSURE in type(sparsifier).capabilities
    optimizer = sparsifier.make_optimizer(torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    assert isinstance(optimizer, CrAM) and optimizer.model is net and optimizer.rho == 0.1
    assert optimizer.compressed == [net.fc1.weight, net.fc2.weight]
    sparsifier.attach(optimizer)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(3):
        for group in optimizer.param_groups:
            group["lr"] = 0.02  # a trainer's schedule reaches the base optimizer through the wrapper
        optimizer.step(lambda: _loss(optimizer, net, x, y))
    assert sparsifier.count == 3 and optimizer.steps_taken == 3
    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.02
    assert all(bool(m.all()) for m in sparsifier.masks.values())
    assert sparsifier.sparsity().overall == 0.0 and sparsifier.target == 0.9


def _loss(optimizer, net, x, y) -> torch.Tensor:
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss


def test_cram_method_options_are_checked():
    with pytest.raises(ValueError, match="rho"):
        sparsetrain.create("cram", BNNet(), sparsity=0.9, total_steps=10, rho=-1)
    with pytest.raises(ValueError, match="global"):
        sparsetrain.create("cram", BNNet(), sparsity=0.9, total_steps=10, distribution="erk")
    with pytest.raises(ValueError, match="multiple of 4"):
        sparsetrain.create("cram", BNNet(), total_steps=10, mask_type="2:4")  # fc1 has 6 inputs
    nm = sparsetrain.create("cram", BNNet(), total_steps=10, mask_type="2:4", exclude=["fc1.weight"])
    assert nm.target == 0.5


# ---------------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_cram_model_survives_one_shot_pruning_better_than_sgd_on_digits():
    """Measured (seed 0, 10 epochs): dense SGD 98.1 / CrAM 98.6; pruned to 90% and re-calibrated 92.2 / 97.5."""
    import copy

    from sparsetrain.oneshot import prune_oneshot, recalibrate_batchnorm
    from sparsetrain.train.data import iterate_batches, load_dataset
    from sparsetrain.train.loop import evaluate

    splits = load_dataset("digits")
    cpu = torch.device("cpu")
    results = {}
    for kind in ("sgd", "cram"):
        torch.manual_seed(0)
        net = conv_bn_net()
        base = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        optimizer = base if kind == "sgd" else CrAM(list(net.parameters()), base, rho=0.05, model=net)
        for epoch in range(10):
            for x, y in iterate_batches(splits.train, 64, shuffle=True, seed=0, epoch=epoch):
                closure = functools.partial(_loss, optimizer, net, x, y)
                if kind == "sgd":
                    closure()
                    optimizer.step()
                else:
                    optimizer.step(closure)
        pruned = copy.deepcopy(net)
        prune_oneshot(pruned, 0.9)
        recalibrate_batchnorm(pruned, iterate_batches(splits.train, 64, shuffle=True, seed=0), num_samples=1000)
        results[kind] = (evaluate(net, splits.test, 1000, cpu)["acc"], evaluate(pruned, splits.test, 1000, cpu)["acc"])
    assert results["cram"][0] > 96.0, results  # the dense CrAM model is as good as SGD's
    assert results["cram"][1] > 96.0, results
    assert results["cram"][1] >= results["sgd"][1] + 2.0, results


def test_trainer_steps_cram_with_a_closure_and_prunes_after(tmp_path):
    """The trainer hands CrAM a closure, counts both passes, and reports the one-shot pruned, recalibrated model."""
    from sparsetrain.optim import CrAM
    from sparsetrain.train import checkpoint
    from sparsetrain.train.config import resolve
    from sparsetrain.train.loop import Run

    options = dict(dataset="digits", model="resnet20", method="cram", sparsity=0.7, epochs=1, batch_size=64)
    config = resolve(None, dict(options, threads=1, plots=False, progress=False, out=str(tmp_path / "run")))
    run = Run(config)
    summary = run.run()
    assert isinstance(run.optimizer, CrAM) and run.optimizer.steps_taken == run.steps_per_epoch
    assert summary["train_flops_ratio"] == pytest.approx(2.0)  # two forward/backward passes per step
    assert summary["dense_model"]["sparsity"] < 0.01
    assert summary["sparse_model"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    sparse = checkpoint.load(tmp_path / "run" / "sparse_final.pt")["model"]
    dense = checkpoint.load(tmp_path / "run" / "dense_best.pt")["model"]
    # Batch-norm statistics were re-estimated for the pruned network.
    stats = [k for k in sparse if k.endswith("running_mean")]
    assert stats and any(not torch.equal(sparse[k], dense[k]) for k in stats)


class TwoHeads(nn.Module):
    """A trunk and two heads; the loss uses one head only (multi-task models, conditional branches)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.used = nn.Linear(16, 4)
        self.unused = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(torch.relu(self.trunk(x)))


def test_parameters_without_a_gradient_are_neither_compressed_nor_changed():
    torch.manual_seed(0)
    model = TwoHeads()
    optimizer = CrAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), sparsities=(0.9,))
    unused = {n: p.detach().clone() for n, p in model.unused.named_parameters()}
    trunk = model.trunk.weight.detach().clone()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    compressed_points = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        compressed_points.append(model.trunk.weight.detach().clone())
        return loss

    for _ in range(3):
        optimizer.step(closure)
    for name, param in model.unused.named_parameters():
        assert torch.equal(param.detach(), unused[name]), name  # not zeroed by the compression of pass 2
    # The used weights were compressed in pass 2 (global top-k at 90% over the two used weight matrices) ...
    assert (compressed_points[1] == 0).float().mean() > 0.5
    # ... and restored before the step: the trunk moved by an SGD step only, it has no zeros.
    assert not torch.equal(model.trunk.weight.detach(), trunk) and bool((model.trunk.weight != 0).all())
