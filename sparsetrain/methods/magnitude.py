"""One-shot magnitude pruning at a chosen step, masks fixed afterwards."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import Sparsifier, register


@register("magnitude")
class Magnitude(Sparsifier):
    """One-shot magnitude pruning: at step ``at`` keep the largest |w|, then train with that mask fixed.

    ``at`` is in ``unit`` (default: fraction of training, 0 = prune at initialization, 0.5 = half-way and
    fine-tune the rest). Reference: Han et al. 2015, "Learning both weights and connections", arXiv 1506.02626.
    Differences from the paper: one round, no retraining schedule of its own (see ``imp`` for rounds).
    """

    capabilities = frozenset({"sparse", "mask_updates", "nm"})

    def __init__(self, model: nn.Module, *, at: float | None = None, **common: Any) -> None:
        self.at = at
        super().__init__(model, **common)

    def setup(self) -> None:
        self.prune_step = 0 if not self.at else self.steps(self.at, "at")

    def target_sparsity_at(self, step: int) -> float:
        return self.final_sparsity if step >= self.prune_step else 0.0

    def on_step(self, step: int) -> None:
        if step == self.prune_step:
            self.set_masks(self.compute_masks(self.final_sparsity, self.magnitude_scores()), reason="one-shot")
