"""IMP: iterative magnitude pruning with retraining, inside one run of a stated length."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core import Capability, ScheduledPruning, register
from ..optim_state import reset_momentum
from ..schedules import Rounds, half_cosine

RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "clr", "rewind")


@register("imp")
class IMP(ScheduledPruning):
    """IMP: dense pre-training, then ``rounds`` rounds that each prune and retrain; one run, one stated budget.

    Round r (1..n) prunes globally by magnitude among the surviving weights to s_r = 1 - (1 - s)^(r / n), i.e.
    each round removes p = 1 - (1 - s)^(1/n) of the remaining weights; the last round lands exactly on s.
    Pre-training runs the original schedule (the run's own, which the trainer passes as ``base`` to
    ``lr_factor(step, base)``) compressed into its own length. Its maximum is the peak lr of the retraining
    schedules, as in IMP-revisited's code (``maxLR = max(...)``), so a warm-up or a one-cycle rise at the start
    of the schedule does not lower them. The learning rate of each retraining round of R steps (``retrain``):
      ft     - fine-tune at the last learning rate of pre-training;
      lrw    - learning-rate rewinding: replay the last R steps of the pre-training schedule (Renda et al. 2020);
      slr    - scaled lr: a 10% warm-up from 0 to the maximum, then the pre-training schedule compressed into
               the rest of the round, its own warm-up (everything before its first maximum) held at the maximum;
      clr    - a 10% warm-up from 0 to the maximum, then a cosine from the maximum down to the schedule's
               smallest lr after its peak (Le & Hua 2021);
      rewind - the learning-rate position is rewound with the weights: replay the pre-training schedule from
               the ``rewind`` point to its end, compressed into the round (needs ``rewind``).
    The warm-ups of slr and clr rise along a half cosine, lr_max (1 - cos(pi (t + 1) / W)) / 2 over W steps, as
    the reference's ``CosineAnnealingLR`` warm-up does (it starts at exactly 0; here the first step is already
    above 0).

    ``rewind`` (a time point in ``unit``) rewinds surviving weights (every parameter) to their values at that step
    after each pruning (Frankle et al. 2020), momentum reset with them; with ``rewind_buffers`` the model's
    buffers (batch-norm running statistics) are rewound too, and ``retrain='rewind'`` rewinds the learning-rate
    position: together the whole training state at that step except the optimizer's buffers.

    ``pretrain`` in ``unit``; left out, pre-training and every round get an equal share of the run.
    Reference: Han et al. 2015 (arXiv 1506.02626); Renda, Frankle & Carbin 2020 (arXiv 2003.02389);
    Le & Hua 2021 (arXiv 2105.03193); Zimmer, Spiegel & Pokutta, "How I Learned to Stop Worrying and Love
    Retraining" (IMP revisited, arXiv 2111.00843, code ZIB-IOL/BIMP) for the slr/clr details.
    Differences from the papers: the rounds share one fixed budget instead of each retraining for a full run.

    Built on the :class:`~sparsetrain.schedules.Rounds` schedule and the magnitude score among the surviving
    weights; the method adds the rewinding and the retraining learning rates.
    """

    capabilities = Capability.SPARSE | Capability.MASK_UPDATES
    keep_pruned = True

    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int = 3,
        pretrain: float | None = None,
        retrain: str = "lrw",
        rewind: float | None = None,
        rewind_buffers: bool = False,
        **common: Any,
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if retrain not in RETRAIN_SCHEDULES:
            raise ValueError(f"retrain must be one of {', '.join(RETRAIN_SCHEDULES)}; got {retrain!r}")
        if rewind is None and (retrain == "rewind" or rewind_buffers):
            raise ValueError(
                "imp: retrain='rewind' and rewind_buffers rewind to the rewind point: give rewind too "
                "(a time point in unit inside pre-training, e.g. rewind=1)"
            )
        self.rounds, self.pretrain, self.retrain, self.rewind = rounds, pretrain, retrain, rewind
        self.rewind_buffers = bool(rewind_buffers)
        self._rewind_state: dict[str, torch.Tensor] | None = None
        self._rewind_buffer_state: dict[str, torch.Tensor] | None = None
        # (base, peak, index of its first peak, smallest value after it) of the pre-training schedule.
        self._profile: tuple[Callable[[int], float], float, int, float] | None = None
        super().__init__(model, **common)

    def make_schedule(self) -> Rounds:
        total = self.require_total_steps()
        self.pretrain_steps = self.steps(self.pretrain, "pretrain", default_fraction=1 / (self.rounds + 1))
        self.round_steps = (total - self.pretrain_steps) // self.rounds
        if self.pretrain_steps <= 0 or self.round_steps <= 0:
            raise ValueError(
                f"imp rounds do not fit: pretrain {self.pretrain_steps} steps and {self.rounds} rounds in {total} steps"
            )
        self.round_starts = [self.pretrain_steps + r * self.round_steps for r in range(self.rounds)]
        self.rewind_step = None if self.rewind is None else self.steps(self.rewind, "rewind")
        if self.rewind_step is not None and self.rewind_step > self.pretrain_steps:
            raise ValueError(f"rewind must lie in pre-training (<= {self.pretrain_steps} steps), got {self.rewind!r}")
        return Rounds(self.pretrain_steps, self.round_steps, self.rounds, self.final_sparsity)

    def round_sparsity(self, r: int) -> float:
        """Sparsity after round r (1-based); round n is exactly the target."""
        return self.schedule.round_sparsity(r)

    def round_at(self, step: int) -> int:
        """0 during pre-training, else the 1-based round."""
        return self.schedule.round_at(step)

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if step == self.rewind_step:
            self._rewind_state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            if self.rewind_buffers:
                self._rewind_buffer_state = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        super().on_step(step)

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        # The masks rank the trained weights; the survivors are then rewound (when rewinding) and masked.
        r = self.round_at(step)
        masks = self.masks_at(step)
        if self._rewind_state is not None:
            for name, param in self.model.named_parameters():
                param.copy_(self._rewind_state[name])
            if self._rewind_buffer_state is not None:
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(self._rewind_buffer_state[name])
            if self._optimizer is not None:
                reset_momentum(self._optimizer)
        self.set_masks(masks, reason=f"imp round {r}")

    def lr_factor(self, step: int, base: Callable[[int], float]) -> float:
        """The learning-rate multiplier at ``step``; ``base`` is the run's own schedule (a fixed function)."""
        total = self.require_total_steps()
        P, R = self.pretrain_steps, self.round_steps

        def pre(u: float) -> float:  # the original schedule compressed into pre-training
            return base(min(total - 1, int(u * total / P)))

        if step < P:
            return pre(step)
        t = (step - P) % R if step < P + R * self.rounds else R - 1
        if self.retrain == "ft":
            return pre(P - 1)
        if self.retrain == "lrw":
            return pre(max(0, P - R + t))
        if self.retrain == "rewind":
            return pre(self.rewind_step + t * (P - self.rewind_step) / R)
        peak, peak_at, floor = self._schedule_profile(base, pre)
        warm = max(1, int(0.1 * R))
        if t < warm:
            return peak * half_cosine(t + 1, warm, rising=True)
        progress = (t - warm) / max(1, R - warm)
        if self.retrain == "slr":
            u = progress * P
            return peak if u < peak_at else pre(u)
        return floor + (peak - floor) * half_cosine(progress)

    def _schedule_profile(
        self, base: Callable[[int], float], pre: Callable[[float], float]
    ) -> tuple[float, int, float]:
        # The peak of the pre-training schedule, where it is first reached, and the smallest value after it:
        # one pass over the P steps, cached while the trainer passes the same schedule.
        if self._profile is None or self._profile[0] != base:
            values = [pre(u) for u in range(self.pretrain_steps)]
            peak = max(values)
            peak_at = values.index(peak)
            self._profile = (base, peak, peak_at, min(values[peak_at:]))
        return self._profile[1:]

    def extra_state(self) -> dict:
        return {"rewind_state": self._rewind_state, "rewind_buffers": self._rewind_buffer_state}

    def load_extra_state(self, state: dict) -> None:
        self._rewind_state = state.get("rewind_state")
        self._rewind_buffer_state = state.get("rewind_buffers")
