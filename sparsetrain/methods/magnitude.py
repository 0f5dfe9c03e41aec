"""One-shot magnitude pruning at a chosen step, masks fixed afterwards."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import Capability, ScheduledPruning, register
from ..schedules import OneShot


@register("magnitude")
class Magnitude(ScheduledPruning):
    """One-shot magnitude pruning: at step ``at`` keep the largest |w|, then train with that mask fixed.

    The pair (:class:`~sparsetrain.schedules.OneShot` at ``at``, magnitude score). ``at`` is in ``unit``
    (default: fraction of training, 0 = prune at initialization, 0.5 = half-way and fine-tune the rest).
    Reference: Han et al. 2015, "Learning both weights and connections", arXiv 1506.02626.
    Differences from the paper: one round, no retraining schedule of its own (see ``imp`` for rounds).
    """

    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.NM | Capability.CHANNEL
    reason = "one-shot"

    def __init__(self, model: nn.Module, *, at: float | None = None, **common: Any) -> None:
        self.at = at
        super().__init__(model, **common)

    def make_schedule(self) -> OneShot:
        return OneShot(0 if not self.at else self.steps(self.at, "at"), self.final_sparsity)

    @property
    def prune_step(self) -> int:
        return self.schedule.step
