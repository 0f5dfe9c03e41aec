"""Dense training through the sparsifier's code path: the baseline every method is compared against."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core import Sparsifier, register


@register("dense")
class Dense(Sparsifier):
    """Dense baseline: no weight is ever masked; the same hooks and bookkeeping as every other method.

    ``sparsity`` is accepted and ignored, so that one comparison grid can include the baseline.
    """

    def __init__(self, model: nn.Module, *, sparsity: float | None = None, **common: Any) -> None:
        self.requested_sparsity = sparsity
        common.pop("distribution", None)
        super().__init__(model, sparsity=0.0, **common)

    def target_sparsity_at(self, step: int) -> float:
        return 0.0
