"""AC/DC's study options (dead_units, layer_floor, layer_ceiling, ramp, inphase_ramp, score): each does what its
docstring says, masks stay exact."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.shared import roundtrip
from torch import nn

import sparsetrain
from sparsetrain import maskops

TOTAL = 30
# dense 0-4, sparse 4-8, dense 8-12, sparse 12-16, dense 16-24, sparse 24-30
TIMELINE = dict(unit="steps", warmup=4, compressed=4, decompressed=4, final=6)


def build(sparsity: float = 0.9, seed: int = 0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    sparsifier = sparsetrain.create("acdc", model, sparsity=sparsity, total_steps=TOTAL, **TIMELINE, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


def step(model, optimizer, i: int, before_step=None) -> None:
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if before_step is not None:
        before_step()
    optimizer.step()


def dead_rows(mask: torch.Tensor) -> torch.Tensor:
    return ~mask.reshape(mask.shape[0], -1).any(dim=1)


def run_to_decompression(**options):
    """Train to step 8 (the first decompression); return the sparsifier, the weights just before the compression
    at step 4 (after that step's update) and the masks of the compressed phase."""
    model, optimizer, sparsifier = build(sparsity=0.98, **options)
    before = {}
    sparsifier.subscribe(
        lambda e: before.update({n: p.detach().clone() for n, p in sparsifier.params.items()})
        if e["event"] == "phase_end" and e.get("phase", "dense") == "dense" and not before else None
    )
    for i in range(4):
        step(model, optimizer, i)
    masks = {n: m.clone() for n, m in sparsifier.masks.items()}
    for i in range(4, 8):
        step(model, optimizer, i)
    assert sparsifier.phase == "dense"
    return sparsifier, before, masks


def test_dead_units_zero_is_the_paper_rows_stay_zero():
    sparsifier, _, masks = run_to_decompression()
    assert any(bool(dead_rows(m).any()) for m in masks.values()), "the test needs units the compression emptied"
    for name, mask in masks.items():
        assert torch.all(sparsifier.params[name].detach()[dead_rows(mask)] == 0)


def test_dead_units_revive_restores_the_last_dense_values_of_emptied_rows_only():
    sparsifier, before, masks = run_to_decompression(dead_units="revive")
    revived = 0
    for name, mask in masks.items():
        weight = sparsifier.params[name].detach()
        rows = dead_rows(mask)
        assert torch.equal(weight[rows], before[name][rows])
        revived += int(rows.sum())
        # Rows that kept a weight: their pruned weights re-enter at 0, as in the paper.
        assert torch.all(weight[~rows][~mask[~rows]] == 0)
    assert revived > 0
    assert [e["rows"] for e in sparsifier.history if e["event"] == "dead_units"] == [revived]


def test_dead_units_reinit_gives_emptied_rows_a_small_fresh_init():
    sparsifier, before, masks = run_to_decompression(dead_units="reinit")
    for name, mask in masks.items():
        weight = sparsifier.params[name].detach()
        rows = dead_rows(mask)
        if not rows.any():
            continue
        bound = 0.1 / math.sqrt(weight.shape[1])
        assert torch.all(weight[rows].abs() <= bound) and torch.count_nonzero(weight[rows]) == weight[rows].numel()
        assert not torch.equal(weight[rows], before[name][rows])
        assert torch.all(weight[~rows][~mask[~rows]] == 0)


def test_layer_floor_is_respected_exactly_and_the_total_stays_exact():
    model, optimizer, sparsifier = build(sparsity=0.9, layer_floor=0.05)
    for i in range(3):
        step(model, optimizer, i)
    with torch.no_grad():  # a layer of tiny weights: a plain global ranking keeps none of it
        model[2].weight.mul_(1e-4)
    scores = {n: p.detach().abs() for n, p in sparsifier.params.items()}
    assert int(maskops.global_topk_masks(scores, 0.9)["2.weight"].sum()) == 0
    masks = sparsifier.masks_at(4)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == maskops.keep_count(total, 0.9)
    for name, mask in masks.items():
        floor = math.ceil(0.05 * mask.numel())
        assert int(mask.sum()) >= floor
        assert torch.all(mask[maskops.topk_count_mask(scores[name], floor)]), "the floor keeps the layer's largest"
    assert int(masks["2.weight"].sum()) == math.ceil(0.05 * 32 * 32)
    step(model, optimizer, 3)  # the compression at step 4 installs such masks, with exact zeros
    assert sum(int(m.sum()) for m in sparsifier.masks.values()) == maskops.keep_count(total, 0.9)
    for name, mask in sparsifier.masks.items():
        assert int(mask.sum()) >= math.ceil(0.05 * mask.numel())
        assert torch.all(sparsifier.params[name].detach()[~mask] == 0)


def test_layer_floor_larger_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="layer_floor=0.5 keeps more weights than sparsity 0.9"):
        build(sparsity=0.9, layer_floor=0.5)


def test_layer_ceiling_caps_each_layer_and_the_total_stays_exact():
    model, optimizer, sparsifier = build(sparsity=0.9, layer_ceiling=0.3)
    for i in range(3):
        step(model, optimizer, i)
    with torch.no_grad():  # a layer of large weights: a plain global ranking keeps most of it
        model[4].weight.mul_(100)
    scores = {n: p.detach().abs() for n, p in sparsifier.params.items()}
    cap = math.ceil(0.3 * 4 * 32)
    assert int(maskops.global_topk_masks(scores, 0.9)["4.weight"].sum()) > cap
    masks = sparsifier.masks_at(4)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == maskops.keep_count(total, 0.9)
    assert int(masks["4.weight"].sum()) == cap
    assert torch.equal(masks["4.weight"], maskops.topk_count_mask(scores["4.weight"], cap)), "its largest stay"
    for mask in masks.values():
        assert int(mask.sum()) <= math.ceil(0.3 * mask.numel())
    # The budget the capped layer gives up goes to the others (below their own ceilings) by the global ranking:
    # every weight they keep outranks every weight they dropped.
    others = [n for n in masks if n != "4.weight"]
    kept = torch.cat([scores[n][masks[n]] for n in others])
    dropped = torch.cat([scores[n][~masks[n]] for n in others])
    assert kept.min() >= dropped.max()
    step(model, optimizer, 3)  # the compression at step 4 installs such masks, with exact zeros
    assert int(sparsifier.masks["4.weight"].sum()) == cap
    assert torch.all(sparsifier.params["4.weight"].detach()[~sparsifier.masks["4.weight"]] == 0)


def test_layer_ceiling_with_a_floor_keeps_both_bounds():
    model, optimizer, sparsifier = build(sparsity=0.9, layer_floor=0.05, layer_ceiling=0.12)
    for i in range(3):
        step(model, optimizer, i)
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # would get nothing without the floor
        model[4].weight.mul_(100)  # would get most of its weights without the ceiling
    masks = sparsifier.masks_at(4)
    for mask in masks.values():
        assert math.ceil(0.05 * mask.numel()) <= int(mask.sum()) <= math.ceil(0.12 * mask.numel())
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == maskops.keep_count(total, 0.9)


def test_layer_ceiling_under_a_ramp_fills_past_the_ceilings_by_score():
    # ramp=2 at 0.9: the first compression keeps 55% of the weights, more than ceilings of 0.3 allow (30%); the
    # rest is filled with the largest weights past the ceilings, not by position, and the count stays exact.
    model, optimizer, sparsifier = build(sparsity=0.9, layer_ceiling=0.3, ramp=2)
    for i in range(3):
        step(model, optimizer, i)
    scores = {n: p.detach().abs() for n, p in sparsifier.params.items()}
    masks = sparsifier.masks_at(4)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == maskops.keep_count(total, 0.45)
    beyond_kept, beyond_dropped = [], []
    for name, mask in masks.items():
        capped = maskops.topk_count_mask(scores[name], math.ceil(0.3 * mask.numel()))
        assert torch.all(mask[capped]), "every layer keeps its ceiling's worth first"
        beyond_kept.append(scores[name][mask & ~capped])
        beyond_dropped.append(scores[name][~mask])
    assert torch.cat(beyond_kept).min() >= torch.cat(beyond_dropped).max()
    # At the target (the second compression) the ceilings hold.
    for i in range(3, 12):
        step(model, optimizer, i)
    for mask in sparsifier.masks_at(12).values():
        assert int(mask.sum()) <= math.ceil(0.3 * mask.numel())


def test_layer_ceiling_below_the_budget_is_refused():
    with pytest.raises(ValueError, match="layer_ceiling=0.05 lets the layers keep .* fewer than sparsity 0.9"):
        build(sparsity=0.9, layer_ceiling=0.05)


@pytest.mark.parametrize(
    "cycles, expected",
    [
        (None, [("dense", 0, 4), ("sparse", 4, 8), ("dense", 8, 12), ("sparse", 12, 16), ("dense", 16, 24),
                ("sparse", 24, 30)]),
        (1, [("dense", 0, 4), ("sparse", 4, 8), ("dense", 8, 24), ("sparse", 24, 30)]),
        (5, [("dense", 0, 4), ("sparse", 4, 8), ("dense", 8, 12), ("sparse", 12, 16), ("dense", 16, 24),
             ("sparse", 24, 30)]),
    ],
)  # fmt: skip
def test_cycles_caps_the_alternation_and_the_last_dense_phase_takes_the_rest(cycles, expected):
    model, optimizer, sparsifier = build(cycles=cycles)
    assert [(p.kind, p.start, p.end) for p in sparsifier.phases] == expected
    for i in range(TOTAL):  # the masks follow that timeline: dense exactly where it says
        assert (sparsifier.phase_at(i) == "dense") == any(k == "dense" and a <= i < b for k, a, b in expected)
        step(model, optimizer, i)
    assert sparsifier.masks and all(int(m.sum()) < m.numel() for m in sparsifier.masks.values())


@pytest.mark.parametrize("ramp, expected", [(0, [0.9, 0.9, 0.9]), (3, [0.45, 0.675, 0.9]), (5, [0.45, 0.5625, 0.9])])
def test_ramp_sparsity_per_compressed_phase(ramp, expected):
    model, optimizer, sparsifier = build(sparsity=0.9, ramp=ramp)
    total = sum(m.numel() for m in sparsifier.masks.values())
    counts = []
    for i in range(TOTAL):
        step(model, optimizer, i)
        if sparsifier.count in (4, 12, 24):  # compressed starts
            counts.append(sum(int((~m).sum()) for m in sparsifier.masks.values()))
            for p, m in zip(sparsifier.params.values(), sparsifier.masks.values()):
                assert torch.all(p.detach()[~m] == 0)
    assert counts == [total - maskops.keep_count(total, s) for s in expected]
    assert [sparsifier.target_sparsity_at(t) for t in (4, 12, 24)] == pytest.approx(expected)


@pytest.mark.parametrize("score, invariant", [("normalized", True), ("magnitude", False)])
def test_score_normalized_ignores_a_layers_scale(score, invariant):
    model, optimizer, sparsifier = build(score=score)
    for i in range(3):
        step(model, optimizer, i)
    before = sparsifier.masks_at(4)
    with torch.no_grad():
        model[2].weight.mul_(100.0)
    after = sparsifier.masks_at(4)
    assert all(torch.equal(before[n], after[n]) for n in before) == invariant


def test_score_taylor_ranks_by_weight_times_gradient_summed_over_the_dense_phase():
    model, optimizer, sparsifier = build(score="taylor")
    summed = {n: torch.zeros_like(p) for n, p in sparsifier.params.items()}
    weights = {}

    def accumulate():
        for n, p in sparsifier.params.items():
            summed[n] += (p.detach() * p.grad).abs()

    sparsifier.subscribe(
        lambda e: weights.update({n: p.detach().abs() for n, p in sparsifier.params.items()})
        if e["event"] == "phase_end" else None
    )
    for i in range(4):
        step(model, optimizer, i, before_step=accumulate)
    expected = maskops.global_topk_masks(summed, 0.9)
    assert all(torch.equal(sparsifier.masks[n], expected[n]) for n in expected)
    magnitude = maskops.global_topk_masks(weights, 0.9)  # the weights the compression saw
    assert not all(torch.equal(sparsifier.masks[n], magnitude[n]) for n in expected)


def run_and_resume(options: dict, split: int):
    """Train TOTAL steps, and again from a checkpoint taken at ``split`` into a fresh copy (another seed); assert
    the final weights are bit-identical; return both sparsifiers."""
    model, optimizer, sparsifier = build(**options)
    for i in range(TOTAL):
        if i == split:
            saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "sparsifier": sparsifier.state_dict()})  # fmt: skip
        step(model, optimizer, i)
    model2, optimizer2, sparsifier2 = build(seed=123, **options)
    model2.load_state_dict(saved["model"])
    optimizer2.load_state_dict(saved["optimizer"])
    sparsifier2.load_state_dict(saved["sparsifier"])
    for i in range(split, TOTAL):
        step(model2, optimizer2, i)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after resume"
    return sparsifier, sparsifier2


@pytest.mark.parametrize("split", [6, 10])  # inside a compressed phase, inside a decompressed one
def test_resume_with_every_option_is_bit_identical(split):
    run_and_resume(dict(dead_units="revive", score="taylor", ramp=2, layer_floor=0.01, layer_ceiling=0.3), split)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dead_units="alive"), "dead_units must be one of zero, reinit, revive"),
        (dict(layer_floor=1.5), "layer_floor must be a density in"),
        (dict(ramp=-1), "ramp must be a number of compressed phases"),
        (dict(score="hessian"), "score must be one of magnitude, normalized, taylor"),
        (dict(layer_floor=0.01, distribution="uniform"), "layer_floor and layer_ceiling apply to the global"),
        (dict(layer_ceiling=0.5, distribution="uniform"), "layer_floor and layer_ceiling apply to the global"),
        (dict(layer_ceiling=0), "layer_ceiling must be a density in"),
        (dict(cycles=0), "cycles must be a number of compressed/decompressed cycles >= 1"),
        (dict(layer_ceiling=0.1, layer_floor=0.2), "layer_ceiling=0.1 is below layer_floor=0.2"),
        (dict(dead_units="revive", mask_type="channel"), "dead_units, layer_floor, layer_ceiling and score are for"),
    ],
)
def test_bad_options_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


@pytest.mark.parametrize(
    "k, updates",  # (step, sparsity) of each mask update in the first compressed phase (steps 4-8)
    [
        (2, [(4, 0.45), (6, 0.9)]),
        (3, [(4, 0.45), (5, 0.675), (6, 0.9)]),
        (4, [(4, 0.45), (5, 0.6), (6, 0.75), (7, 0.9)]),
    ],
)
def test_inphase_ramp_reaches_s_inside_the_first_compressed_phase(k, updates):
    model, optimizer, sparsifier = build(sparsity=0.9, inphase_ramp=k)
    total = sum(m.numel() for m in sparsifier.masks.values())
    expected = {t: 0.0 for t in range(4)} | {t: 0.0 for t in range(8, 12)} | {t: 0.9 for t in range(12, 16)}
    for (t, s), end in zip(updates, [t for t, _ in updates[1:]] + [8]):
        expected |= {u: s for u in range(t, end)}
    assert {t: sparsifier.target_sparsity_at(t) for t in expected} == pytest.approx(expected)
    assert [t for t in range(TOTAL) if sparsifier.is_update_step(t)] == [t for t, _ in updates] + [8, 12, 16, 24]
    previous = None
    for i in range(TOTAL):
        step(model, optimizer, i)
        t = sparsifier.count
        pruned = sum(int((~m).sum()) for m in sparsifier.masks.values())
        if 4 <= t < 8:  # exact counts at every sparsity of the ramp, and each update prunes among the kept weights
            assert pruned == total - maskops.keep_count(total, expected[t])
            if previous is not None:
                assert all(torch.all(previous[n] | ~m) for n, m in sparsifier.masks.items())
            previous = {n: m.clone() for n, m in sparsifier.masks.items()}
            for p, m in zip(sparsifier.params.values(), sparsifier.masks.values()):
                assert torch.all(p.detach()[~m] == 0)
        if t in (7, 12, 24):  # the first phase ends at s; the later phases are the paper's
            assert pruned == total - maskops.keep_count(total, 0.9)
    reasons = [e["reason"] for e in sparsifier.history if e["event"] == "mask_update"]
    assert reasons[:k] == ["compress"] + [f"inphase_ramp {s:.4f}" for _, s in updates[1:]]
    assert [e["event"] for e in sparsifier.history].count("compress") == 3  # one per compressed phase


def test_inphase_ramp_revive_gives_rows_emptied_inside_the_phase_their_values_before_that_update():
    model, optimizer, sparsifier = build(sparsity=0.98, inphase_ramp=4, dead_units="revive")
    seen = []  # (weights, masks) just before each mask update
    install = sparsifier.set_masks

    def record_then_install(masks, reason):
        seen.append(({n: p.detach().clone() for n, p in sparsifier.params.items()},
                     {n: m.clone() for n, m in sparsifier.masks.items()}))  # fmt: skip
        install(masks, reason)

    sparsifier.set_masks = record_then_install
    for i in range(8):
        step(model, optimizer, i)
    assert sparsifier.phase == "dense" and len(seen) == 5  # 4 updates of the ramp, then the decompression
    inside = 0
    final = seen[4][1]  # the masks the phase ended on
    for name, mask in final.items():
        weight = sparsifier.params[name].detach()
        for row in dead_rows(mask).nonzero().squeeze(1).tolist():
            # The update that emptied it is the first whose masks leave it empty; the values are from just before.
            emptied_by = next(u for u in range(4) if not seen[u + 1][1][name][row].any())
            assert torch.equal(weight[row], seen[emptied_by][0][name][row])
            inside += emptied_by > 0
    assert inside > 0, "the test needs rows an in-phase update emptied"


@pytest.mark.parametrize("split", [5, 6])  # between the ramp's updates inside the first compressed phase
def test_resume_across_an_inphase_ramp_update_is_bit_identical(split):
    options = dict(dead_units="revive", score="taylor", inphase_ramp=4, layer_floor=0.01)
    sparsifier, sparsifier2 = run_and_resume(options, split)
    assert [e for e in sparsifier2.history if e["step"] > split] == [e for e in sparsifier.history if e["step"] > split]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(inphase_ramp=-1), "inphase_ramp must be a number of mask updates in the first compressed phase"),
        (dict(inphase_ramp=True), "inphase_ramp must be a number of mask updates"),
        (dict(inphase_ramp=3, ramp=3), r"ramp=3 \(across compressed phases\) and inphase_ramp=3"),
        (dict(inphase_ramp=2, mask_type="2:4"), "inphase_ramp is for unstructured masks; got mask_type='2:4'"),
        (dict(inphase_ramp=5), "inphase_ramp=5 needs a first compressed phase of at least 5 steps; it has 4"),
    ],
)
def test_bad_inphase_ramp_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


@pytest.mark.parametrize(
    "options, expected",  # sparsity of the three compressed phases (steps 4, 12, 24) at s = 0.9
    [
        (dict(ramp=2, ramp_start=0.8), [0.72, 0.9, 0.9]),
        (dict(ramp=3, ramp_start=0.8), [0.72, 0.81, 0.9]),
        (dict(ramp=3, ramp_start=0.5), [0.45, 0.675, 0.9]),  # the ramp's former fixed start, given explicitly
    ],
)
def test_ramp_start_is_where_the_ramp_across_phases_starts(options, expected):
    model, optimizer, sparsifier = build(sparsity=0.9, **options)
    total = sum(m.numel() for m in sparsifier.masks.values())
    counts = []
    for i in range(TOTAL):
        step(model, optimizer, i)
        if sparsifier.count in (4, 12, 24):
            counts.append(sum(int((~m).sum()) for m in sparsifier.masks.values()))
    assert [sparsifier.target_sparsity_at(t) for t in (4, 12, 24)] == pytest.approx(expected)
    assert counts == [total - maskops.keep_count(total, s) for s in expected]


def test_ramp_start_moves_the_inphase_ramp_too():
    _, _, sparsifier = build(sparsity=0.9, inphase_ramp=2, ramp_start=0.8)
    assert [sparsifier.target_sparsity_at(t) for t in (4, 5, 6, 7, 8, 12)] == pytest.approx(
        [0.72, 0.72, 0.9, 0.9, 0.0, 0.9]
    )


def test_ramp_start_default_leaves_the_runs_bit_identical():
    """ramp_start=0.5 given explicitly is the ramp without it, weight for weight (and the paper has no ramp)."""
    runs = []
    for options in (dict(ramp=3), dict(ramp=3, ramp_start=0.5)):
        model, optimizer, _ = build(sparsity=0.9, **options)
        for i in range(TOTAL):
            step(model, optimizer, i)
        runs.append(model.state_dict())
    assert all(torch.equal(a, runs[1][n]) for n, a in runs[0].items())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ramp=2, ramp_start=1.0), r"ramp_start must be a fraction of the sparsity in \(0, 1\), e.g. 0.8; got 1.0"),
        (dict(ramp=2, ramp_start=0), "ramp_start must be a fraction of the sparsity"),
        (dict(ramp=2, ramp_start=True), "ramp_start must be a fraction of the sparsity"),
        (dict(ramp_start=0.8), r"ramp_start=0.8 is where a ramp starts; give ramp or inphase_ramp >= 2 with it"),
        (dict(ramp=1, ramp_start=0.8), "give ramp or inphase_ramp >= 2 with it"),
    ],
)
def test_bad_ramp_start_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


def build_with_batch_norm(**options):
    """``build``'s network with a batch norm after the first layer: the sparse model also has running statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 4))  # fmt: skip
    sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_steps=TOTAL, **TIMELINE, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


def run_recording_phase_ends(final_from: str):
    """Train to step 24 (the final compression); return the model's state and masks at the end of the compressed
    phase 12-16, the dense weights at the end of the last decompressed phase (16-24), and the state after step 24."""
    model, optimizer, sparsifier = build_with_batch_norm(final_from=final_from)
    ends = {}

    def record(event):
        if event["event"] == "phase_end":  # sent before the masks change: the model the phase ended on
            ends[event["step"]] = ({k: v.clone() for k, v in model.state_dict().items()},
                                   {n: m.clone() for n, m in sparsifier.masks.items()})  # fmt: skip

    sparsifier.subscribe(record)
    for i in range(24):
        step(model, optimizer, i)
    return ends[16], ends[24], (model, optimizer, sparsifier)


def test_final_from_sparse_resumes_the_previous_compressed_phases_model():
    (sparse_state, sparse_masks), (dense_state, dense_masks), (model, optimizer, sparsifier) = (
        run_recording_phase_ends("sparse")
    )
    assert all(bool(m.all()) for m in dense_masks.values()), "16-24 is a dense branch"
    assert not torch.equal(dense_state["0.bias"], sparse_state["0.bias"])
    assert not torch.equal(dense_state["1.running_mean"], sparse_state["1.running_mean"])
    # After the final compression (step 24): exactly the model of step 16, weights, biases, batch norm's parameters
    # and buffers, on the masks of step 16; every first moment reset.
    for key, value in model.state_dict().items():
        assert torch.equal(value, sparse_state[key]), f"{key} is not the sparse model of step 16"
    assert all(torch.equal(sparsifier.masks[n], m) for n, m in sparse_masks.items())
    assert all(torch.count_nonzero(optimizer.state[p]["momentum_buffer"]) == 0 for p in model.parameters())
    assert sparsifier._sparse_snapshot is None
    compress = [e for e in sparsifier.history if e["event"] == "compress"]
    assert compress[-1] == {"step": 24, "event": "compress", "mask_difference_pct": 0.0, "resumed": True}
    # The paper (final_from='dense'): the final compression prunes the dense branch's weights.
    (paper_state, _), _, (paper_model, _, _) = run_recording_phase_ends("dense")
    assert all(torch.equal(paper_state[k], v) for k, v in sparse_state.items()), "same run up to step 16"
    assert all(not torch.equal(paper_model.state_dict()[k], sparse_state[k]) for k in ("0.weight", "0.bias"))


def test_final_from_dense_is_the_paper_bit_for_bit():
    runs = []
    for options in ({}, dict(final_from="dense")):
        model, optimizer, _ = build(sparsity=0.9, **options)
        for i in range(TOTAL):
            step(model, optimizer, i)
        runs.append(model.state_dict())
    assert all(torch.equal(a, runs[1][n]) for n, a in runs[0].items())


@pytest.mark.parametrize("split", [14, 16, 20, 26])  # before the snapshot, at it, inside the dense branch, after
def test_resume_with_final_from_sparse_is_bit_identical(split):
    sparsifier, sparsifier2 = run_and_resume(dict(final_from="sparse"), split)
    assert [e for e in sparsifier2.history if e["step"] > split] == [e for e in sparsifier.history if e["step"] > split]


def test_resume_with_final_from_sparse_and_other_options_is_bit_identical():
    run_and_resume(dict(final_from="sparse", ramp=2, dead_units="revive", score="taylor"), 20)


def test_final_from_sparse_holds_the_kept_values_and_the_other_parameters_through_the_dense_branch():
    held = {}
    for final_from in ("dense", "sparse"):
        model, optimizer, sparsifier = build(sparsity=0.9, final_from=final_from)
        for i in range(TOTAL):
            step(model, optimizer, i)
            if sparsifier.count in (20, 26):
                held[final_from, sparsifier.count] = sparsifier.memory_bytes().method_state
    kept = sum(int(m.sum()) for m in sparsifier.masks.values())
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert held["sparse", 20] - held["dense", 20] == 4 * (kept + biases)  # float32 kept values, bias copies
    assert held["sparse", 26] == held["dense", 26]  # freed at the final compression


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(final_from="best"), "final_from must be one of dense, sparse; got 'best'"),
        (dict(final_from="sparse", reset_momentum=False), "give reset_momentum 'all' or 'sparsified' with it"),
        (dict(final_from="sparse", ramp=3), r"ramp=3 leaves at sparsity 0.675, below 0.9; give a shorter ramp"),
    ],
)
def test_bad_final_from_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)


def test_final_from_sparse_needs_a_compressed_phase_before_the_final_one():
    model = nn.Sequential(nn.Linear(16, 4))
    with pytest.raises(ValueError, match="final_from='sparse' resumes the compressed phase before the final one; "
                                         "this run of 10 steps has only one compressed phase"):  # fmt: skip
        sparsetrain.create("acdc", model, sparsity=0.9, total_steps=10, **TIMELINE, final_from="sparse")


@pytest.mark.parametrize("start, window", [(4, 3), (12, 3), (24, 4)])  # decay=0.75 of 4- and 6-step phases
def test_decay_fades_the_removed_weights_linearly_to_exact_zero(start, window):
    model, optimizer, sparsifier = build(sparsity=0.9, decay=0.75)
    total = sum(m.numel() for m in sparsifier.masks.values())
    for i in range(start):
        step(model, optimizer, i)
    for group in optimizer.param_groups:  # from here only the sparsifier changes the weights
        group["lr"] = 0.0
    # The compression chose its masks (the next compression's reference) but keeps every weight in the masks.
    chosen = {n: maskops.unpack_mask(sparsifier._last_sparse_masks[n], p.shape) for n, p in sparsifier.params.items()}
    assert sum(int(m.sum()) for m in chosen.values()) == maskops.keep_count(total, 0.9)
    assert sparsifier.sparsity_of_masks() == 0.0
    at_start = {n: p.detach().clone() for n, p in sparsifier.params.items()}
    assert any(bool((w[~chosen[n]] != 0).any()) for n, w in at_start.items()), "the test needs weights to fade"
    previous = {n: w.abs() for n, w in at_start.items()}
    for i in range(1, window + 1):
        step(model, optimizer, start + i - 1)
        for name, param in sparsifier.params.items():
            weight, kept = param.detach(), chosen[name]
            assert torch.equal(weight[kept], at_start[name][kept]), "the chosen weights are not scaled"
            fading = weight[~kept]
            if i < window:  # the factor 1 - i / W, strictly smaller at every step, masks still counting them
                torch.testing.assert_close(fading, at_start[name][~kept] * (1 - i / window))
                moving = previous[name][~kept] > 0
                assert torch.all(fading.abs()[moving] < previous[name][~kept][moving])
                assert bool(sparsifier.masks[name].all())
            else:  # the window's end: exactly 0, the chosen masks installed
                assert torch.all(fading == 0) and not torch.signbit(fading).any()
                assert torch.equal(sparsifier.masks[name], kept)
            previous[name] = weight.abs()
    assert sum(int((~m).sum()) for m in sparsifier.masks.values()) == total - maskops.keep_count(total, 0.9)
    reasons = [e["reason"] for e in sparsifier.history if e["event"] == "mask_update"]
    assert reasons[-1] == "decay end"


def test_decay_keeps_masked_weights_exactly_zero_after_the_window_while_training():
    model, optimizer, sparsifier = build(sparsity=0.9, decay=0.5)  # windows: 4-6, 12-14, 24-27
    total = sum(m.numel() for m in sparsifier.masks.values())
    expected = {t: 0.0 for t in range(TOTAL + 1)} | {t: 0.9 for t in (6, 7, 14, 15, 27, 28, 29, 30)}
    seen = {}
    for i in range(TOTAL):
        step(model, optimizer, i)
        t = sparsifier.count
        seen[t] = sparsifier.sparsity_of_masks()
        if expected[t]:
            assert sum(int((~m).sum()) for m in sparsifier.masks.values()) == total - maskops.keep_count(total, 0.9)
            for p, m in zip(sparsifier.params.values(), sparsifier.masks.values()):
                assert torch.all(p.detach()[~m] == 0)
                assert torch.all(optimizer.state[p]["momentum_buffer"][~m] == 0)
    assert {t: s > 0 for t, s in seen.items()} == {t: expected[t] > 0 for t in seen}
    events = [(e["step"], e["until"]) for e in sparsifier.history if e["event"] == "decay"]
    assert events == [(4, 6), (12, 14), (24, 27)]
    assert [t for t in range(TOTAL) if sparsifier.is_update_step(t)] == [4, 6, 8, 12, 14, 16, 24, 27]


def test_decay_phases_final_fades_only_the_final_compression():
    model, optimizer, sparsifier = build(sparsity=0.9, decay=0.5, decay_phases="final")
    kept = {}
    for i in range(TOTAL):
        step(model, optimizer, i)
        kept[sparsifier.count] = sparsifier.sparsity_of_masks() > 0
    assert [t for t in sorted(kept) if kept[t]] == [4, 5, 6, 7, 12, 13, 14, 15, 27, 28, 29, 30]
    assert [e["step"] for e in sparsifier.history if e["event"] == "decay"] == [24]


def test_decay_zero_is_the_paper_bit_for_bit():
    runs = []
    for options in ({}, dict(decay=0.0), dict(decay=0)):
        model, optimizer, _ = build(sparsity=0.9, ramp=2, **options)
        for i in range(TOTAL):
            step(model, optimizer, i)
        runs.append(model.state_dict())
    assert all(torch.equal(a, run[n]) for run in runs[1:] for n, a in runs[0].items())


@pytest.mark.parametrize("split", [5, 6, 13, 25, 26])  # inside the windows (4-7, 12-15, 24-28 at decay=0.75)
def test_resume_inside_a_decay_window_is_bit_identical(split):
    sparsifier, sparsifier2 = run_and_resume(dict(decay=0.75), split)
    assert [e for e in sparsifier2.history if e["step"] > split] == [e for e in sparsifier.history if e["step"] > split]


def test_resume_inside_a_decay_window_with_other_options_is_bit_identical():
    run_and_resume(dict(decay=0.75, ramp=2, dead_units="revive", score="taylor", layer_floor=0.01), 6)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(decay=1.0), r"decay must be the fraction of each compressed phase .* in \[0, 1\) .*; got 1.0"),
        (dict(decay=-0.1), "decay must be the fraction of each compressed phase"),
        (dict(decay=True), "decay must be the fraction of each compressed phase"),
        (dict(decay=0.3, decay_phases="first"), "decay_phases must be one of all, final; got 'first'"),
        (dict(decay_phases="final"), "decay_phases='final' says which compressions fade; give decay > 0 with it"),
        (dict(decay=0.2), r"decay=0.2 of a compressed phase of 4 steps is no step; give at least 0.25"),
        (dict(decay=0.5, inphase_ramp=2), "decay is for unstructured masks, without inphase_ramp or final_from"),
        (dict(decay=0.5, final_from="sparse"), "final_from='sparse'"),
        (dict(decay=0.5, mask_type="2:4"), "got mask_type='2:4'"),
    ],
)
def test_bad_decay_is_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        build(**options)
