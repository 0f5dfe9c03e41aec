"""Conformance suite: every registered method x {SGD Nesterov + wd, Adam, AdamW} x {MLP, conv net}.

The contracts of docs/contracts.md, checked on real training steps:
masked weights exactly zero after every step, exact zero counts after every mask update (ties included),
bit-identical resume across phase boundaries, GradScaler-skipped steps change nothing, no optimizer state in
masked weights, explicit ``step()`` equal to the attached hooks, N:M groups, the timeline agreeing with the phase,
a method's own optimizer required, momentum zero after decompression. Which methods a test runs over is chosen
by their declared ``Capability`` flags (and ``needs_attach``), never by name. A newly registered method joins
automatically; ``SCHEDULES`` only shortens its timeline.
"""

from __future__ import annotations

import pytest
import torch
from helpers.shared import roundtrip
from torch import nn

import sparsetrain
from sparsetrain.core import Capability
from sparsetrain.core.registry import get_method
from sparsetrain.distributions import erk, layer_sparsities
from sparsetrain.maskops import keep_count
from sparsetrain.optim_state import SECOND_MOMENT_KEYS, per_element_buffers

TOTAL = 30
# Short timelines (in steps) with several mask updates and phase boundaries inside TOTAL steps.
# AC/DC: dense 0-4, sparse 4-8, dense 8-12, sparse 12-16, dense 16-24, sparse 24-30.
SCHEDULES = {
    "acdc": dict(unit="steps", warmup=4, compressed=4, decompressed=4, final=6),
    "gmp": dict(unit="steps", start=2, end=14, frequency=3),
    "mfac": dict(unit="steps", start=2, end=14, frequency=3, ngrads=2),  # gmp's, recording the 2 steps before each
    "magnitude": dict(unit="steps", at=5),
    "rigl": dict(unit="steps", delta=3, t_end=20),
    "set": dict(unit="steps", delta=3, t_end=20),
    "gap": dict(unit="steps", groups=3, rounds=2, period=4),  # rotations at 4, 8, ..., fine-tune from 24
    "imp": dict(unit="steps", rounds=3, pretrain=6),  # rounds start at 6, 14, 22
    "pgap": dict(unit="steps", period=5, rounds=2),  # one process: a cyclic GaP with 2 groups, merges at 5, 10
    "rda": dict(unit="steps", finish=20, lam=1e-3),  # the penalty zeroes weights from the start; top-k at 20
    "cram": dict(sparsities=(0.5, 0.9)),
    "oto": dict(unit="steps", n_p=5, finish=20, lam=1.0),  # half-space steps zero groups from step 5
    # gates that die before the prune to target: a strong prior towards z = 0 (few samples, pi = 0.05)
    "variational": dict(unit="steps", finish=20, threshold=0.45, gate_init=0.5, num_samples=10, prior_keep=0.05),
}
METHODS = sparsetrain.list_methods()


def methods_with(flag: Capability) -> list[str]:
    """The registered methods that declare ``flag``."""
    return [m for m in METHODS if flag in get_method(m).capabilities]


SCALE_KEYS = (*SECOND_MOMENT_KEYS, "T")
# Methods that keep masks on the weights (the others train dense: masks stay all ones).
MASKING = methods_with(Capability.SPARSE)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


MODELS = {"mlp": (mlp, (16,)), "conv": (SmallConv, (2, 8, 8))}
OPTIMIZERS = {
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
    # the masks applied inside the optimizer's compiled update instead of a pass over the gradients
    "masked_sgd": lambda p, lr: sparsetrain.optim.MaskedSGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "masked_adamw": lambda p, lr: sparsetrain.optim.MaskedAdamW(p, lr=lr, weight_decay=0.01),
}


def build(method, model_name="mlp", opt_name="sgd", sparsity=0.9, lr=0.05, seed=0, **extra):
    factory, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = factory()
    # Methods that prune whole groups only (oto) find them on example_input; the others ignore it.
    options = {"example_input": torch.zeros(1, *shape), **SCHEDULES.get(method, {}), **extra}
    sparsifier = sparsetrain.create(method, model, sparsity=sparsity, total_steps=TOTAL, **options)
    # rda replaces the optimizer with its own, cram wraps it; the others return it unchanged.
    optimizer = sparsifier.wrap_optimizer(OPTIMIZERS[opt_name](model.parameters(), lr))
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier, shape


def batch(step: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, *shape, generator=g), torch.randint(0, 4, (8,), generator=g)


def train_step(model, optimizer, step, shape):
    x, y = batch(step, shape)

    def closure():  # torch optimizers accept one; CrAM needs it (it evaluates the loss twice)
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)


def expected_zeros(sparsifier, target: float) -> int:
    """Zero count a mask update must produce, computed from the definitions, not the implementation."""
    shapes = {n: tuple(p.shape) for n, p in sparsifier.params.items()}
    sizes = {n: p.numel() for n, p in sparsifier.params.items()}
    if target == 0:
        return 0
    if sparsifier.nm is not None:
        n, m = sparsifier.nm
        return sum(size // m * (m - n) for size in sizes.values())
    if sparsifier.distribution == "global":
        total = sum(sizes.values())
        return total - keep_count(total, target)
    if sparsifier.distribution == "uniform":
        return sum(size - keep_count(size, target) for size in sizes.values())
    per_layer = erk(shapes, target)
    return sum(sizes[n] - keep_count(sizes[n], per_layer[n]) for n in sizes)


def assert_exact_counts(sparsifier) -> None:
    """Zero counts after a mask update; GaP's one dense group aside, every layer is at its exact count."""
    if sparsifier.channel_groups is not None:  # methods that prune whole groups only: counted in groups
        assert pruned_groups(sparsifier) == expected_pruned_groups(sparsifier, sparsifier.target_sparsity)
        return
    if Capability.GROUP_PHASES in type(sparsifier).capabilities:
        shapes = {n: tuple(p.shape) for n, p in sparsifier.params.items()}
        per_layer = layer_sparsities(sparsifier.distribution, shapes, sparsifier.final_sparsity)
        dense = 0
        for name, mask in sparsifier.masks.items():
            zeros, n = int((~mask).sum()), mask.numel()
            assert zeros in (0, n - keep_count(n, per_layer[name])), name
            dense += zeros == 0
        assert dense >= (1 if sparsifier.phase != "sparse" else 0)
        return
    assert mask_zeros(sparsifier) == expected_zeros(sparsifier, sparsifier.target_sparsity)


def mask_zeros(sparsifier) -> int:
    return sum(int((~m).sum()) for m in sparsifier.masks.values())


def assert_masked_weights_zero(sparsifier):
    for name, param in sparsifier.params.items():
        masked = param.detach()[~sparsifier.masks[name]]
        assert torch.all(masked == 0), f"{name}: {int((masked != 0).sum())} masked weights are nonzero"
        # +0.0, not -0.0: an export stores zeros without sign bits only if they are all positive.
        assert not torch.signbit(masked).any(), f"{name}: {int(torch.signbit(masked).sum())} masked weights are -0.0"


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_masked_weights_exactly_zero_and_counts_exact(method, opt_name, model_name):
    model, optimizer, sparsifier, shape = build(method, model_name, opt_name)
    updates = 0
    version = sparsifier.mask_version
    for step in range(TOTAL):
        train_step(model, optimizer, step, shape)
        assert sparsifier.count == step + 1
        assert_masked_weights_zero(sparsifier)
        if sparsifier.mask_version != version:
            version = sparsifier.mask_version
            updates += 1
            assert_exact_counts(sparsifier)
    if Capability.SPARSE in type(sparsifier).capabilities and sparsifier.channel_groups is not None:
        assert pruned_groups(sparsifier) == expected_pruned_groups(sparsifier, 0.9)
    elif Capability.SPARSE in type(sparsifier).capabilities:
        assert sparsifier.sparsity().overall >= 0.9 - 1e-3
        assert mask_zeros(sparsifier) == expected_zeros(sparsifier, 0.9)
    else:
        assert sparsifier.sparsity().overall < 0.05
    if Capability.MASK_UPDATES in type(sparsifier).capabilities:
        assert updates >= 1


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98])
@pytest.mark.parametrize("method", METHODS)
def test_exact_counts_with_all_equal_weights(method, sparsity):
    """Ties everywhere: a threshold rule would keep all or nothing; top-k by index keeps exactly k."""
    torch.manual_seed(0)
    model = mlp()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    example = torch.zeros(1, 16)
    sparsifier = sparsetrain.create(
        method, model, sparsity=sparsity, total_steps=TOTAL, example_input=example, **SCHEDULES.get(method, {})
    )
    # lr 0 keeps every weight tied. RDA refuses lr 0; at 1e-12 its steps stay below half an ulp of 0.5.
    lr = 1e-12 if method == "rda" else 0.0
    optimizer = sparsifier.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=lr))
    sparsifier.attach(optimizer)
    checked = 0
    for step in range(TOTAL):
        train_step(model, optimizer, step, (16,))
        target = sparsifier.target_sparsity
        assert_exact_counts(sparsifier)
        checked += target > 0
        # (In a dense phase, a grown GaP group or after RigL/SET growth, lr 0 leaves regrown weights at 0.)
        if sparsifier.channel_groups is not None:
            continue  # whole groups: counted by assert_exact_counts
        if target > 0 and not (Capability.GROUP_PHASES | Capability.DROP_GROW) & type(sparsifier).capabilities:
            zeros_in_weights = sum(int((p == 0).sum()) for p in sparsifier.params.values())
            assert zeros_in_weights == expected_zeros(sparsifier, target)
    if Capability.SPARSE in type(sparsifier).capabilities and sparsity > 0:
        assert checked > 0


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_bit_identical(method, opt_name):
    split = 10  # AC/DC's boundaries at 12, 16 and 24 lie after the split
    model, optimizer, sparsifier, shape = build(method, "conv", opt_name)
    for step in range(TOTAL):
        if step == split:
            saved = roundtrip(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparsifier": sparsifier.state_dict(),
                }
            )
        train_step(model, optimizer, step, shape)

    # A fresh process: different initial weights; build model, optimizer and sparsifier as for a new run (the
    # sparsifier's step-0 masks touch only the fresh weights), then restore all three from the checkpoint.
    model2, optimizer2, sparsifier2, _ = build(method, "conv", opt_name, seed=123)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    boundaries_after_split = 0
    for step in range(split, TOTAL):
        before = sparsifier2.phase
        train_step(model2, optimizer2, step, shape)
        boundaries_after_split += sparsifier2.phase != before
    if Capability.PHASES in get_method(method).capabilities:  # acdc: boundaries at 12, 16 and 24
        assert boundaries_after_split >= 2
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert sparsifier2.count == sparsifier.count
    assert all(torch.equal(sparsifier.masks[n], sparsifier2.masks[n]) for n in sparsifier.masks)
    assert sparsifier2.history == sparsifier.history


@pytest.mark.parametrize("method", [m for m in METHODS if Capability.CLOSURE not in get_method(m).capabilities])
def test_step_skipped_by_gradscaler_changes_nothing(method):
    # GradScaler cannot drive a step that needs a closure (cram): the trainer refuses amp with those on cuda.
    model, optimizer, sparsifier, shape = build(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        train_step(model, optimizer, step, shape)
    count, masks = sparsifier.count, {n: m.clone() for n, m in sparsifier.masks.items()}
    weights = [p.detach().clone() for p in model.parameters()]
    history_length = len(sparsifier.history)

    x, y = batch(99, shape)
    optimizer.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # inf gradients: the step is skipped
    scaler.update()
    assert scaler.get_scale() < 2.0**10, "the scaler did not see the inf gradients"
    assert sparsifier.count == count
    assert all(torch.equal(masks[n], sparsifier.masks[n]) for n in masks)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert len(sparsifier.history) == history_length

    # A finite step through the scaler counts.
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(optimizer)
    assert sparsifier.count == count + 1


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_acdc_decompression_resets_momentum_and_regrows_at_zero(opt_name):
    model, optimizer, sparsifier, shape = build("acdc", "mlp", opt_name)
    while sparsifier.count < 8:  # phases: dense 0-4, sparse 4-8, dense from 8
        pruned = {n: ~m.clone() for n, m in sparsifier.masks.items()}
        train_step(model, optimizer, sparsifier.count, shape)
    assert sparsifier.phase == "dense"
    assert all(bool(m.all()) for m in sparsifier.masks.values())
    for name, param in sparsifier.params.items():
        assert torch.all(param.detach()[pruned[name]] == 0), "pruned weights must re-enter at 0"
        buffers = per_element_buffers(optimizer, param)
        momentum = buffers.get("momentum_buffer", buffers.get("exp_avg"))
        assert momentum is not None and torch.count_nonzero(momentum) == 0
    # Adam's second moment is kept: zeroing it would inflate the next update.
    if "adam" in opt_name:
        assert any(
            torch.count_nonzero(per_element_buffers(optimizer, p)["exp_avg_sq"]) for p in sparsifier.params.values()
        )


def test_acdc_momentum_reset_can_be_switched_off():
    model, optimizer, sparsifier, shape = build("acdc", reset_momentum=False)
    while sparsifier.count < 8:
        train_step(model, optimizer, sparsifier.count, shape)
    buffers = [per_element_buffers(optimizer, p)["momentum_buffer"] for p in sparsifier.params.values()]
    assert any(torch.count_nonzero(b) for b in buffers)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", MASKING)
def test_no_optimizer_state_leaks_into_masked_weights(method, opt_name):
    """After every step with a target above 0, masked weights and their optimizer buffers are exactly 0.

    Buffers that only scale a step are exempt: second moments (kept for re-entry: with a zero first moment they
    move nothing) and RDA's accumulated penalty weights ``T`` (they multiply lam, which is 0 after its prune).
    While the target is 0 (a dense phase, or RDA's masks observing the weights before its prune) masks are not
    enforced.
    """
    model, optimizer, sparsifier, shape = build(method, "mlp", opt_name)
    checked = 0
    for step in range(TOTAL):
        train_step(model, optimizer, step, shape)
        if sparsifier.target_sparsity == 0:
            continue
        checked += 1
        for name, param in sparsifier.params.items():
            masked = ~sparsifier.masks[name]
            for key, buffer in per_element_buffers(optimizer, param).items():
                if key in SCALE_KEYS:
                    continue
                assert torch.all(buffer[masked] == 0), f"step {step}: {key} of {name} leaked into masked weights"
            assert torch.all(param[masked] == 0)
    assert checked > 0


# Methods whose work fits after the optimizer step: the others (needs_attach) read the step's gradients before it.
STEPPABLE = [m for m in MASKING if not get_method(m).needs_attach]


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", STEPPABLE)
def test_explicit_step_matches_attached_hooks(method, opt_name):
    """``sparsifier.step()`` after ``optimizer.step()`` gives the same weights and masks as the attached hooks.

    Not with Adam-like optimizers for GROUP_PHASES methods: their layers are pruned at step 0, before the optimizer
    has any state to record, and without the pre-step hook the masked weights' second moments take their
    gradients until the layer regrows (the hooks leave them at 0).
    """
    if opt_name != "sgd" and Capability.GROUP_PHASES in get_method(method).capabilities:
        pytest.skip("second moments of weights masked from step 0 differ without the pre-step hook")
    model_a, opt_a, sparsifier_a, shape = build(method, "mlp", opt_name)
    for step in range(TOTAL):
        train_step(model_a, opt_a, step, shape)
    torch.manual_seed(0)
    model_b = mlp()
    example = torch.zeros(1, 16)
    sparsifier_b = sparsetrain.create(
        method, model_b, sparsity=0.9, total_steps=TOTAL, example_input=example, **SCHEDULES.get(method, {})
    )
    opt_b = sparsifier_b.wrap_optimizer(OPTIMIZERS[opt_name](model_b.parameters(), 0.05))
    for step in range(TOTAL):
        train_step(model_b, opt_b, step, shape)
        sparsifier_b.step(opt_b)
    assert sparsifier_b.count == sparsifier_a.count == TOTAL
    assert all(torch.equal(sparsifier_a.masks[n], sparsifier_b.masks[n]) for n in sparsifier_a.masks)
    # With the hooks a masked optimizer steps through its compiled kernel; called by hand (not attached, no masks
    # handed over) it takes torch's own update: the two round differently (~1e-6 after 24 Adam steps).
    atol = 1e-5 if opt_name.startswith("masked") else 1e-6
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(a, b, atol=atol, rtol=0)


def test_phase_end_event_sees_the_dense_model_before_pruning():
    model, optimizer, sparsifier, shape = build("acdc")
    seen = []

    def listener(event):
        if event["event"] == "phase_end" and event["phase"] == "dense":
            seen.append(
                (event["step"], sparsifier.sparsity().overall, all(bool(m.all()) for m in sparsifier.masks.values()))
            )

    sparsifier.subscribe(listener)
    for step in range(TOTAL):
        train_step(model, optimizer, step, shape)
    assert [s for s, _, _ in seen] == [4, 12, 24]
    assert all(dense_masks and sparsity < 0.5 for _, sparsity, dense_masks in seen)
    compress = [e for e in sparsifier.history if e["event"] == "compress"]
    assert [e["step"] for e in compress] == [4, 12, 24]
    assert compress[0]["mask_difference_pct"] is None
    assert all(0 <= e["mask_difference_pct"] <= 100 for e in compress[1:])


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", methods_with(Capability.NM))
def test_nm_masks(method, model_name):
    """With mask_type '2:4', every group of 4 along the input dimension keeps exactly 2 whenever a target is set."""
    # The conv net's first layer has 2 input channels, not a multiple of 4: left dense.
    exclude = ["conv1.weight"] if model_name == "conv" else None
    model, optimizer, sparsifier, shape = build(method, model_name, sparsity=None, mask_type="2:4", exclude=exclude)
    assert sparsifier.final_sparsity == 0.5
    checked = 0
    for step in range(TOTAL):
        train_step(model, optimizer, step, shape)
        if sparsifier.target_sparsity == 0:
            continue
        checked += 1
        for name, mask in sparsifier.masks.items():
            groups = mask.movedim(1, -1).reshape(-1, 4)
            assert torch.all(groups.sum(1) == 2), (step, name)
            assert torch.all(sparsifier.params[name].detach().movedim(1, -1).reshape(-1, 4)[~groups] == 0)
    assert checked > 0
    assert sparsifier.sparsity().overall >= 0.5


# A method that prunes after training takes mask_type for that prune, not for masks during training.
@pytest.mark.parametrize("method", [m for m in METHODS if m not in methods_with(Capability.NM)
                                    and m not in methods_with(Capability.PRUNE_AFTER_TRAINING)])  # fmt: skip
def test_nm_masks_refused_without_the_flag(method):
    with pytest.raises(ValueError, match="N:M"):
        build(method, sparsity=None, mask_type="2:4")


@pytest.mark.parametrize("method", METHODS)
def test_timeline_agrees_with_phase_at(method):
    """The timeline tiles the run, and every step lies in the interval of its own phase."""
    _, _, sparsifier, _ = build(method)
    timeline = sparsifier.timeline()
    assert timeline[0].start == 0 and timeline[-1].end == TOTAL
    assert all(a.end == b.start for a, b in zip(timeline, timeline[1:]))
    for phase in timeline:
        for step in range(phase.start, phase.end):
            assert sparsifier.phase_at(step) == phase.kind, (step, phase)


@pytest.mark.parametrize("method", METHODS)
def test_own_optimizer_is_required_exactly_when_declared(method):
    model = mlp()
    sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=TOTAL, example_input=torch.zeros(1, 16),
                                    **SCHEDULES.get(method, {}))  # fmt: skip
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    if Capability.OWN_OPTIMIZER in type(sparsifier).capabilities:
        assert sparsifier.wrap_optimizer(plain) is not plain
        with pytest.raises(ValueError, match="wrap_optimizer"):
            sparsifier.attach(plain)
    else:
        assert sparsifier.wrap_optimizer(plain) is plain
        sparsifier.attach(plain)


# ------------------------------------------------------------------------------------------ channel masks
def pruned_groups(sparsifier) -> int:
    """Groups whose every parameter slice is masked; asserts that no group is masked only in part."""
    pruned = 0
    for group in sparsifier.channel_groups:
        states = {bool(piece.of(sparsifier.masks[piece.name]).any()) for piece in group.params}
        producing = {bool(piece.of(sparsifier.masks[piece.name]).any()) for piece in group.zero_invariant}
        assert producing != {True, False}, f"{group.name} is masked in part"
        pruned += producing == {False}
        if producing == {False}:
            assert states == {False}, f"{group.name}: its consumers' slices are not masked with it"
    return pruned


def expected_pruned_groups(sparsifier, target: float) -> int:
    """Groups a channel mask update prunes, from the definitions: per set, or globally, at least one kept per set."""
    widths = [s.width for s in sparsifier.channel_groups.sets]
    if target == 0:
        return 0
    if sparsifier.distribution == "uniform":
        return sum(w - max(1, keep_count(w, target)) for w in widths)
    return sum(widths) - max(len(widths), keep_count(sum(widths), target))


@pytest.mark.parametrize("distribution", ["uniform", "global"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", methods_with(Capability.CHANNEL))
def test_channel_masks_exact_groups_and_bit_identical_resume(method, opt_name, distribution):
    from sparsetrain.structured import slim

    split = 10
    channel = dict(mask_type="channel", example_input=torch.zeros(1, 2, 8, 8), distribution=distribution)
    model, optimizer, sparsifier, shape = build(method, "conv", opt_name, sparsity=0.5, **channel)
    assert {s.name for s in sparsifier.channel_groups.sets} == {"conv1", "conv2"}
    assert "bn.weight" in sparsifier.params and "conv1.bias" in sparsifier.params  # whole groups are masked
    version, updates = sparsifier.mask_version, 0
    for step in range(TOTAL):
        if step == split:
            saved = roundtrip(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "sparsifier": sparsifier.state_dict(),
                }
            )
        train_step(model, optimizer, step, shape)
        assert_masked_weights_zero(sparsifier)
        if sparsifier.mask_version != version:
            version, updates = sparsifier.mask_version, updates + 1
            assert pruned_groups(sparsifier) == expected_pruned_groups(sparsifier, sparsifier.target_sparsity)
    assert updates >= 1 and pruned_groups(sparsifier) == expected_pruned_groups(sparsifier, 0.5)
    assert sparsifier.group_sparsity() == pytest.approx(expected_pruned_groups(sparsifier, 0.5) / 16)
    model.eval()
    x = batch(0, shape)[0]
    with torch.no_grad():
        assert (slim(model, x[:1])(x) - model(x)).abs().max() <= 1e-5

    model2, optimizer2, sparsifier2, _ = build(method, "conv", opt_name, sparsity=0.5, seed=123, **channel)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    for step in range(split, TOTAL):
        train_step(model2, optimizer2, step, shape)
    model2.eval()
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    assert all(torch.equal(sparsifier.masks[n], sparsifier2.masks[n]) for n in sparsifier.masks)
    assert sparsifier2.history == sparsifier.history


@pytest.mark.parametrize("method", [m for m in METHODS if m not in methods_with(Capability.CHANNEL)])
def test_channel_masks_refused_without_the_flag(method):
    with pytest.raises(ValueError, match="channel"):
        build(method, "conv", mask_type="channel", example_input=torch.zeros(1, 2, 8, 8))


def test_channel_masks_need_an_example_input():
    with pytest.raises(ValueError, match="example_input"):
        build("acdc", "conv", mask_type="channel", example_input=None)


@pytest.mark.parametrize("method", METHODS)
def test_packed_mask_storage_trains_bit_identically(method):
    """``mask_storage='packed'`` (a bit per weight) changes where masks live, never a result: every method's run
    equals its boolean-mask run bit for bit, masks and history included."""
    runs = []
    for storage in ("bool", "packed"):
        model, optimizer, sparsifier, shape = build(method, "conv", "adam", mask_storage=storage)
        for step in range(TOTAL):
            train_step(model, optimizer, step, shape)
            assert_masked_weights_zero(sparsifier)
        runs.append((model, sparsifier))
    (model, sparsifier), (packed_model, packed) = runs
    for (name, a), b in zip(model.state_dict().items(), packed_model.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs with packed masks"
    assert all(torch.equal(sparsifier.masks[n], packed.masks[n]) for n in sparsifier.masks)
    assert packed.history == sparsifier.history
