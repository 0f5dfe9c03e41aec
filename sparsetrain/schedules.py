"""Pure schedules: functions of the step (and the run's length), nothing else.

The engine counts real optimizer steps; users may speak in steps, epochs or fractions of training.
``to_steps`` converts once, at construction, so every schedule below works in steps.

A sparsity schedule (:class:`Schedule`) answers four questions about a step: the sparsity it asks for, whether
the masks are updated there, the phase it belongs to, and (for the whole run) the timeline of phases. The
implementations are :class:`OneShot` (magnitude, static), :class:`Polynomial` (GMP's cubic ramp),
:class:`Cyclic` (AC/DC's alternating phases), :class:`Rounds` (IMP) and :class:`GroupCycles` (GaP's rotating
dense group). A method built on one (``sparsetrain.core.ScheduledPruning``) derives all four answers from it,
so they cannot disagree. :func:`half_cosine` is the one cosine every cosine-shaped rule uses (learning rates,
RigL's drop fraction, RDA's averaging weight, IMP's retraining).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

UNITS = ("fraction", "epochs", "steps")

__all__ = [
    "UNITS",
    "Phase",
    "resolve_total_steps",
    "to_steps",
    "cubic_sparsity",
    "gmp_update_steps",
    "acdc_phases",
    "phase_at",
    "half_cosine",
    "timeline_of",
    "cosine_decay",
    "polynomial_sparsity",
    "Schedule",
    "OneShot",
    "Polynomial",
    "Cyclic",
    "Rounds",
    "GroupCycles",
]


@dataclass(frozen=True)
class Phase:
    """A half-open interval of steps ``[start, end)`` in which the model is ``kind`` ('dense' or 'sparse')."""

    start: int
    end: int
    kind: str

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "kind": self.kind}


def resolve_total_steps(total_steps: int | None, total_epochs: float | None, steps_per_epoch: int | None) -> int | None:
    """The run's length in steps from ``total_steps`` or ``total_epochs * steps_per_epoch``."""
    if total_steps is not None:
        if int(total_steps) <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        return int(total_steps)
    if total_epochs is not None:
        if steps_per_epoch is None:
            raise ValueError("total_epochs needs steps_per_epoch (for example steps_per_epoch=len(loader))")
        if steps_per_epoch <= 0 or total_epochs <= 0:
            raise ValueError(
                f"total_epochs and steps_per_epoch must be positive, got {total_epochs!r} and {steps_per_epoch!r}"
            )
        return int(round(total_epochs * steps_per_epoch))
    return None


def to_steps(
    value: float, unit: str, *, total_steps: int | None, steps_per_epoch: int | None, what: str = "value"
) -> int:
    """Convert a duration or time point in ``unit`` ('fraction', 'epochs', 'steps') to whole steps."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    if unit == "steps":
        return int(round(value))
    if unit == "epochs":
        if steps_per_epoch is None:
            raise ValueError(f"{what} is in epochs; pass steps_per_epoch (for example len(loader))")
        return int(round(value * steps_per_epoch))
    if total_steps is None:
        raise ValueError(f"{what} is a fraction of training; pass total_steps, or total_epochs with steps_per_epoch")
    return int(round(value * total_steps))


def polynomial_sparsity(step: int, start: int, end: int, initial: float, final: float, power: int = 3) -> float:
    """s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^power, held at s_i before t0 and s_f from t_end."""
    if step <= start:
        return initial
    if step >= end or end <= start:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** power


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017) gradual pruning: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3."""
    return polynomial_sparsity(step, start, end, initial, final, power=3)


def gmp_update_steps(start: int, end: int, frequency: int) -> list[int]:
    """Mask-update steps t0, t0 + dt, ... before ``end``, and ``end`` itself (so the target is reached)."""
    if frequency <= 0:
        raise ValueError(f"frequency must be a positive number of steps, got {frequency!r}")
    steps = list(range(start, end, frequency))
    if not steps or steps[-1] != end:
        steps.append(end)
    return steps


def acdc_phases(
    total: int, warmup: int, compressed: int, decompressed: int, final: int, cycles: int | None = None
) -> list[Phase]:
    """AC/DC's timeline (Peste et al. 2021) in steps.

    Dense warm-up ``[0, warmup)``; then (compressed, decompressed) cycles while a whole cycle fits before the
    final compressed phase ``[total - final, total)`` (at most ``cycles`` of them when given); the last
    decompressed phase absorbs what is left.
    With (total, warmup, C, D, final) = (100, 10, 5, 5, 15) epochs this is the official ImageNet schedule:
    compressed at 10, 20, ..., 70; decompressed at 15, ..., 65 and a 10-epoch one at 75-84; final 85-99.
    """
    for name, value in (("warmup", warmup), ("final", final), ("compressed", compressed)):
        if value < 0:
            raise ValueError(f"AC/DC {name} length must be >= 0 steps, got {value}")
    if compressed <= 0 or decompressed <= 0:
        raise ValueError(
            f"AC/DC compressed and decompressed phases must be at least one step long; got "
            f"compressed={compressed}, decompressed={decompressed} steps"
        )
    if final <= 0:
        raise ValueError("AC/DC must end on a compressed phase: final must be at least one step")
    final_start = total - final
    if warmup > final_start:
        raise ValueError(
            f"AC/DC phases do not fit in the run: warmup ({warmup} steps) + final ({final} steps) "
            f"exceed the total of {total} steps; shorten them or train longer"
        )
    if cycles is not None and cycles < 1:
        raise ValueError(f"AC/DC cycles must be at least 1 (None: as many as fit), got {cycles}")
    phases: list[Phase] = []
    if warmup > 0:
        phases.append(Phase(0, warmup, "dense"))
    t, done = warmup, 0
    while t + compressed + decompressed <= final_start and (cycles is None or done < cycles):
        phases.append(Phase(t, t + compressed, "sparse"))
        phases.append(Phase(t + compressed, t + compressed + decompressed, "dense"))
        t, done = t + compressed + decompressed, done + 1
    if t < final_start:
        # Too little room for another whole cycle: extend the preceding dense phase (warm-up included).
        if phases and phases[-1].kind == "dense":
            last = phases.pop()
            phases.append(Phase(last.start, final_start, "dense"))
        else:
            phases.append(Phase(t, final_start, "dense"))
    phases.append(Phase(final_start, total, "sparse"))
    return phases


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase containing ``step``; steps past the end belong to the last phase."""
    for phase in phases:
        if phase.start <= step < phase.end:
            return phase
    return phases[-1]


def half_cosine(t: float, length: float = 1.0, *, rising: bool = False) -> float:
    """Half a cosine period over ``t`` in [0, length]: ``(1 + cos(pi t / length)) / 2``, from 1 down to 0.

    ``rising``: ``(1 - cos(pi t / length)) / 2``, from 0 up to 1 (warm-ups, RDA's averaging weight). Cosine
    annealing (Loshchilov & Hutter, "SGDR", arXiv 1608.03983) is ``low + (high - low) * half_cosine(t, T)``.
    The one cosine of the package: learning rates, IMP's retraining, RigL's drop fraction and RDA's ``a`` call it.
    """
    cosine = math.cos(math.pi * t / length)
    return 0.5 * (1.0 - cosine) if rising else 0.5 * (1.0 + cosine)


def cosine_decay(step: int, end: int, initial: float) -> float:
    """``initial / 2 * (1 + cos(pi * step / end))`` for step < end, then 0 (RigL's drop fraction)."""
    if step >= end:
        return 0.0
    return initial * half_cosine(step, end)


def timeline_of(phase_of: Callable[[int], str], end: int) -> list[Phase]:
    """Steps ``[0, end)`` as maximal intervals of equal ``phase_of(step)``: the timeline of any phase function."""
    phases: list[Phase] = []
    start = 0
    kind = phase_of(0)
    for step in range(1, end):
        now = phase_of(step)
        if now != kind:
            phases.append(Phase(start, step, kind))
            start, kind = step, now
    phases.append(Phase(start, end, kind))
    return phases


# ------------------------------------------------------------------------------------------ sparsity schedules
class Schedule:
    """What a sparsity schedule says about step ``t``: the sparsity, whether masks update, the phase; the timeline.

    Subclasses implement ``sparsity_at`` and ``is_update_step``; the phase defaults to 'sparse' where the
    sparsity is above 0, else 'dense', and the timeline is read off ``phase_at``.
    """

    def sparsity_at(self, step: int) -> float:
        """The sparsity the masks in force while taking step ``step`` have (the schedule's target)."""
        raise NotImplementedError

    def is_update_step(self, step: int) -> bool:
        """Whether the masks are (re)computed at the boundary before step ``step``."""
        raise NotImplementedError

    def phase_at(self, step: int) -> str:
        """The phase step ``step`` belongs to: 'dense' or 'sparse', or a schedule's own names."""
        return "sparse" if self.sparsity_at(step) > 0 else "dense"

    def timeline(self, end: int) -> list[Phase]:
        """The phases of steps ``[0, end)`` as maximal intervals of equal ``phase_at``."""
        return timeline_of(self.phase_at, end)


@dataclass(frozen=True)
class OneShot(Schedule):
    """Dense until ``step``, then ``sparsity`` for the rest of the run; one mask update, at ``step``."""

    step: int
    sparsity: float

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if step >= self.step else 0.0

    def is_update_step(self, step: int) -> bool:
        return step == self.step


@dataclass(frozen=True)
class Polynomial(Schedule):
    """Gradual pruning (Zhu & Gupta 2017, arXiv 1710.01878): ``polynomial_sparsity`` sampled at ``update_steps``.

    Between updates the sparsity is the one set at the last update at or before the step; before ``start`` 0.
    """

    start: int
    end: int
    update_steps: tuple[int, ...]
    initial: float
    final: float
    power: int = 3

    @classmethod
    def every(cls, start: int, end: int, frequency: int, initial: float, final: float, power: int = 3) -> Polynomial:
        """Updates at start, start + frequency, ... and at ``end`` (``gmp_update_steps``)."""
        return cls(start, end, tuple(gmp_update_steps(start, end, frequency)), initial, final, power)

    def sparsity_at(self, step: int) -> float:
        if step < self.start:
            return 0.0
        # The mask in force is the one set at the last update step at or before ``step``.
        last = self.update_steps[bisect.bisect_right(self.update_steps, step) - 1]
        return polynomial_sparsity(last, self.start, self.end, self.initial, self.final, self.power)

    def is_update_step(self, step: int) -> bool:
        index = bisect.bisect_left(self.update_steps, step)
        return index < len(self.update_steps) and self.update_steps[index] == step


@dataclass(frozen=True)
class Cyclic(Schedule):
    """Alternating phases (AC/DC's ``acdc_phases``): ``sparsity`` in the 'sparse' ones, 0 in the 'dense' ones.

    The masks update at every phase start: a compression at a sparse start, a decompression at a dense one
    (none at step 0: a run starts dense).
    """

    phases: tuple[Phase, ...]
    sparsity: float
    _starts: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", frozenset(p.start for p in self.phases))

    def sparsity_at(self, step: int) -> float:
        return self.sparsity if self.phase_at(step) == "sparse" else 0.0

    def is_update_step(self, step: int) -> bool:
        return step in self._starts and (step > 0 or self.phase_at(0) == "sparse")

    def phase_at(self, step: int) -> str:
        return phase_at(self.phases, step).kind

    def timeline(self, end: int) -> list[Phase]:
        return list(self.phases)


@dataclass(frozen=True)
class Rounds(Schedule):
    """IMP's rounds: dense for ``pretrain`` steps, then ``rounds`` rounds of ``round_steps``, each pruning more.

    Round r (1-based) runs at s_r = 1 - (1 - s)^(r / n): every round removes the same fraction of the surviving
    weights and the last lands exactly on ``sparsity``. Phases 'dense', 'round1', 'round2', ...
    """

    pretrain: int
    round_steps: int
    rounds: int
    sparsity: float

    @property
    def starts(self) -> list[int]:
        return [self.pretrain + r * self.round_steps for r in range(self.rounds)]

    def round_at(self, step: int) -> int:
        """0 during pre-training, else the 1-based round."""
        if step < self.pretrain:
            return 0
        return min(self.rounds, 1 + (step - self.pretrain) // self.round_steps)

    def round_sparsity(self, r: int) -> float:
        """Sparsity after round r (1-based); round n is exactly the target."""
        if r >= self.rounds:
            return self.sparsity
        return 1.0 - (1.0 - self.sparsity) ** (r / self.rounds)

    def sparsity_at(self, step: int) -> float:
        r = self.round_at(step)
        return 0.0 if r == 0 else self.round_sparsity(r)

    def is_update_step(self, step: int) -> bool:
        return (
            step >= self.pretrain
            and (step - self.pretrain) % self.round_steps == 0
            and ((step - self.pretrain) // self.round_steps < self.rounds)
        )

    def phase_at(self, step: int) -> str:
        r = self.round_at(step)
        return "dense" if r == 0 else f"round{r}"


@dataclass(frozen=True)
class GroupCycles(Schedule):
    """GaP's rotation: one group of layers dense for ``period`` steps at a time, then all sparse from ``fine_tune``.

    The dense group at step t < ``fine_tune`` is ``(offset + t // period) % len(group_sparsity)`` (parallel GaP
    offsets it by the rank). ``group_sparsity[g]`` is the sparsity while group g is dense, ``sparsity`` the one
    from ``fine_tune`` on: given as the exact fractions of zeros the masks hold, the schedule is exact. Masks
    update at every period start up to ``fine_tune`` included. Phases 'grow0', 'grow1', ... and 'sparse'.
    """

    period: int
    fine_tune: int
    group_sparsity: tuple[float, ...]
    sparsity: float
    offset: int = 0

    def dense_group_at(self, step: int) -> int | None:
        """Index of the dense group at ``step``; None once fine-tuning has started."""
        if step >= self.fine_tune:
            return None
        return (self.offset + step // self.period) % len(self.group_sparsity)

    def sparsity_at(self, step: int) -> float:
        group = self.dense_group_at(step)
        return self.sparsity if group is None else self.group_sparsity[group]

    def is_update_step(self, step: int) -> bool:
        return step % self.period == 0 and step <= self.fine_tune

    def phase_at(self, step: int) -> str:
        group = self.dense_group_at(step)
        return "sparse" if group is None else f"grow{group}"
