"""SET: Sparse Evolutionary Training (Mocanu et al. 2018), the drop-and-grow base that RigL refines."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import maskops
from ..core import Sparsifier, register
from ..optim_state import zero_state_where
from ..schedules import cosine_decay


@register("set")
class SET(Sparsifier):
    """SET: every ``delta`` steps until ``t_end``, drop the smallest active |w| and grow as many at random.

    Algorithm (per layer, at update step t < t_end, t a multiple of ``delta``):
      n = round(a(t) * active), a(t) = alpha / 2 (1 + cos(pi t / t_end));
      drop the n active weights with the smallest |w|; grow n weights chosen among the inactive ones
      (``grow_scores``: random here, drawn from a generator seeded by (seed, step)).
    The count per layer is preserved exactly; new weights start at 0 with every optimizer slot zeroed, second
    moments included, as RigL's reference does (a dropped weight keeps its second moments until then, see
    ``optim_state.SECOND_MOMENT_KEYS``); a weight that is dropped and regrown in the same update keeps its value.
    The initial mask is random at the layer sparsities of ``distribution`` (ERK by default). With
    ``skip_update_step`` (default) the optimizer step of an update step is skipped (gradients set to None), as in
    RigL's reference.
    ``rescale_init`` (default on): the initial mask's kept weights are multiplied by sqrt(fan_in / active
    fan-in) of their output unit (sparse-aware init, Evci et al., AAAI 2022), so the sparse net starts at the
    dense init's signal scale; turn it off for a model that is not freshly initialised.

    ``delta`` is in steps; ``t_end`` in ``unit`` (left out: 75% of the run).
    Reference: Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science", Nature Communications 2018 (arXiv 1707.04780).
    Differences from the paper: the drop fraction follows RigL's cosine decay instead of a constant zeta, and
    the distribution defaults to ERK as in RigL's comparison, so SET and RigL differ only in the grow rule.
    """

    default_distribution = "erk"
    capabilities = frozenset({"sparse", "mask_updates", "drop_grow"})
    needs_attach = True

    def __init__(
        self,
        model: nn.Module,
        *,
        delta: int = 100,
        t_end: float | None = None,
        alpha: float = 0.3,
        skip_update_step: bool = True,
        rescale_init: bool = True,
        **common: Any,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha (drop fraction) must be in (0, 1], got {alpha!r}")
        if isinstance(delta, bool) or not isinstance(delta, int) or delta <= 0:
            raise ValueError(f"delta (steps between mask updates) must be a positive integer, got {delta!r}")
        self.delta, self.t_end, self.alpha, self.skip_update_step = delta, t_end, alpha, bool(skip_update_step)
        self.rescale_init = rescale_init
        super().__init__(model, **common)

    def setup(self) -> None:
        self.end_step = self.steps(self.t_end, "t_end", default_fraction=0.75)

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end_step and step % self.delta == 0

    def needs_dense_gradients(self) -> bool:
        return self.is_update_step(self.count)

    def drop_fraction(self, step: int) -> float:
        return cosine_decay(step, self.end_step, self.alpha)

    def on_step(self, step: int) -> None:
        if step == 0:  # the initial random mask
            generator = self.generator(0)
            scores = {n: torch.rand(p.shape, generator=generator) for n, p in self.params.items()}
            self.set_masks(self.compute_masks(self.final_sparsity, scores), reason="initial random")

    def grow_scores(self, step: int) -> dict[str, Tensor]:
        """Higher is grown first; only inactive positions are considered."""
        generator = self.generator(step)
        return {n: torch.rand(p.shape, generator=generator) for n, p in self.params.items()}

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The update happens here, before the step: the gradients of this step are the dense gradients RigL
        # grows by (masked weights are hard zeros, not detached, so their gradient exists).
        if self.is_update_step(self.count):
            self.update(self.count)
            if self.skip_update_step:
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None  # torch optimizers skip parameters without a gradient
                return
        super().before_step(optimizer)

    @torch.no_grad()
    def update(self, step: int) -> None:
        fraction = self.drop_fraction(step)
        grow = self.grow_scores(step)
        masks = {}
        grown_now: dict[str, Tensor] = {}
        moved = 0
        for name, param in self.params.items():
            mask = self.masks[name]
            active = int(mask.sum())
            n_swap = min(int(math.floor(fraction * active + 0.5)), active)
            if n_swap == 0:
                masks[name] = mask
                continue
            drop_scores = torch.where(mask, param.detach().abs().float(), torch.full_like(param, -1.0))
            kept = maskops.topk_count_mask(drop_scores, active - n_swap)
            grow_scores = torch.where(kept, torch.full_like(param, -math.inf), grow[name].float())
            grown = maskops.topk_count_mask(grow_scores, n_swap)
            new_mask = kept | grown
            new = new_mask & ~mask
            grown_now[name] = new
            param[new] = 0.0  # new connections start at 0 (already 0 as hard zeros; kept explicit)
            moved += int(new.sum())
            masks[name] = new_mask
        self.set_masks(masks, reason=f"{self.name} drop/grow {fraction:.4f}")
        if self._optimizer is not None:
            for name, grown in grown_now.items():  # RigL's reference zeroes every slot of a grown weight
                zero_state_where(self._optimizer, self.params[name], grown, keep_second_moments=False)
        self.emit({"event": "drop_grow", "fraction": fraction, "regrown": moved})
