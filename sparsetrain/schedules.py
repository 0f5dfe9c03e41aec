"""Pure schedules: functions of the step (and the run's length), nothing else.

The engine counts real optimizer steps; users may speak in steps, epochs or fractions of training.
``to_steps`` converts once, at construction, so every schedule below works in steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    "cosine_decay",
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


def cubic_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017) gradual pruning: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3."""
    if step <= start:
        return initial
    if step >= end or end <= start:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def gmp_update_steps(start: int, end: int, frequency: int) -> list[int]:
    """Mask-update steps t0, t0 + dt, ... before ``end``, and ``end`` itself (so the target is reached)."""
    if frequency <= 0:
        raise ValueError(f"frequency must be a positive number of steps, got {frequency!r}")
    steps = list(range(start, end, frequency))
    if not steps or steps[-1] != end:
        steps.append(end)
    return steps


def acdc_phases(total: int, warmup: int, compressed: int, decompressed: int, final: int) -> list[Phase]:
    """AC/DC's timeline (Peste et al. 2021) in steps.

    Dense warm-up ``[0, warmup)``; then (compressed, decompressed) cycles while a whole cycle fits before the
    final compressed phase ``[total - final, total)``; the last decompressed phase absorbs what is left.
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
    phases: list[Phase] = []
    if warmup > 0:
        phases.append(Phase(0, warmup, "dense"))
    t = warmup
    while t + compressed + decompressed <= final_start:
        phases.append(Phase(t, t + compressed, "sparse"))
        phases.append(Phase(t + compressed, t + compressed + decompressed, "dense"))
        t += compressed + decompressed
    if t < final_start:
        # Too little room for another whole cycle: extend the preceding dense phase (warm-up included).
        if phases and phases[-1].kind == "dense":
            last = phases.pop()
            phases.append(Phase(last.start, final_start, "dense"))
        else:
            phases.append(Phase(t, final_start, "dense"))
    phases.append(Phase(final_start, total, "sparse"))
    return phases


def phase_at(phases: list[Phase], step: int) -> Phase:
    """The phase containing ``step``; steps past the end belong to the last phase."""
    for phase in phases:
        if phase.start <= step < phase.end:
            return phase
    return phases[-1]


def cosine_decay(step: int, end: int, initial: float) -> float:
    """``initial / 2 * (1 + cos(pi * step / end))`` for step < end, then 0 (RigL's drop fraction)."""
    if step >= end:
        return 0.0
    return initial / 2.0 * (1.0 + math.cos(math.pi * step / end))
