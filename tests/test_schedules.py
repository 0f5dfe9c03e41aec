"""Tests for sparsetrain.schedules: cubic GMP schedule, AC/DC timelines (official tables), unit conversion."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsetrain
from sparsetrain.schedules import (
    Cyclic,
    GroupCycles,
    OneShot,
    Phase,
    Polynomial,
    Rounds,
    acdc_phases,
    cosine_decay,
    cubic_sparsity,
    gmp_update_steps,
    half_cosine,
    phase_at,
    resolve_total_steps,
    to_steps,
)

# Official AC/DC ImageNet schedule (IST-DASLab/ACDC, 100 epochs), one letter per epoch: D dense, S sparse.
# Dense warm-up 0-9; sparse 10-14, 20-24, ..., 70-74; dense 15-19, ..., 65-69 and 75-84; final sparse 85-99.
IMAGENET_100 = (
    "DDDDDDDDDD"  # 0-9    warm-up
    "SSSSSDDDDD"  # 10-19
    "SSSSSDDDDD"  # 20-29
    "SSSSSDDDDD"  # 30-39
    "SSSSSDDDDD"  # 40-49
    "SSSSSDDDDD"  # 50-59
    "SSSSSDDDDD"  # 60-69
    "SSSSSDDDDD"  # 70-79  (75-79 dense: start of the 10-epoch decompressed phase)
    "DDDDDSSSSS"  # 80-89  (80-84 dense; 85- final compressed)
    "SSSSSSSSSS"  # 90-99
)
KIND = {"D": "dense", "S": "sparse"}
IMAGENET_TABLE = {epoch: KIND[letter] for epoch, letter in enumerate(IMAGENET_100)}

# CIFAR-100 WRN-28-10, 200 epochs: warm-up 10, 20-epoch phases, final compressed 170-199.
CIFAR_200_PHASES = [
    Phase(0, 10, "dense"),
    Phase(10, 30, "sparse"),
    Phase(30, 50, "dense"),
    Phase(50, 70, "sparse"),
    Phase(70, 90, "dense"),
    Phase(90, 110, "sparse"),
    Phase(110, 130, "dense"),
    Phase(130, 150, "sparse"),
    Phase(150, 170, "dense"),
    Phase(170, 200, "sparse"),
]


def test_imagenet_table_literal_is_well_formed():
    assert len(IMAGENET_100) == 100
    assert IMAGENET_100.count("D") == 50
    assert IMAGENET_100.count("S") == 50


# ----------------------------------------------------------------------------------------------- cubic
def test_cubic_endpoints():
    assert cubic_sparsity(10, 10, 30, 0.0, 0.8) == 0.0
    assert cubic_sparsity(0, 10, 30, 0.1, 0.8) == 0.1  # before start
    assert cubic_sparsity(30, 10, 30, 0.0, 0.8) == 0.8
    assert cubic_sparsity(31, 10, 30, 0.0, 0.8) == 0.8
    assert cubic_sparsity(10_000, 10, 30, 0.0, 0.8) == 0.8


def test_cubic_midpoint_by_hand():
    # s_f + (s_i - s_f)(1 - 0.5)^3 = 0.8 - 0.8 / 8 = 0.7
    assert cubic_sparsity(20, 10, 30, 0.0, 0.8) == pytest.approx(0.7, abs=1e-12)
    # With s_i = 0.5, s_f = 0.9: 0.9 - 0.4 / 8 = 0.85
    assert cubic_sparsity(20, 10, 30, 0.5, 0.9) == pytest.approx(0.85, abs=1e-12)
    # A quarter of the way: 0.9 - 0.9 * 0.75^3 = 0.9 - 0.3796875 = 0.5203125
    assert cubic_sparsity(15, 10, 30, 0.0, 0.9) == pytest.approx(0.5203125, abs=1e-12)


def test_cubic_monotone_non_decreasing():
    values = [cubic_sparsity(t, 5, 105, 0.0, 0.98) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[0] == 0.0 and values[-1] == 0.98
    # Cubic: fast early, slow late.
    assert values[30] - values[5] > values[105] - values[80]


def test_cubic_zero_length_window():
    assert cubic_sparsity(10, 10, 10, 0.0, 0.9) == 0.0
    assert cubic_sparsity(11, 10, 10, 0.0, 0.9) == 0.9


# ----------------------------------------------------------------------------------------------- gmp updates
@pytest.mark.parametrize(
    ("start", "end", "frequency", "expected"),
    [
        (0, 10, 3, [0, 3, 6, 9, 10]),
        (0, 9, 3, [0, 3, 6, 9]),
        (20, 80, 10, [20, 30, 40, 50, 60, 70, 80]),
        (5, 5, 4, [5]),
        (0, 4, 1, [0, 1, 2, 3, 4]),
    ],
)
def test_gmp_update_steps(start, end, frequency, expected):
    steps = gmp_update_steps(start, end, frequency)
    assert steps == expected
    assert steps[0] == start and steps[-1] == end


@pytest.mark.parametrize("frequency", [0, -1])
def test_gmp_update_steps_rejects_bad_frequency(frequency):
    with pytest.raises(ValueError, match="frequency"):
        gmp_update_steps(0, 10, frequency)


# ----------------------------------------------------------------------------------------------- AC/DC
def _kind_per_epoch(phases: list[Phase], total_epochs: int, steps_per_epoch: int) -> dict[int, str]:
    """Phase kind of every step of every epoch, checked constant within each epoch."""
    out = {}
    for epoch in range(total_epochs):
        kinds = {phase_at(phases, epoch * steps_per_epoch + k).kind for k in range(steps_per_epoch)}
        assert len(kinds) == 1, f"epoch {epoch} straddles a phase boundary: {kinds}"
        out[epoch] = kinds.pop()
    return out


def test_acdc_imagenet_official_table_epochs():
    phases = acdc_phases(100, warmup=10, compressed=5, decompressed=5, final=15)
    assert _kind_per_epoch(phases, 100, 1) == IMAGENET_TABLE


def test_acdc_imagenet_phase_list():
    phases = acdc_phases(100, warmup=10, compressed=5, decompressed=5, final=15)
    expected = [Phase(0, 10, "dense")]
    for start in range(10, 70, 10):
        expected += [Phase(start, start + 5, "sparse"), Phase(start + 5, start + 10, "dense")]
    expected += [Phase(70, 75, "sparse"), Phase(75, 85, "dense"), Phase(85, 100, "sparse")]
    assert phases == expected


def test_acdc_imagenet_official_table_in_steps():
    spe = 7
    phases = acdc_phases(100 * spe, warmup=10 * spe, compressed=5 * spe, decompressed=5 * spe, final=15 * spe)
    assert _kind_per_epoch(phases, 100, spe) == IMAGENET_TABLE
    # Every boundary is a multiple of 7 and the phases tile [0, 700).
    assert phases[0].start == 0 and phases[-1].end == 700
    for a, b in zip(phases, phases[1:]):
        assert a.end == b.start
        assert a.kind != b.kind
        assert a.end % spe == 0


def test_acdc_imagenet_50_dense_50_sparse():
    phases = acdc_phases(100, warmup=10, compressed=5, decompressed=5, final=15)
    dense = sum(p.end - p.start for p in phases if p.kind == "dense")
    sparse = sum(p.end - p.start for p in phases if p.kind == "sparse")
    assert (dense, sparse) == (50, 50)
    assert sum(1 for p in phases if p.kind == "sparse") == 8  # 7 cycles + the final phase


def test_acdc_cifar100_wrn_200_epochs():
    phases = acdc_phases(200, warmup=10, compressed=20, decompressed=20, final=30)
    assert phases == CIFAR_200_PHASES
    table = _kind_per_epoch(phases, 200, 1)
    for epoch in (10, 50, 90, 130, *range(170, 200)):
        assert table[epoch] == "sparse", epoch
    for epoch in (*range(0, 10), 30, 70, 110, *range(150, 170)):
        assert table[epoch] == "dense", epoch


def test_acdc_ends_sparse_and_tiles_run():
    for args in [(100, 10, 5, 5, 15), (37, 3, 4, 2, 5), (50, 0, 3, 7, 10), (30, 25, 5, 5, 5)]:
        phases = acdc_phases(*args)
        total, final = args[0], args[4]
        assert phases[0].start == 0
        assert phases[-1] == Phase(total - final, total, "sparse")
        for a, b in zip(phases, phases[1:]):
            assert a.end == b.start
            assert a.kind != b.kind
            assert a.end > a.start


def test_acdc_leftover_extends_last_dense_phase():
    # total 37, warm-up 3, C=4, D=2, final 5: cycles at 3, 9, 15, 21 (21 + 6 = 27 <= 32), 27 + 6 > 32,
    # so the dense phase 25-27 absorbs 27-32.
    phases = acdc_phases(37, warmup=3, compressed=4, decompressed=2, final=5)
    assert phases == [
        Phase(0, 3, "dense"),
        Phase(3, 7, "sparse"),
        Phase(7, 9, "dense"),
        Phase(9, 13, "sparse"),
        Phase(13, 15, "dense"),
        Phase(15, 19, "sparse"),
        Phase(19, 21, "dense"),
        Phase(21, 25, "sparse"),
        Phase(25, 32, "dense"),
        Phase(32, 37, "sparse"),
    ]


def test_acdc_warmup_absorbs_leftover_when_no_cycle_fits():
    # 25 + 10 > 25: no cycle fits; warm-up runs to the final phase.
    assert acdc_phases(30, warmup=20, compressed=5, decompressed=5, final=5) == [
        Phase(0, 25, "dense"),
        Phase(25, 30, "sparse"),
    ]


def test_phase_at_past_the_end_is_last_phase():
    phases = acdc_phases(100, warmup=10, compressed=5, decompressed=5, final=15)
    assert phase_at(phases, 100) == Phase(85, 100, "sparse")
    assert phase_at(phases, 10_000).kind == "sparse"


@pytest.mark.parametrize(
    ("total", "warmup", "final"),
    [(100, 60, 50), (100, 90, 15), (10, 1, 11)],
)
def test_acdc_phases_do_not_fit(total, warmup, final):
    with pytest.raises(ValueError, match="do not fit") as info:
        acdc_phases(total, warmup=warmup, compressed=5, decompressed=5, final=final)
    message = str(info.value)
    assert str(warmup) in message and str(final) in message and str(total) in message


def test_acdc_exact_fit_is_allowed():
    assert acdc_phases(100, warmup=85, compressed=5, decompressed=5, final=15) == [
        Phase(0, 85, "dense"),
        Phase(85, 100, "sparse"),
    ]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"warmup": 10, "compressed": 0, "decompressed": 5, "final": 15}, "compressed"),
        ({"warmup": 10, "compressed": 5, "decompressed": 0, "final": 15}, "decompressed"),
        ({"warmup": 10, "compressed": 5, "decompressed": 5, "final": 0}, "final"),
        ({"warmup": -1, "compressed": 5, "decompressed": 5, "final": 15}, "warmup"),
    ],
)
def test_acdc_phases_reject_bad_lengths(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        acdc_phases(100, **kwargs)


# ----------------------------------------------------------------------------------------------- public API
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_acdc_public_api_imagenet_table_in_epochs():
    sparsifier = sparsetrain.create(
        "acdc",
        _model(),
        sparsity=0.9,
        total_epochs=100,
        steps_per_epoch=3,
        unit="epochs",
        warmup=10,
        compressed=5,
        decompressed=5,
        final=15,
    )
    assert sparsifier.total_steps == 300
    for epoch in range(100):
        assert sparsifier.phase_at(epoch * 3) == IMAGENET_TABLE[epoch], epoch
        assert sparsifier.phase_at(epoch * 3 + 2) == IMAGENET_TABLE[epoch], epoch
    for epoch, kind in IMAGENET_TABLE.items():
        expected_target = 0.9 if kind == "sparse" else 0.0
        assert sparsifier.target_sparsity_at(epoch * 3) == expected_target
    timeline = sparsifier.timeline()
    assert timeline[0] == Phase(0, 30, "dense")
    assert timeline[-2:] == [Phase(225, 255, "dense"), Phase(255, 300, "sparse")]


def test_acdc_public_api_default_fractions_give_imagenet_table():
    sparsifier = sparsetrain.create("acdc", _model(), sparsity=0.9, total_epochs=100, steps_per_epoch=3)
    for epoch in range(100):
        assert sparsifier.phase_at(epoch * 3) == IMAGENET_TABLE[epoch], epoch
        assert sparsifier.phase_at(epoch * 3 + 1) == IMAGENET_TABLE[epoch], epoch


def test_acdc_public_api_steps_unit():
    sparsifier = sparsetrain.create(
        "acdc",
        _model(),
        sparsity=0.9,
        total_steps=700,
        unit="steps",
        warmup=70,
        compressed=35,
        decompressed=35,
        final=105,
    )
    for epoch in range(100):
        assert sparsifier.phase_at(epoch * 7 + 3) == IMAGENET_TABLE[epoch], epoch


# ----------------------------------------------------------------------------------------------- units
def test_to_steps_units():
    assert to_steps(12, "steps", total_steps=None, steps_per_epoch=None) == 12
    assert to_steps(12.4, "steps", total_steps=None, steps_per_epoch=None) == 12
    assert to_steps(2.5, "epochs", total_steps=None, steps_per_epoch=4) == 10
    assert to_steps(10, "epochs", total_steps=None, steps_per_epoch=391) == 3910
    assert to_steps(0.25, "fraction", total_steps=200, steps_per_epoch=None) == 50
    assert to_steps(0.15, "fraction", total_steps=300, steps_per_epoch=None) == 45
    assert to_steps(0.05, "fraction", total_steps=300, steps_per_epoch=None) == 15
    assert to_steps(0, "fraction", total_steps=300, steps_per_epoch=None) == 0


def test_to_steps_epochs_need_steps_per_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch") as info:
        to_steps(5, "epochs", total_steps=1000, steps_per_epoch=None, what="warmup")
    assert "warmup" in str(info.value)


def test_to_steps_fraction_needs_total():
    with pytest.raises(ValueError, match="total_steps") as info:
        to_steps(0.1, "fraction", total_steps=None, steps_per_epoch=10, what="warmup")
    assert "warmup" in str(info.value)


@pytest.mark.parametrize("unit", ["epoch", "iterations", ""])
def test_to_steps_unknown_unit(unit):
    with pytest.raises(ValueError) as info:
        to_steps(1, unit, total_steps=10, steps_per_epoch=10)
    message = str(info.value)
    assert repr(unit) in message
    for allowed in ("fraction", "epochs", "steps"):
        assert allowed in message


@pytest.mark.parametrize("value", [-1, -0.1, None, "10", True])
def test_to_steps_bad_value(value):
    with pytest.raises(ValueError) as info:
        to_steps(value, "steps", total_steps=10, steps_per_epoch=10, what="final")
    assert repr(value) in str(info.value)
    assert "final" in str(info.value)


def test_resolve_total_steps():
    assert resolve_total_steps(500, None, None) == 500
    assert resolve_total_steps(None, 100, 3) == 300
    assert resolve_total_steps(None, 2.5, 4) == 10
    assert resolve_total_steps(None, None, 4) is None
    with pytest.raises(ValueError, match="steps_per_epoch"):
        resolve_total_steps(None, 100, None)
    with pytest.raises(ValueError, match="total_steps"):
        resolve_total_steps(0, None, None)


# ----------------------------------------------------------------------------------------------- cosine
def test_cosine_decay_endpoints():
    assert cosine_decay(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_decay(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_decay(25, 100, 0.3) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert cosine_decay(100, 100, 0.3) == 0.0
    assert cosine_decay(150, 100, 0.3) == 0.0
    values = [cosine_decay(t, 100, 0.3) for t in range(101)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_half_cosine_falls_and_rises():
    assert half_cosine(0.0) == 1.0 and half_cosine(1.0) == pytest.approx(0.0, abs=1e-15)
    assert half_cosine(0.5) == pytest.approx(0.5)
    assert half_cosine(25, 100) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))
    assert half_cosine(0, 10, rising=True) == 0.0 and half_cosine(10, 10, rising=True) == 1.0
    assert half_cosine(3, 10, rising=True) == pytest.approx(1 - half_cosine(3, 10))


def test_the_cosine_is_written_once():
    """Every cosine-shaped rule (LR schedules, IMP's retraining, RigL's drop fraction, RDA's a) calls half_cosine."""
    package = Path(sparsetrain.__file__).parent
    writers = [p.relative_to(package).as_posix() for p in package.rglob("*.py") if "cos(" in _code(p)]
    assert writers == ["schedules.py"]


def _code(path: Path) -> str:
    # Docstrings and comments may write the formula; code may not.
    return "\n".join(line for line in path.read_text().splitlines() if "math.cos" in line or "torch.cos" in line)


# ----------------------------------------------------------------------------------------------- Schedule objects
def test_one_shot_schedule():
    s = OneShot(3, 0.8)
    assert [s.sparsity_at(t) for t in range(5)] == [0.0, 0.0, 0.0, 0.8, 0.8]
    assert [t for t in range(10) if s.is_update_step(t)] == [3]
    assert s.timeline(6) == [Phase(0, 3, "dense"), Phase(3, 6, "sparse")]
    assert OneShot(0, 0.5).timeline(4) == [Phase(0, 4, "sparse")]


def test_polynomial_schedule_holds_the_last_update():
    s = Polynomial.every(10, 30, 10, 0.0, 0.8)
    assert s.update_steps == (10, 20, 30)
    assert [t for t in range(40) if s.is_update_step(t)] == [10, 20, 30]
    table = {0: 0.0, 9: 0.0, 10: 0.0, 19: 0.0, 20: pytest.approx(0.7), 29: pytest.approx(0.7), 30: 0.8, 99: 0.8}
    assert {t: s.sparsity_at(t) for t in table} == table
    assert s.timeline(40) == [Phase(0, 20, "dense"), Phase(20, 40, "sparse")]


def test_cyclic_schedule_is_the_acdc_table():
    s = Cyclic(tuple(acdc_phases(100, 10, 5, 5, 15)), 0.9)
    assert [s.phase_at(t) for t in range(100)] == [IMAGENET_TABLE[t] for t in range(100)]
    assert [s.sparsity_at(t) for t in range(100)] == [0.9 if IMAGENET_TABLE[t] == "sparse" else 0.0 for t in range(100)]
    # No update at 0: the warm-up starts dense.
    assert [t for t in range(100) if s.is_update_step(t)] == [*range(10, 80, 5), 85]
    assert s.timeline(100) == acdc_phases(100, 10, 5, 5, 15)


def test_rounds_schedule():
    s = Rounds(pretrain=6, round_steps=8, rounds=3, sparsity=0.875)
    assert [t for t in range(40) if s.is_update_step(t)] == s.starts == [6, 14, 22]
    assert [s.phase_at(t) for t in (0, 5, 6, 13, 14, 22, 39)] == ["dense"] * 2 + ["round1"] * 2 + [
        "round2",
        "round3",
        "round3",
    ]
    assert [s.sparsity_at(t) for t in (5, 6, 14, 22)] == [0.0, pytest.approx(0.5), pytest.approx(0.75), 0.875]


def test_group_cycles_schedule():
    s = GroupCycles(period=4, fine_tune=24, group_sparsity=(0.5, 0.6, 0.7), sparsity=0.9)
    assert [s.dense_group_at(t) for t in (0, 3, 4, 8, 12, 23, 24)] == [0, 0, 1, 2, 0, 2, None]
    assert [s.phase_at(t) for t in (0, 4, 24)] == ["grow0", "grow1", "sparse"]
    assert [s.sparsity_at(t) for t in (0, 4, 8, 24)] == [0.5, 0.6, 0.7, 0.9]
    assert [t for t in range(40) if s.is_update_step(t)] == [0, 4, 8, 12, 16, 20, 24]
    shifted = GroupCycles(period=4, fine_tune=8, group_sparsity=(0.5, 0.6), sparsity=0.9, offset=1)
    assert [shifted.dense_group_at(t) for t in (0, 4, 8)] == [1, 0, None]


@pytest.mark.parametrize("method", ["magnitude", "static", "gmp", "acdc", "imp", "gap", "pgap"])
def test_scheduled_methods_derive_everything_from_one_schedule(method):
    """phase_at, target_sparsity_at, timeline and the mask updates of a ScheduledPruning all come from its schedule."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    s = sparsetrain.create(method, model, sparsity=0.75, total_steps=40)
    assert isinstance(s, sparsetrain.ScheduledPruning)
    assert all(s.phase_at(t) == s.schedule.phase_at(t) for t in range(40))
    assert all(s.target_sparsity_at(t) == s.schedule.sparsity_at(t) for t in range(40))
    assert s.timeline() == s.schedule.timeline(40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    s.attach(optimizer)
    updates = {e["step"] for e in s.history if e["event"] == "mask_update"}
    for _ in range(40):
        model(torch.randn(4, 16)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    updates = {e["step"] for e in s.history if e["event"] == "mask_update"}
    assert updates == {t for t in range(40) if s.schedule.is_update_step(t)}
