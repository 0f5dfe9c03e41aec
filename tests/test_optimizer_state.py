"""Optimizer state across mask changes: second moments kept for re-entry (AC/DC, GaP), every slot of a RigL/SET
grown weight zeroed, AC/DC's momentum reset for every parameter (or only the sparsified ones)."""

from __future__ import annotations

import pytest
import torch
from helpers.shared import roundtrip
from torch import nn

import sparsetrain
from sparsetrain.optim_state import SECOND_MOMENT_KEYS, per_element_buffers


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def step(model, optimizer, g: torch.Generator) -> None:
    x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


@pytest.fixture
def one_thread():
    """Thousands of tiny steps: on a busy machine, thread hand-offs cost 100x the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_adam_reentering_weight_takes_an_ordinary_first_step(one_thread):
    """AC/DC with Adam: a weight re-entering at a decompression used to step 3.16 lr (its exp_avg_sq zeroed while
    the bias correction was ~1: (1 - beta1) / sqrt(1 - beta2)); it now steps on its kept second moment."""
    warmup, compressed = 2500, 300  # long enough for Adam's bias correction to be ~1 (1 - 0.999^2500 = 0.92)
    model = tiny_mlp()
    lr = 1e-3
    sparsifier = sparsetrain.create(
        "acdc", model, sparsity=0.8, total_steps=warmup + 2 * compressed + 50, unit="steps",
        warmup=warmup, compressed=compressed, decompressed=compressed, final=50,
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sparsifier.attach(optimizer)
    g = torch.Generator().manual_seed(0)
    at_compression = {}

    def remember(event):  # sent before the masks change: the dense model's second moments
        if event["event"] == "phase_end" and event["phase"] == "dense":
            for name, param in sparsifier.params.items():
                at_compression[name] = optimizer.state[param]["exp_avg_sq"].clone()

    sparsifier.subscribe(remember)
    while sparsifier.count < warmup + compressed:
        pruned = {n: ~m for n, m in sparsifier.masks.items()}
        step(model, optimizer, g)
    assert sparsifier.phase == "dense" and all(bool(m.all()) for m in sparsifier.masks.values())
    for name, param in sparsifier.params.items():
        # Back exactly as they were at the compression, not decayed by 0.999^300 nor zeroed.
        buffer = optimizer.state[param]["exp_avg_sq"]
        assert torch.equal(buffer[pruned[name]], at_compression[name][pruned[name]])
        assert torch.count_nonzero(buffer[pruned[name]]) == int(pruned[name].sum())
    before = {n: p.detach().clone() for n, p in sparsifier.params.items()}
    step(model, optimizer, g)
    reentered = torch.cat([((p.detach() - before[n]).abs() / lr)[pruned[n]] for n, p in sparsifier.params.items()])
    moved = reentered[reentered > 0]  # weights of dead ReLU units get no gradient and do not move
    assert moved.numel() > 20
    # Measured: median 0.04 lr, largest 0.37 lr; before, every moving re-entering weight stepped 3.06 lr.
    assert float(moved.median()) < 0.5, f"re-entering weights step {float(moved.median()):.2f} lr"
    assert float(moved.max()) < 1.0


def test_second_moments_survive_a_resume_between_compression_and_reentry():
    def build():
        model = tiny_mlp()
        sparsifier = sparsetrain.create(
            "acdc", model, sparsity=0.8, total_steps=40, unit="steps", warmup=5, compressed=10, decompressed=10,
            final=10,
        )  # fmt: skip
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        sparsifier.attach(optimizer)
        return model, optimizer, sparsifier

    model, optimizer, sparsifier = build()
    g = torch.Generator().manual_seed(0)
    for _ in range(8):  # inside the compressed phase 5-15
        step(model, optimizer, g)
    assert sparsifier.phase == "sparse"
    saved = roundtrip(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "sparsifier": sparsifier.state_dict()}
    )
    assert set(saved["sparsifier"]["second_moments"]) == set(sparsifier.params)
    assert set(saved["sparsifier"]["second_moments"]["0.weight"]) == {"exp_avg_sq"}
    model2, optimizer2, sparsifier2 = build()
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    g2 = torch.Generator().set_state(g.get_state())
    for _ in range(10):  # across the decompression at 15
        step(model, optimizer, g)
        step(model2, optimizer2, g2)
    assert sparsifier.phase == "dense"
    assert sparsifier.state_dict()["second_moments"] == {}  # all re-entered: nothing held
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_rigl_and_set_zero_every_slot_of_grown_weights(method):
    """RigL's reference zeroes all optimizer slots of a grown weight, second moments included."""
    model = tiny_mlp()
    sparsifier = sparsetrain.create(method, model, sparsity=0.7, total_steps=40, unit="steps", delta=5, t_end=30)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsifier.attach(optimizer)
    g = torch.Generator().manual_seed(0)
    grown_seen = 0
    while sparsifier.count < 30:
        update_next = sparsifier.is_update_step(sparsifier.count)
        before = {n: m.clone() for n, m in sparsifier.masks.items()}
        step(model, optimizer, g)  # on an update step the mask changes before it and the step itself is skipped
        if not update_next:
            continue
        for name, param in sparsifier.params.items():
            grown = sparsifier.masks[name] & ~before[name]
            grown_seen += int(grown.sum())
            for key, buffer in per_element_buffers(optimizer, param).items():
                assert torch.all(buffer[grown] == 0), f"{key} of grown weights in {name}"
    assert grown_seen > 0


# ------------------------------------------------------------------------------------ AC/DC's momentum reset
class WithNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def acdc_through_first_decompression(**options):
    model = WithNorm()
    sparsifier = sparsetrain.create(
        "acdc", model, sparsity=0.8, total_steps=40, unit="steps", warmup=4, compressed=4, decompressed=4, final=10,
        **options,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    g = torch.Generator().manual_seed(0)
    while sparsifier.count < 8:  # decompression at 8
        step(model, optimizer, g)
    assert sparsifier.phase == "dense"
    momentum = {n: optimizer.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    return sparsifier, momentum


@pytest.mark.parametrize("options", [{}, {"reset_momentum": "all"}, {"reset_momentum": True}])
def test_acdc_decompression_resets_every_momentum_buffer_by_default(options):
    """As the official code: biases and batch norm too, not only the sparsified weights."""
    _, momentum = acdc_through_first_decompression(**options)
    for name, buffer in momentum.items():
        assert torch.count_nonzero(buffer) == 0, name


def test_acdc_can_reset_only_the_sparsified_weights():
    sparsifier, momentum = acdc_through_first_decompression(reset_momentum="sparsified")
    for name, buffer in momentum.items():
        if name in sparsifier.params:
            assert torch.count_nonzero(buffer) == 0, name
        else:
            assert torch.count_nonzero(buffer) > 0, name  # fc1.bias, norm.weight, norm.bias, fc2.bias


def test_acdc_reset_momentum_rejects_other_values():
    with pytest.raises(ValueError, match="'all', 'sparsified' or false") as info:
        sparsetrain.create("acdc", WithNorm(), sparsity=0.8, total_steps=40, reset_momentum="weights")
    assert "'weights'" in str(info.value)


def test_second_moment_keys_cover_the_torch_optimizers():
    """Every per-element buffer of the torch optimizers is either a first moment (zeroed at masks) or listed."""
    first_moments = {"momentum_buffer", "exp_avg", "grad_avg", "prev", "ax"}
    optimizers = [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax,
                  torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.Rprop, torch.optim.ASGD]
    for factory in optimizers:
        param = nn.Parameter(torch.randn(3, 4))
        optimizer = factory([param], lr=0.01)
        param.grad = torch.randn(3, 4)
        optimizer.step()
        for key in per_element_buffers(optimizer, param):
            assert key in SECOND_MOMENT_KEYS or key in first_moments, f"{factory.__name__}: {key}"
