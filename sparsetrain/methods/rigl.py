"""RigL: Rigging the Lottery (Evci et al., ICML 2020, arXiv 1911.11134)."""

from __future__ import annotations

from torch import Tensor

from ..core import register
from .set import SET


@register("rigl")
class RigL(SET):
    """RigL: SET's drop-and-grow schedule, growing the inactive weights with the largest |dense gradient|.

    Every ``delta`` steps (default 100) until ``t_end`` (default 75% of training), per layer: drop the fraction
    a(t) = alpha/2 (1 + cos(pi t / t_end)) (alpha = 0.3) of active weights with the smallest |w|, grow as many
    inactive weights with the largest |gradient|. Masked weights are hard zeros (not detached), so the gradient
    of the step is dense; with gradient accumulation it is the accumulated gradient at ``optimizer.step()``.
    Grown weights start at 0 with every optimizer slot zeroed, second moments included (as the reference);
    ERK layer sparsities by default. ``rescale_init``
    (default on): the initial mask's kept weights get sqrt(fan_in / active fan-in) of their unit (SET's option).

    Differences from the paper: none in the update; the reference's TF code grows among positions inactive
    after the drop, as here.
    """

    def needs_dense_gradients(self) -> bool:
        # The growth criterion is the gradient of the inactive weights: every update step computes it densely.
        return self.is_update_step(self.count)

    def grow_scores(self, step: int) -> dict[str, Tensor]:
        return self.scores("gradient", step)
