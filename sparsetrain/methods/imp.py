"""IMP: iterative magnitude pruning with retraining, inside one run of a stated length."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..core import Sparsifier, register
from ..optim_state import reset_momentum

RETRAIN_SCHEDULES = ("ft", "lrw", "slr", "clr")


@register("imp")
class IMP(Sparsifier):
    """IMP: dense pre-training, then ``rounds`` rounds that each prune and retrain; one run, one stated budget.

    Round r (1..n) prunes globally by magnitude among the surviving weights to s_r = 1 - (1 - s)^(r / n), i.e.
    each round removes p = 1 - (1 - s)^(1/n) of the remaining weights; the last round lands exactly on s.
    The learning rate of each retraining round (``retrain``), with the run's schedule as the original one:
      ft  - fine-tune at the last learning rate of pre-training;
      lrw - learning-rate rewinding: replay the last R steps of the pre-training schedule (Renda et al. 2020);
      slr - scaled lr: 10% linear warm-up to the maximum, then the whole schedule compressed into R steps;
      clr - cosine from the maximum to 0 over R steps (Le & Hua 2021).
    Pre-training runs the original schedule compressed into its own length. The trainer asks
    ``lr_factor(step, base)`` for the multiplier. ``rewind`` (a time point in ``unit``) rewinds surviving weights
    to their values at that step after each pruning (Frankle et al. 2020), momentum reset with them.

    ``pretrain`` in ``unit``; left out, pre-training and every round get an equal share of the run.
    Reference: Han et al. 2015 (arXiv 1506.02626); Renda, Frankle & Carbin 2020 (arXiv 2003.02389);
    Le & Hua 2021 (arXiv 2105.03193).
    Differences from the papers: the rounds share one fixed budget instead of each retraining for a full run.
    """

    capabilities = frozenset({"sparse", "mask_updates"})

    def __init__(
        self,
        model: nn.Module,
        *,
        rounds: int = 3,
        pretrain: float | None = None,
        retrain: str = "lrw",
        rewind: float | None = None,
        **common: Any,
    ) -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if retrain not in RETRAIN_SCHEDULES:
            raise ValueError(f"retrain must be one of {', '.join(RETRAIN_SCHEDULES)}; got {retrain!r}")
        self.rounds, self.pretrain, self.retrain, self.rewind = rounds, pretrain, retrain, rewind
        self._rewind_state: dict[str, torch.Tensor] | None = None
        super().__init__(model, **common)

    def setup(self) -> None:
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

    def round_sparsity(self, r: int) -> float:
        """Sparsity after round r (1-based); round n is exactly the target."""
        if r >= self.rounds:
            return self.final_sparsity
        return 1.0 - (1.0 - self.final_sparsity) ** (r / self.rounds)

    def round_at(self, step: int) -> int:
        """0 during pre-training, else the 1-based round."""
        if step < self.pretrain_steps:
            return 0
        return min(self.rounds, 1 + (step - self.pretrain_steps) // self.round_steps)

    def phase_at(self, step: int) -> str:
        r = self.round_at(step)
        return "dense" if r == 0 else f"round{r}"

    def target_sparsity_at(self, step: int) -> float:
        r = self.round_at(step)
        return 0.0 if r == 0 else self.round_sparsity(r)

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if step == self.rewind_step:
            self._rewind_state = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        if step not in self.round_starts:
            return
        r = self.round_starts.index(step) + 1
        masks = self.compute_masks(self.round_sparsity(r), self.magnitude_scores(), among_active=True)
        if self._rewind_state is not None:
            for name, param in self.model.named_parameters():
                param.copy_(self._rewind_state[name])
            if self._optimizer is not None:
                reset_momentum(self._optimizer)
        self.set_masks(masks, reason=f"imp round {r}")

    def lr_factor(self, step: int, base: Callable[[int], float]) -> float:
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
        if self.retrain == "slr":
            warm = max(1, int(0.1 * R))
            if t < warm:
                return pre(0) * (t + 1) / warm
            return pre((t - warm) / max(1, R - warm) * P)
        return pre(0) * 0.5 * (1 + math.cos(math.pi * t / R))

    def extra_state(self) -> dict:
        return {"rewind_state": self._rewind_state}

    def load_extra_state(self, state: dict) -> None:
        self._rewind_state = state.get("rewind_state")
