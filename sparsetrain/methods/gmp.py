"""Gradual magnitude pruning (GMP) on the cubic schedule of Zhu & Gupta (2017)."""

from __future__ import annotations

import bisect
from typing import Any

from torch import nn

from ..core import Sparsifier, register
from ..schedules import cubic_sparsity, gmp_update_steps


@register("gmp")
class GMP(Sparsifier):
    """Gradual magnitude pruning: sparsity rises on a cubic schedule; pruned weights stay pruned.

    s_t = s_f + (s_i - s_f)(1 - (t - t0) / (t_end - t0))^3 at updates t0, t0 + dt, ..., t_end; at each update
    the largest |w| among the surviving weights are kept. ``start``/``end`` in ``unit`` (when left out: 20% and
    80% of the run, the from-scratch ImageNet recipe's epochs 20-79 of 100); ``frequency`` (dt) in steps,
    default one epoch when ``steps_per_epoch`` is known, else 1/50 of the pruning window.

    Reference: Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878.
    Differences from the paper: layer sparsities default to uniform (the paper's choice); global and ERK
    are available. N:M is not offered (a cubic ramp has no N:M meaning).
    """

    default_distribution = "uniform"
    capabilities = frozenset({"sparse", "mask_updates"})

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

    def setup(self) -> None:
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
        self.update_steps = gmp_update_steps(self.start_step, self.end_step, int(frequency))
        self._update_set = set(self.update_steps)

    def target_sparsity_at(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        # The mask in force is the one set at the last update step at or before ``step``.
        last = self.update_steps[bisect.bisect_right(self.update_steps, step) - 1]
        return cubic_sparsity(last, self.start_step, self.end_step, self.initial_sparsity, self.final_sparsity)

    def on_step(self, step: int) -> None:
        if step in self._update_set:
            target = self.target_sparsity_at(step)
            masks = self.compute_masks(target, self.magnitude_scores(), among_active=True)
            self.set_masks(masks, reason=f"gmp {target:.4f}")
