"""Static random sparsity: a random mask drawn once from the seed and kept for the whole run."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import Capability, ScheduledPruning, register
from ..schedules import OneShot


@register("static")
class Static(ScheduledPruning):
    """Random fixed mask from (seed), applied before the first step; the sparse-from-scratch baseline.

    The pair (:class:`~sparsetrain.schedules.OneShot` at step 0, random score). Per-layer counts follow
    ``distribution`` (default uniform; ERK as in Evci et al. 2020's static baseline). Mask type N:M picks N of
    every M at random.

    ``rescale_init`` (default on): when the mask is applied at step 0, each kept weight is multiplied by
    sqrt(fan_in / active fan-in) of its output unit, the sparse-aware init of Evci et al. (AAAI 2022), so the
    masked net keeps the dense init's signal scale; without it a deep net at high sparsity can stay at chance.
    Turn it off when the model is not freshly initialised (a loaded or pretrained model).
    """

    default_distribution = "uniform"
    capabilities = Capability.SPARSE | Capability.NM
    score = "random"
    reason = "static"

    def __init__(self, model: nn.Module, *, rescale_init: bool = True, **common: Any) -> None:
        self.rescale_init = rescale_init
        super().__init__(model, **common)

    def make_schedule(self) -> OneShot:
        return OneShot(0, self.final_sparsity)
