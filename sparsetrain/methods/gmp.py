"""Gradual magnitude pruning (GMP) on the cubic schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import Capability, ScheduledPruning, register
from ..schedules import Polynomial


@register("gmp")
class GMP(ScheduledPruning):
    """Gradual magnitude pruning: sparsity rises on a cubic schedule; pruned weights stay pruned.

    The pair (cubic :class:`~sparsetrain.schedules.Polynomial`, magnitude score among the surviving weights).

    s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t_end - t0))^3 at updates t0, t0 + dt, ..., t_end; at each update
    the largest |w| among the surviving weights are kept. ``start``/``end`` in ``unit`` (when left out: 20% and
    80% of the run, the from-scratch ImageNet recipe's epochs 20-79 of 100); ``frequency`` (dt) in steps,
    default one epoch when ``steps_per_epoch`` is known, else 1/50 of the pruning window.

    Reference: Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878.
    Differences from the paper: layer sparsities default to uniform (the paper's choice); global and ERK
    are available. N:M is not offered (a cubic ramp has no N:M meaning).
    """

    default_distribution = "uniform"
    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.CHANNEL
    keep_pruned = True
    reason = "gmp {sparsity:.4f}"

    def __init__(
        self,
        model: nn.Module,
        *,
        start: float | None = None,
        end: float | None = None,
        frequency: int | None = None,
        initial_sparsity: float = 0.0,
        **common: Any,
    ) -> None:
        self.start, self.end, self.frequency, self.initial_sparsity = start, end, frequency, initial_sparsity
        super().__init__(model, **common)

    def make_schedule(self) -> Polynomial:
        self.require_total_steps()
        self.start_step = self.steps(self.start, "start", default_fraction=0.2)
        self.end_step = self.steps(self.end, "end", default_fraction=0.8)
        if not 0 <= self.start_step <= self.end_step <= self.total_steps:
            raise ValueError(
                f"GMP needs 0 <= start <= end <= total; got start={self.start!r}, end={self.end!r} "
                f"({self.start_step}..{self.end_step} of {self.total_steps} steps, unit={self.unit!r})"
            )
        if not 0 <= self.initial_sparsity <= self.final_sparsity:
            raise ValueError(
                f"initial_sparsity must be in [0, sparsity={self.final_sparsity}], got {self.initial_sparsity!r}"
            )
        frequency = self.frequency
        if frequency is None:
            window = self.end_step - self.start_step
            frequency = self.steps_per_epoch or max(1, window // 50)
        schedule = Polynomial.every(
            self.start_step, self.end_step, int(frequency), self.initial_sparsity, self.final_sparsity
        )
        self.update_steps = list(schedule.update_steps)
        return schedule
