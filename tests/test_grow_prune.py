"""RigL, SET, GaP and IMP: hand-worked updates, tables, determinism, and short real-data runs."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from helpers.shared import roundtrip
from torch import nn

import sparsetrain
from sparsetrain.maskops import keep_count
from sparsetrain.methods.gap import balanced_partition
from sparsetrain.optim_state import per_element_buffers


def one_row_model() -> nn.Module:
    return nn.Linear(8, 1, bias=False)


def test_rigl_drop_and_grow_by_hand():
    model = one_row_model()
    sparsifier = sparsetrain.create(
        "rigl", model, sparsity=0.5, distribution="uniform", total_steps=10_000, unit="steps", delta=1,
        t_end=10_000, alpha=0.5,
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier.attach(optimizer)
    model.weight.grad = torch.zeros(1, 8)
    optimizer.step()  # step 0: not an update step (count 0); count becomes 1
    active = torch.tensor([[True, True, True, False, True, False, False, False]])
    sparsifier.set_masks({"weight": active}, reason="test")
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.9, -0.1, 0.5, 0.0, 0.3, 0.0, 0.0, 0.0]]))
    model.weight.grad = torch.tensor([[0.1, 0.2, 0.3, -0.8, 0.05, 0.6, -0.01, 0.4]])
    optimizer.step()  # count 1 is an update step: drop round(~0.5 * 4) = 2, grow 2
    # Dropped: the two smallest |w| among active (positions 1 and 4). Grown: the two largest |g| among the
    # rest (positions 3: 0.8 and 5: 0.6). The optimizer step is skipped, so kept weights keep their values.
    expected = torch.tensor([[True, False, True, True, False, True, False, False]])
    assert torch.equal(sparsifier.masks["weight"], expected)
    assert torch.equal(model.weight.detach(), torch.tensor([[0.9, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]]))
    momentum = per_element_buffers(optimizer, model.weight)["momentum_buffer"]
    assert torch.all(momentum[~expected] == 0) and torch.all(momentum[0, [3, 5]] == 0)


def test_rigl_update_without_skipping_the_step_trains_the_new_weights():
    model = one_row_model()
    sparsifier = sparsetrain.create("rigl", model, sparsity=0.5, total_steps=100, unit="steps", delta=1,
                                    skip_update_step=False)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    model.weight.grad = torch.ones(1, 8)
    optimizer.step()
    before = model.weight.detach().clone()
    model.weight.grad = torch.arange(1.0, 9.0).view(1, 8)
    optimizer.step()
    assert not torch.equal(before, model.weight.detach())
    assert int((model.weight != 0).sum()) == 4


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_drop_grow_keeps_each_layer_count_and_follows_cosine(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 5))
    sparsifier = sparsetrain.create(method, model, sparsity=0.8, total_steps=60, unit="steps", delta=5, t_end=45)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    sparsifier.attach(optimizer)
    counts = {n: int(m.sum()) for n, m in sparsifier.masks.items()}
    events = []
    sparsifier.subscribe(lambda e: events.append(e) if e["event"] == "drop_grow" else None)
    for step in range(60):
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        assert {n: int(m.sum()) for n, m in sparsifier.masks.items()} == counts
        for name, param in sparsifier.params.items():
            assert torch.all(param.detach()[~sparsifier.masks[name]] == 0)
    assert [e["step"] for e in events] == [5, 10, 15, 20, 25, 30, 35, 40]
    for event in events:
        assert event["fraction"] == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * event["step"] / 45)))
    assert sum(e["regrown"] for e in events) > 0


def _set_run(steps: int = 60, split: int | None = None, **options):
    """SET on a 3-layer MLP with update every 5 steps; drop_grow events; a checkpoint at ``split`` if given."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 5))
    sparsifier = sparsetrain.create("set", model, sparsity=0.8, total_steps=60, unit="steps", delta=5, t_end=45,
                                    **options)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    events, grown, saved = [], [], None
    sparsifier.subscribe(lambda e: events.append(e) if e["event"] == "drop_grow" else None)
    for step in range(steps):
        if step == split:
            saved = roundtrip({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "sparsifier": sparsifier.state_dict()})  # fmt: skip
        before = {n: m.clone() for n, m in sparsifier.masks.items()}
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        if sparsifier.mask_version and any(not torch.equal(before[n], sparsifier.masks[n]) for n in before):
            # update steps skip the optimizer step: the grown weights are exactly as the update set them
            grown.append({n: p.detach()[sparsifier.masks[n] & ~before[n]].clone()
                          for n, p in sparsifier.params.items()})  # fmt: skip
    return model, sparsifier, events, grown, saved


def test_set_constant_zeta_drops_alpha_at_every_update():
    _, sparsifier, events, _, _ = _set_run(drop_schedule="constant", alpha=0.3)
    assert [e["step"] for e in events] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(e["fraction"] == 0.3 for e in events)
    # each layer drops and regrows round(0.3 * active) every time: 0.3 of 200 kept weights in the first layer
    assert all(e["regrown"] > 0 for e in events)
    assert sparsifier.drop_fraction(40) == 0.3 and _set_run(steps=0)[1].drop_fraction(40) < 0.3 / 2


def test_set_random_regrowth_draws_new_weights_at_the_init_scale():
    _, sparsifier, _, grown, _ = _set_run(grow_init="random")
    assert set(sparsifier.init_rms) == set(sparsifier.params) and all(r > 0 for r in sparsifier.init_rms.values())
    values = {n: torch.cat([g[n] for g in grown]) for n in sparsifier.params}
    for name, v in values.items():
        assert v.numel() > 30 and bool((v != 0).all()), name  # not 0: drawn
        rms = float(v.pow(2).mean().sqrt())
        assert 0.75 < rms / sparsifier.init_rms[name] < 1.25, (name, rms, sparsifier.init_rms[name])
        assert abs(float(v.mean())) < 0.3 * rms  # zero-mean
    # the init's scale is the rescaled one (rescale_init on): the kept init weights of the first layer
    torch.manual_seed(0)
    first = nn.Linear(20, 50).weight.detach()
    assert sparsifier.init_rms["0.weight"] > float(first.pow(2).mean().sqrt()) * 1.5  # 20% kept: ~sqrt(5) larger
    # zero regrowth (the default) really is zero
    _, _, _, zero_grown, _ = _set_run()
    assert all(bool((g[n] == 0).all()) for g in zero_grown for n in g)


def test_set_random_regrowth_is_a_function_of_seed_and_step_and_resumes_bit_identically():
    model_a, *_ = _set_run(grow_init="random", drop_schedule="constant")
    model_b, _, _, _, saved = _set_run(grow_init="random", drop_schedule="constant", split=23)
    assert all(torch.equal(a, b) for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    torch.manual_seed(5)  # a different init: the checkpoint replaces it, init_rms included
    model = nn.Sequential(nn.Linear(20, 50), nn.ReLU(), nn.Linear(50, 30), nn.ReLU(), nn.Linear(30, 5))
    sparsifier = sparsetrain.create("set", model, sparsity=0.8, total_steps=60, unit="steps", delta=5, t_end=45,
                                    grow_init="random", drop_schedule="constant")  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    sparsifier.load_state_dict(saved["sparsifier"])
    sparsifier.attach(optimizer)
    for step in range(23, 60):
        x = torch.randn(16, 20, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    for (name, a), b in zip(model_a.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_set_option_values_are_checked():
    model = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="drop_schedule must be one of cosine, constant; got 'linear'"):
        sparsetrain.create("set", model, sparsity=0.5, total_steps=10, drop_schedule="linear")
    with pytest.raises(ValueError, match="grow_init must be one of zero, random; got 'normal'"):
        sparsetrain.create("set", model, sparsity=0.5, total_steps=10, grow_init="normal")


def _masks_after(method: str, seed: int, steps: int = 20) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))
    sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=40, unit="steps", delta=4, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier.attach(optimizer)
    for step in range(steps):
        x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    return sparsifier.masks


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_masks_are_a_function_of_seed_and_step(method):
    a, b, c = _masks_after(method, 1), _masks_after(method, 1), _masks_after(method, 2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_rigl_with_gradient_accumulation_grows_by_the_accumulated_gradient():
    """Two micro-batches accumulate into .grad; the update at optimizer.step() sees their sum."""
    model = one_row_model()
    sparsifier = sparsetrain.create("rigl", model, sparsity=0.5, total_steps=100, unit="steps", delta=1,
                                    alpha=0.5, t_end=10_000, distribution="uniform")  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    model.weight.grad = torch.zeros(1, 8)
    optimizer.step()
    sparsifier.set_masks({"weight": torch.tensor([[True, True, True, True, False, False, False, False]])}, "test")
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[4.0, 3.0, 0.1, 0.2, 0, 0, 0, 0]]))
    optimizer.zero_grad()
    # micro-batch 1 favours position 7, micro-batch 2 pulls 5 and 6 far enough that the sum favours 5 and 6.
    for target in (torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1.0]]), torch.tensor([[0, 0, 0, 0, 0, 2.0, -2.0, 0]])):
        x = torch.eye(8)
        (model(x).view(1, 8) * target).sum().backward()
    optimizer.step()
    assert torch.equal(sparsifier.masks["weight"], torch.tensor([[True, True, False, False, False, True, True, False]]))


def test_gap_rotation_matches_table():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    sparsifier = sparsetrain.create("gap", model, sparsity=0.75, total_steps=30, unit="steps", groups=2, rounds=2,
                                    period=5)  # fmt: skip
    # step -> dense group: 0-4 group 0, 5-9 group 1, 10-14 group 0, 15-19 group 1, then fine-tuning (None)
    table = [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5 + [None] * 10
    assert [sparsifier.dense_group_at(s) for s in range(30)] == table
    assert sparsifier.group_names == [["0.weight", "1.weight"], ["2.weight", "3.weight"]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier.attach(optimizer)
    for step in range(30):
        group = table[step]
        dense = {n for n, m in sparsifier.masks.items() if bool(m.all())}
        assert dense == (set() if group is None else set(sparsifier.group_names[group])), step
        for name, mask in sparsifier.masks.items():
            if name not in dense:
                assert int((~mask).sum()) == 64 - keep_count(64, 0.75)
        optimizer.zero_grad()
        (model(torch.randn(4, 8)) - 1).pow(2).mean().backward()
        optimizer.step()
    assert sparsifier.phase == "sparse" and sparsifier.sparsity().overall == pytest.approx(0.75)


def test_gap_partition_by_patterns_and_errors():
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(3)])
    s = sparsetrain.create("gap", model, sparsity=0.5, total_steps=30, partition=[["0.*", "2.*"], ["1.*"]])
    assert s.group_names == [["0.weight", "2.weight"], ["1.weight"]]
    with pytest.raises(ValueError, match="exactly once"):
        sparsetrain.create("gap", model, sparsity=0.5, total_steps=30, partition=[["0.*"], ["1.*"]])
    with pytest.raises(ValueError, match="do not fit"):
        sparsetrain.create("gap", model, sparsity=0.5, total_steps=30, unit="steps", period=20, groups=3)


LENET5_SIZES = [150, 2400, 48000, 10080, 840]  # conv1, conv2, fc1, fc2, fc3 for 28x28 inputs


def by_count(n: int, groups: int) -> list[tuple[int, int]]:
    """The old rule: as many tensors per group as possible, the first groups one larger."""
    size, extra = divmod(n, groups)
    bounds, start = [], 0
    for i in range(groups):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def largest(sizes, bounds) -> int:
    return max(sum(sizes[a:b]) for a, b in bounds)


def test_balanced_partition_by_hand():
    # By count (3 + 2 tensors): 3 | 7 parameters. Balanced: 4 | 6.
    assert balanced_partition([1, 1, 1, 1, 6], 2) == [(0, 4), (4, 5)]
    assert balanced_partition([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert balanced_partition([7], 1) == [(0, 1)]
    assert balanced_partition([3, 1, 2], 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="3 layers into 4"):
        balanced_partition([1, 2, 3], 4)


@pytest.mark.parametrize("groups", [2, 3, 4])
def test_balanced_partition_of_lenet5_is_contiguous_non_empty_and_no_worse_than_by_count(groups):
    bounds = balanced_partition(LENET5_SIZES, groups)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(LENET5_SIZES)
    assert all(a < b for a, b in bounds) and all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
    assert largest(LENET5_SIZES, bounds) <= largest(LENET5_SIZES, by_count(5, groups))


def test_balanced_partition_of_lenet5_in_3_groups_beats_the_tensor_count():
    # By count: conv1+conv2 | fc1+fc2 | fc3 = 2550 | 58080 | 840; balanced: 2550 | 48000 | 10920.
    # (With 4 groups both rules give conv1+conv2 | fc1 | fc2 | fc3: fc1 alone holds 78% of the weights.)
    assert by_count(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert balanced_partition(LENET5_SIZES, 3) == [(0, 2), (2, 3), (3, 5)]


def test_balanced_partition_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 7)
        sizes = [rng.choice([1, 10, 100, 1000]) * rng.randint(1, 9) for _ in range(n)]
        groups = rng.randint(1, n)
        candidates = []
        for cuts in itertools.combinations(range(1, n), groups - 1):
            edges = [0, *cuts, n]
            totals = [sum(sizes[a:b]) for a, b in zip(edges, edges[1:])]
            candidates.append((max(totals), sum(t * t for t in totals)))
        bounds = balanced_partition(sizes, groups)
        totals = [sum(sizes[a:b]) for a, b in bounds]
        assert (max(totals), sum(t * t for t in totals)) == min(candidates), (sizes, groups)


def test_gap_on_lenet5_groups_by_parameters():
    from sparsetrain.train.models import LeNet5

    s = sparsetrain.create("gap", LeNet5(1, 10), sparsity=0.9, total_steps=100, groups=3)
    assert s.group_names == [["features.0.weight", "features.3.weight"], ["classifier.1.weight"],
                             ["classifier.3.weight", "classifier.5.weight"]]  # fmt: skip
    # the phases' sparsities: the dense group's weights are out of the 90%
    phases = [s.target_sparsity_at(s.period_steps * g) for g in range(3)]
    assert phases == pytest.approx([0.9 * (1 - n / 61470) for n in (2550, 48000, 10920)])


@pytest.mark.parametrize("method, expected", [("gap", 3), ("pgap", 2)])
def test_gap_default_groups_fit_a_three_layer_mlp(method, expected):
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5))
    s = sparsetrain.create(method, model, sparsity=0.9, total_steps=100)
    assert len(s.group_names) == expected
    assert sorted(n for g in s.group_names for n in g) == ["0.weight", "2.weight", "4.weight"]
    # four layers or more: GaP's 4 groups
    deep = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    assert len(sparsetrain.create("gap", deep, sparsity=0.9, total_steps=100).group_names) == 4
    with pytest.raises(ValueError, match=r"groups must be an integer in \[1, 3\].*got 4"):
        sparsetrain.create(method, model, sparsity=0.9, total_steps=100, groups=4)


def test_gap_init_mask_random_is_drawn_from_the_seed():
    def masks(seed, init_mask):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 30), nn.Linear(30, 30), nn.Linear(30, 30))
        s = sparsetrain.create("gap", model, sparsity=0.8, total_steps=30, groups=3, init_mask=init_mask, seed=seed)
        return {n: m.clone() for n, m in s.masks.items()}, model

    (a, model), (b, _), (c, _) = masks(1, "random"), masks(1, "random"), masks(2, "random")
    magnitude, _ = masks(1, "magnitude")
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    assert bool(a["0.weight"].all())  # group 0 grows first: dense
    for name in ("1.weight", "2.weight"):
        assert int(a[name].sum()) == keep_count(900, 0.8)
        assert not torch.equal(a[name], magnitude[name])  # not the largest weights
    with pytest.raises(ValueError, match="init_mask must be one of magnitude, random; got 'largest'"):
        sparsetrain.create("gap", model, sparsity=0.8, total_steps=30, init_mask="largest")


def test_imp_rounds_compound_to_the_target_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 7))
    sparsifier = sparsetrain.create("imp", model, sparsity=0.9, total_steps=40, unit="steps", rounds=3, pretrain=10)
    assert sparsifier.round_starts == [10, 20, 30]
    total = 30 * 40 + 40 * 7
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsifier.attach(optimizer)
    kept = []
    for _step in range(40):
        optimizer.zero_grad()
        model(torch.randn(4, 30)).sum().backward()
        optimizer.step()
        kept.append(sum(int(m.sum()) for m in sparsifier.masks.values()))
    p = 1 - 0.1 ** (1 / 3)
    expected = [keep_count(total, 1 - (1 - p) ** r) for r in (1, 2, 3)]
    assert [kept[9], kept[19], kept[29]] == expected  # after the steps ending at 10, 20, 30
    assert kept[-1] == keep_count(total, 0.9) == round(0.1 * total)
    assert kept[8] == total


def test_imp_retraining_schedules():
    model = one_row_model()

    def imp(retrain):
        return sparsetrain.create("imp", model, sparsity=0.5, total_steps=100, unit="steps", rounds=2, pretrain=40,
                                  retrain=retrain)  # fmt: skip

    def base(step):  # the run's own schedule: linear decay 1 -> 0 over 100 steps
        return 1 - step / 100

    # pre-training: the schedule compressed into 40 steps
    assert imp("lrw").lr_factor(20, base) == pytest.approx(0.5)
    # FT: the last pre-training lr, whole round
    assert imp("ft").lr_factor(45, base) == pytest.approx(base(int(39 * 100 / 40)))
    # LRW: replay the last R = 30 steps of pre-training
    assert imp("lrw").lr_factor(40, base) == pytest.approx(base(int(10 * 100 / 40)))
    assert imp("lrw").lr_factor(70, base) == pytest.approx(base(int(10 * 100 / 40)))  # round 2 restarts
    # SLR: 10% warm-up (3 steps, half cosine) to the max, then the full schedule compressed into the rest
    assert imp("slr").lr_factor(40, base) == pytest.approx(0.25)  # (1 - cos(pi / 3)) / 2
    assert imp("slr").lr_factor(43, base) == pytest.approx(1.0)
    # CLR: the same warm-up, then a cosine from the max to the smallest pre-training lr, base(97) = 0.03
    assert imp("clr").lr_factor(42, base) == pytest.approx(1.0)
    assert imp("clr").lr_factor(55, base) == pytest.approx(0.03 + 0.97 * 0.5 * (1 + math.cos(math.pi * 12 / 27)))
    with pytest.raises(ValueError, match="retrain"):
        imp("sometimes")


def test_imp_rewinding_restores_early_weights():
    torch.manual_seed(0)
    model = nn.Linear(6, 4, bias=False)
    sparsifier = sparsetrain.create("imp", model, sparsity=0.5, total_steps=20, unit="steps", rounds=1, pretrain=10,
                                    rewind=2)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsifier.attach(optimizer)
    snapshot = None
    for step in range(10):
        if step == 2:
            snapshot = model.weight.detach().clone()
        optimizer.zero_grad()
        model(torch.randn(3, 6)).sum().backward()
        optimizer.step()
    mask = sparsifier.masks["weight"]
    assert torch.equal(model.weight.detach(), snapshot * mask)


FASHION_ARGS = dict(dataset="fashion-mnist", model="mlp", limit_train=6000, epochs=4, batch_size=100, lr=0.05)


@pytest.mark.parametrize(
    "method, options",
    [("rigl", {"delta": 20}), ("set", {"delta": 20}), ("gap", {"groups": 3}), ("imp", {"rounds": 2})],
)
def test_short_real_run_reaches_floor(method, options, tmp_path):
    pytest.importorskip("yaml")
    from sparsetrain.train.config import resolve
    from sparsetrain.train.data import DataError
    from sparsetrain.train.loop import Run

    config = resolve(None, {**FASHION_ARGS, "method": method, "sparsity": 0.9, "method_options": options,
                            "out": str(tmp_path / method)})  # fmt: skip
    try:
        summary = Run(config).run()
    except DataError:
        pytest.skip("Fashion-MNIST not installed")
    assert summary["sparse_model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert summary["sparse_model"]["test_acc"] > 72


@pytest.mark.parametrize("method", ["gap", "pgap"])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_gap_target_sparsity_is_the_masks_sparsity_at_every_step(method, distribution):
    """The schedule's target is exact: the fraction of zeros the masks hold, per-layer rounding and ERK included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 3))
    options = dict(groups=3, rounds=1, period=4) if method == "gap" else dict(rounds=2, period=4)
    s = sparsetrain.create(method, model, sparsity=0.7, total_steps=20, unit="steps", distribution=distribution,
                           **options)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    s.attach(optimizer)
    for _ in range(20):
        assert s.target_sparsity == s.sparsity_of_masks(), (s.count, s.phase)
        model(torch.randn(4, 10)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
