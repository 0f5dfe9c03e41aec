"""Static random sparsity: a random mask drawn once from the seed and kept for the whole run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import Sparsifier, register


@register("static")
class Static(Sparsifier):
    """Random fixed mask from (seed), applied before the first step; the sparse-from-scratch baseline.

    Per-layer counts follow ``distribution`` (default uniform; ERK as in Evci et al. 2020's static baseline).
    Mask type N:M picks N of every M at random.

    ``rescale_init`` (default on): when the mask is applied at step 0, each kept weight is multiplied by
    sqrt(fan_in / active fan-in) of its output unit, the sparse-aware init of Evci et al. (AAAI 2022), so the
    masked net keeps the dense init's signal scale; without it a deep net at high sparsity can stay at chance.
    Turn it off when the model is not freshly initialised (a loaded or pretrained model).
    """

    default_distribution = "uniform"
    capabilities = frozenset({"sparse", "nm"})

    def __init__(self, model: nn.Module, *, rescale_init: bool = True, **common: Any) -> None:
        self.rescale_init = rescale_init
        super().__init__(model, **common)

    def on_step(self, step: int) -> None:
        if step != 0:
            return
        generator = self.generator(0)
        scores = {n: torch.rand(p.shape, generator=generator) for n, p in self.params.items()}
        self.set_masks(self.compute_masks(self.final_sparsity, scores), reason="static")
