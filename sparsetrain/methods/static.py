"""Static random sparsity: a random mask drawn once from the seed and kept for the whole run."""

from __future__ import annotations

import torch

from ..core import Sparsifier, register


@register("static")
class Static(Sparsifier):
    """Random fixed mask from (seed), applied before the first step; the sparse-from-scratch baseline.

    Per-layer counts follow ``distribution`` (default uniform; ERK as in Evci et al. 2020's static baseline).
    Mask type N:M picks N of every M at random.
    """

    default_distribution = "uniform"
    capabilities = frozenset({"sparse", "nm"})

    def on_step(self, step: int) -> None:
        if step != 0:
            return
        generator = self.generator(0)
        scores = {n: torch.rand(p.shape, generator=generator) for n, p in self.params.items()}
        self.set_masks(self.compute_masks(self.final_sparsity, scores), reason="static")
