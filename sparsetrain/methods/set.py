"""SET: Sparse Evolutionary Training (Mocanu et al. 2018) as RigL runs it, the drop-and-grow base that RigL refines."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Capability, Sparsifier, register
from ..core.sharding import all_reduce_sum, local, local_rows
from ..core.sparsifier import derived_seed
from ..optim_state import zero_state_where
from ..schedules import cosine_decay

DROP_SCHEDULES = ("cosine", "constant")
GROW_INITS = ("zero", "random")


@register("set")
class SET(Sparsifier):
    """SET, RigL's variant: every ``delta`` steps until ``t_end``, drop the smallest active |w|, grow as many at random.

    This is the SET of RigL's reference code and comparison (Evci et al. 2020): zero-initialised regrowth,
    drop by |w| over all the layer's weights, cosine-decayed drop fraction, ERK layer sparsities, so that SET and
    RigL differ only in the grow rule. The rules of the SET paper itself are options: ``drop_schedule="constant"``
    drops the fraction ``alpha`` (the paper's zeta, 0.3) at every update, and ``grow_init="random"`` gives grown
    weights random values instead of 0.

    Algorithm (per layer, at update step t < t_end, t a multiple of ``delta``):
      n = round(a(t) * active), a(t) = alpha / 2 (1 + cos(pi t / t_end)) (``drop_schedule="cosine"``, default)
      or a(t) = alpha (``"constant"``);
      drop the n active weights with the smallest |w|; grow n weights chosen among the inactive ones
      (``grow_scores``: random here, drawn from a generator seeded by (seed, step)).
    The count per layer is preserved exactly; new weights start at 0 (``grow_init="zero"``, default) or are drawn
    from N(0, r^2), r the RMS of the layer's kept weights at step 0 (its initialisation, after ``rescale_init``),
    from a generator seeded by (seed, step) (``grow_init="random"``); either way every optimizer slot of a grown
    weight is zeroed, second moments included, as RigL's reference does (a dropped weight keeps its second
    moments until then, see ``optim_state.SECOND_MOMENT_KEYS``). A weight that is dropped and regrown in the same
    update keeps its value. The initial mask is random at the layer sparsities of ``distribution`` (ERK by
    default). With ``skip_update_step`` (default) the optimizer step of an update step is skipped (gradients set
    to None), as in RigL's reference.
    ``rescale_init`` (default on): the initial mask's kept weights are multiplied by sqrt(fan_in / active
    fan-in) of their output unit (sparse-aware init, Evci et al., AAAI 2022), so the sparse net starts at the
    dense init's signal scale; turn it off for a model that is not freshly initialised.

    ``delta`` is in steps; ``t_end`` in ``unit`` (left out: 75% of the run). The paper evolves the topology after
    every epoch to the end of training: ``delta=steps_per_epoch, t_end=1.0`` with the two options above.
    Reference: Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse
    connectivity inspired by network science", Nature Communications 2018 (arXiv 1707.04780).
    Differences from the paper: by default the drop fraction follows RigL's cosine decay and regrown weights
    start at 0 (RigL's SET); the paper drops the fraction zeta of the positive and of the negative weights
    closest to 0 separately, here the smallest |w| of both signs together.
    """

    default_distribution = "erk"
    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.DROP_GROW | Capability.DENSE_GRADIENTS
    needs_attach = True

    def __init__(
        self,
        model: nn.Module,
        *,
        delta: int = 100,
        t_end: float | None = None,
        alpha: float = 0.3,
        skip_update_step: bool = True,
        drop_schedule: str = "cosine",
        grow_init: str = "zero",
        rescale_init: bool = True,
        **common: Any,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha (drop fraction) must be in (0, 1], got {alpha!r}")
        if isinstance(delta, bool) or not isinstance(delta, int) or delta <= 0:
            raise ValueError(f"delta (steps between mask updates) must be a positive integer, got {delta!r}")
        if drop_schedule not in DROP_SCHEDULES:
            raise ValueError(f"drop_schedule must be one of {', '.join(DROP_SCHEDULES)}; got {drop_schedule!r}")
        if grow_init not in GROW_INITS:
            raise ValueError(f"grow_init must be one of {', '.join(GROW_INITS)}; got {grow_init!r}")
        self.delta, self.t_end, self.alpha, self.skip_update_step = delta, t_end, alpha, bool(skip_update_step)
        self.drop_schedule, self.grow_init = drop_schedule, grow_init
        self.rescale_init = rescale_init
        # grow_init="random": each layer's RMS of kept weights at step 0, the scale new weights are drawn at.
        self.init_rms: dict[str, float] = {}
        super().__init__(model, **common)

    def setup(self) -> None:
        self.end_step = self.steps(self.t_end, "t_end", default_fraction=0.75)

    def is_update_step(self, step: int) -> bool:
        return 0 < step < self.end_step and step % self.delta == 0

    def needs_dense_gradients(self) -> bool:
        # Random growth reads no gradient; only a taken update step applies the grown weights' gradients.
        return self.is_update_step(self.count) and not self.skip_update_step

    def drop_fraction(self, step: int) -> float:
        if self.drop_schedule == "constant":
            return self.alpha
        return cosine_decay(step, self.end_step, self.alpha)

    def on_step(self, step: int) -> None:
        if step == 0:  # the initial random mask
            self.set_masks(self.compute_masks(self.final_sparsity, self.scores("random", 0)), reason="initial random")
            self._record_init_rms()

    def rescale_kept_weights(self) -> None:
        first = not self.init_rescaled
        super().rescale_kept_weights()
        if first:
            self._record_init_rms()  # the init's scale is the rescaled one: the scale random regrowth draws at

    @torch.no_grad()
    def _record_init_rms(self) -> None:
        if self.grow_init != "random":
            return
        self.init_rms = {}
        for name, param in self.params.items():
            kept = local(param.detach())[self.masks[name]].float()
            # Sharded: the sum of squares and the count over every rank's rows.
            square_sum, count = all_reduce_sum([float(kept.pow(2).sum()), kept.numel()], self.process_group,
                                               dtype=torch.float64) if self.sharded else (float(kept.pow(2).sum()),
                                                                                         kept.numel())  # fmt: skip
            self.init_rms[name] = (square_sum / count) ** 0.5 if count else 0.0

    def extra_state(self) -> dict:
        return {"init_rms": dict(self.init_rms)} if self.init_rms else {}

    def load_extra_state(self, state: dict) -> None:
        if "init_rms" in state:
            self.init_rms = {n: float(v) for n, v in state["init_rms"].items()}

    def grow_scores(self, step: int) -> dict[str, Tensor]:
        """Higher is grown first; only inactive positions are considered."""
        return self.scores("random", step)

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
        # Values of random regrowth: a second stream of (seed, step), apart from the grow scores' draws.
        values = torch.Generator().manual_seed(derived_seed(derived_seed(self.seed, step), 1))
        masks = {}
        grown_now: dict[str, Tensor] = {}
        moved = 0
        # Counts are per layer over all shards when FSDP-sharded (sum_over_ranks), and select_top ranks a layer
        # over its shards; unsharded both are the plain count and top-k.
        names = list(self.params)
        actives = dict(zip(names, self.sum_over_ranks([int(self.masks[n].sum()) for n in names])))
        swaps = {n: min(int(math.floor(fraction * actives[n] + 0.5)), actives[n]) for n in names}
        changing = [n for n in names if swaps[n] > 0]
        for name in names:
            if swaps[name] == 0:
                masks[name] = self.masks[name]
        weights = {n: local(self.params[n].detach()) for n in changing}
        drop_scores = {
            n: torch.where(self.masks[n], w.abs().float(), torch.full_like(w, -1.0, dtype=torch.float))
            for n, w in weights.items()
        }
        kept_masks = self.select_top(drop_scores, {n: actives[n] - swaps[n] for n in changing})
        grow_scores = {
            n: torch.where(kept_masks[n], torch.full_like(grow[n], -math.inf, dtype=torch.float), grow[n].float())
            for n in changing
        }
        grown_masks = self.select_top(grow_scores, {n: swaps[n] for n in changing})
        for name in changing:
            param, mask, kept = weights[name], self.masks[name], kept_masks[name]
            new_mask = kept | grown_masks[name]
            new = new_mask & ~mask
            grown_now[name] = new
            if self.grow_init == "random":
                drawn = torch.randn(self.params[name].shape, generator=values)[local_rows(self.params[name])]
                param[new] = (drawn * self.init_rms[name]).to(device=param.device, dtype=param.dtype)[new]
            else:
                param[new] = 0.0  # new connections start at 0 (already 0 as hard zeros; kept explicit)
            moved += int(new.sum())
            masks[name] = new_mask
        moved = self.sum_over_ranks([moved])[0]
        self.set_masks(masks, reason=f"{self.name} drop/grow {fraction:.4f}")
        if self._optimizer is not None:
            for name, grown in grown_now.items():  # RigL's reference zeroes every slot of a grown weight
                zero_state_where(self._optimizer, self.params[name], grown, keep_second_moments=False)
        self.emit({"event": "drop_grow", "fraction": fraction, "regrown": moved})
