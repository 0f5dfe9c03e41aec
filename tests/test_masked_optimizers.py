"""MaskedSGD and MaskedAdamW: torch's SGD and AdamW with the sparsifier's gradient masking inside their compiled
update."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers.shared import assert_masked_plus_zero
from torch import nn

import sparsetrain
from sparsetrain.optim import MaskedAdamW, MaskedSGD
from sparsetrain.optim import masked as masked_module

SETTINGS = [
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(momentum=0.0, weight_decay=1e-3, maximize=True),
    dict(momentum=0.5),
]
# (torch optimizer, masked optimizer, torch's settings, the masked one's extra settings)
PAIRS = [(torch.optim.SGD, MaskedSGD, settings, {}) for settings in SETTINGS] + [
    (torch.optim.AdamW, MaskedAdamW, dict(lr=0.01, weight_decay=0.05), {}),
    (torch.optim.AdamW, MaskedAdamW, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, maximize=True), {}),
    (torch.optim.Adam, MaskedAdamW, dict(lr=0.01, weight_decay=1e-3), dict(decoupled_weight_decay=False)),
]
PAIR_IDS = [f"{masked.__name__}-{i}" for i, (_, masked, _, _) in enumerate(PAIRS)]


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))


def batches(steps: int, start: int = 0):
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)
        yield torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)


def train(model, optimizer, steps: int, start: int = 0, poison: dict | None = None) -> None:
    for x, y in batches(steps, start):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        for name, where in (poison or {}).items():  # NaN and inf in the gradients of masked weights
            grad = model.get_parameter(name).grad
            grad[where] = torch.where(torch.rand(grad[where].shape) < 0.5, float("nan"), float("inf"))
        optimizer.step()


def gmp_run(optimizer_type, settings: dict, **options):
    model = mlp()
    optimizer = optimizer_type(model.parameters(), **{"lr": 0.05, **settings})
    sparsifier = sparsetrain.create("gmp", model, sparsity=0.8, total_steps=30, unit="steps", start=0, end=12,
                                    frequency=3, **options)  # fmt: skip
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


@pytest.mark.parametrize("torch_type, masked_type, settings, extra", PAIRS, ids=PAIR_IDS)
def test_without_masks_it_is_the_torch_optimizer_bit_for_bit(torch_type, masked_type, settings, extra):
    a, b = mlp(), mlp()
    reference = torch_type(a.parameters(), **{"lr": 0.05, **settings})
    masked = masked_type(b.parameters(), **{"lr": 0.05, **settings, **extra})
    train(a, reference, 6)
    train(b, masked, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # The same state: checkpoints move between the two.
    restored = masked_type(mlp().parameters(), **{"lr": 0.05, **settings, **extra})
    restored.load_state_dict(reference.state_dict())
    assert str(restored.state_dict()["state"]) == str(reference.state_dict()["state"])
    train(b, restored, 1, start=6)  # and it steps from it


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("torch_type, masked_type, settings, extra", PAIRS, ids=PAIR_IDS)
def test_with_a_sparsifier_it_trains_as_the_torch_optimizer_and_skips_the_gradient_pass(
    torch_type, masked_type, settings, extra, compiled, monkeypatch
):
    """The same masks and weights as the torch optimizer under the same sparsifier (to rounding: the kernel may
    fuse multiply-adds), masked weights +0.0 after every step (enforce='check' asserts it), no re-zeroing pass
    after the first step, and no gradient pass: the .grad tensors keep their masked entries."""
    if not compiled:
        monkeypatch.setattr(masked_module._SGD_UPDATE, "failed", True)
        monkeypatch.setattr(masked_module._ADAM_UPDATE, "failed", True)
    reference, ref_opt, ref_sparsifier = gmp_run(torch_type, settings, enforce="check")
    model, optimizer, sparsifier = gmp_run(masked_type, {**settings, **extra}, enforce="check")
    train(reference, ref_opt, 20)
    train(model, optimizer, 20)
    assert sparsifier._masks_handed_to is optimizer
    assert sparsifier.enforcement == ref_sparsifier.enforcement
    assert sparsifier.enforcement["skipped"] > 0
    assert_masked_plus_zero(sparsifier)
    for name in sparsifier.params:
        assert torch.equal(sparsifier.masks[name], ref_sparsifier.masks[name])
        grad = sparsifier.params[name].grad
        assert bool((grad[~sparsifier.masks[name]] != 0).any())  # left as backward wrote it
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for p, q in zip(reference.parameters(), model.parameters()):
        for key, buffer in ref_opt.state[p].items():
            if buffer is not None:
                torch.testing.assert_close(optimizer.state[q][key], buffer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked_type, settings", [(MaskedSGD, SETTINGS[0]), (MaskedAdamW, PAIRS[-3][2])])
def test_nan_and_inf_in_masked_gradients_never_reach_weights_or_optimizer_state(masked_type, settings):
    model, optimizer, sparsifier = gmp_run(masked_type, settings, enforce="check")
    train(model, optimizer, 13)  # the masks are final from step 12
    poison = {name: ~mask for name, mask in sparsifier.masks.items()}
    train(model, optimizer, 5, start=13, poison=poison)
    assert_masked_plus_zero(sparsifier)
    for param in model.parameters():
        assert torch.isfinite(param).all()
        assert all(torch.isfinite(buffer).all() for buffer in optimizer.state[param].values())


@pytest.mark.parametrize("masked_type, settings", [(MaskedSGD, SETTINGS[0]), (MaskedAdamW, PAIRS[-3][2])])
def test_resume_continues_bit_identically(masked_type, settings):
    model, optimizer, sparsifier = gmp_run(masked_type, settings)
    train(model, optimizer, 8)
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "sparsifier": sparsifier.state_dict()})  # fmt: skip
    train(model, optimizer, 10, start=8)
    resumed, resumed_opt, resumed_sparsifier = gmp_run(masked_type, settings)
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    resumed_sparsifier.load_state_dict(saved["sparsifier"])
    train(resumed, resumed_opt, 10, start=8)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_detach_takes_the_masks_back_and_packed_masks_or_mfac_keep_the_gradient_pass():
    model, optimizer, sparsifier = gmp_run(MaskedSGD, SETTINGS[0])
    train(model, optimizer, 4)
    assert len(optimizer._step_masks) == 2
    sparsifier.detach()
    assert optimizer._step_masks == {} and sparsifier._masks_handed_to is None
    # Packed masks are read bit by bit by the sparsifier's own pass, never handed over.
    model, optimizer, sparsifier = gmp_run(MaskedSGD, SETTINGS[0], mask_storage="packed", enforce="check")
    train(model, optimizer, 14)
    assert optimizer._step_masks == {} and sparsifier._masks_handed_to is None
    assert_masked_plus_zero(sparsifier)
    # M-FAC records the masked gradients from .grad: it masks them itself.
    model = mlp()
    optimizer = MaskedSGD(model.parameters(), lr=0.05, momentum=0.9)
    mfac = sparsetrain.create("mfac", model, sparsity=0.5, total_steps=20, ngrads=4).attach(optimizer)
    train(model, optimizer, 3)
    assert optimizer._step_masks == {} and mfac._masks_handed_to is None


def test_a_kernel_that_cannot_be_built_falls_back_to_the_eager_update_with_one_warning(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fail

    monkeypatch.setattr(masked_module, "_SGD_UPDATE", masked_module._CompiledUpdate(masked_module._masked_sgd_update))
    monkeypatch.setattr(torch, "compile", no_compiler)
    reference, ref_opt, ref_sparsifier = gmp_run(torch.optim.SGD, SETTINGS[0])
    model, optimizer, sparsifier = gmp_run(MaskedSGD, SETTINGS[0], enforce="check")
    with caplog.at_level(logging.WARNING, logger="sparsetrain.optim.masked"):
        train(model, optimizer, 15)
    train(reference, ref_opt, 15)
    warnings = [r.getMessage() for r in caplog.records if "masked update" in r.getMessage()]
    assert len(warnings) == 1 and "No working C++ compiler" in warnings[0]
    assert_masked_plus_zero(sparsifier)
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_masks_of_the_wrong_shape_or_type_are_refused():
    model = mlp()
    optimizer = MaskedSGD(model.parameters(), lr=0.1)
    weight = model[0].weight
    with pytest.raises(ValueError, match=r"boolean mask of the parameter's shape \(32, 12\); got torch.bool of "
                                         r"shape \(12, 32\)"):  # fmt: skip
        optimizer.use_masks({weight: torch.ones(12, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="got torch.float32"):
        optimizer.use_masks({weight: torch.ones(32, 12)})


def test_masked_adamw_refuses_a_group_with_amsgrad_by_name():
    model, optimizer, _ = gmp_run(MaskedAdamW, dict(lr=0.01))
    optimizer.param_groups[0]["amsgrad"] = True  # as a loaded state or an added group could bring it
    with pytest.raises(ValueError, match="MaskedAdamW does not take amsgrad .* use torch.optim.AdamW"):
        train(model, optimizer, 1)


def test_non_contiguous_and_half_precision_weights_take_their_own_update():
    """A transposed (non-contiguous) weight runs its eager update alone, a bfloat16 one its own batch (its own
    scalars): both match torch's SGD under the same sparsifier, masked entries +0.0."""
    def model_with_odd_weights() -> nn.Module:
        model = mlp()
        with torch.no_grad():
            model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())  # (32, 12), strides (1, 32)
            model[2].to(torch.bfloat16)
        return model

    def run(optimizer_type):
        model = model_with_odd_weights()
        optimizer = optimizer_type(model.parameters(), lr=0.05, momentum=0.9)
        sparsifier = sparsetrain.create("magnitude", model, sparsity=0.75, total_steps=10, unit="steps", at=0,
                                        enforce="check").attach(optimizer)  # fmt: skip
        for x, y in batches(6):
            optimizer.zero_grad()
            hidden = torch.relu(model[0](x)).to(torch.bfloat16)
            nn.functional.cross_entropy(model[2](hidden).float(), y).backward()
            optimizer.step()
        return model, sparsifier

    assert not model_with_odd_weights()[0].weight.is_contiguous()
    reference, _ = run(torch.optim.SGD)
    model, sparsifier = run(MaskedSGD)
    assert_masked_plus_zero(sparsifier)
    for p, q in zip(reference.parameters(), model.parameters()):
        assert q.dtype == p.dtype
        torch.testing.assert_close(q, p, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-6)
