"""Only Train Once (OTO): zero-invariant groups driven to exactly zero by HSPG, then the slim model, no fine-tuning."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core import Capability, register
from ..optim.hspg import HSPG, STAGE1_STEPS, VARIANTS, zig_members
from ._groupwise import GroupPruning

DEFAULT_LAM = 1e-3
DEFAULT_VARIANT = "hspg"
# dhspg: pruning periods from n_p to finish (each chooses a share of the target by the saliency at its start).
# One: on the LeNet-5 benchmark (3 seeds) 3 and 5 periods scored lower than the single partition (BENCHMARKS.md).
DEFAULT_PERIODS = 1


@register("oto")
class OTO(GroupPruning):
    """OTO: HSPG drives whole zero-invariant groups to exactly zero; the slim model needs no fine-tuning.

    The model's zero-invariant groups (ZIGs: an output channel or unit with its bias and batch-norm scale and
    shift; residual additions tie the channels they join) come from :func:`sparsetrain.structured.groups` on
    ``example_input``. Training runs through :class:`sparsetrain.optim.HSPG` (built by :meth:`wrap_optimizer`
    from the run's optimizer: its param groups, learning rates, weight decay and SGD momentum), minimising
    ``f(x) + lam * sum_g ||x_g||``: stage 1 (until ``n_p``) takes subgradient steps (``stage1='prox'``: Prox-SG),
    stage 2 the half-space steps that set a group to exactly zero when its trial point ``t_g`` leaves the
    half-space, ``t_g . x_g < epsilon * ||x_g||^2``. Zero groups stay zero: from ``n_p`` on the masks observe them
    (whole groups, including the input slices of the layers that read them) and enforce them.

    Target: ``sparsity`` is the fraction of groups pruned (per channel set with ``distribution='uniform'``, the
    default, or over all groups with 'global'), or give ``target_flops``, the fraction of forward FLOPs to remove
    (a uniform group sparsity is found for it). The projection never zeroes more groups than the target allows
    (the reference code's ``upper_group_sparsity``); at ``finish`` (in ``unit``, default the end of the run) any
    groups still missing are pruned by smallest group RMS magnitude and the penalty is switched off for any steps
    left. ``sparsetrain slim RUN_DIR -o FILE`` then writes the smaller dense model.

    Options: ``lam`` (1e-3), ``epsilon`` (0), ``n_p`` (stage switch in ``unit``; default half of the run, 20% for
    'dhspg'), ``stage1`` ('subgradient' or 'prox'), ``finish``, ``target_flops``, ``variant`` ('hspg', the
    default, or 'dhspg'), ``periods`` ('dhspg' only: pruning periods from ``n_p`` to ``finish``, default
    ``DEFAULT_PERIODS``).

    ``variant="dhspg"`` trains with OTOv2's DHSPG instead (Chen et al., "OTOv2: Automatic, Generic,
    User-Friendly", ICLR 2023, arXiv 2303.06862; details in :class:`~sparsetrain.optim.HSPG`). What it changes
    against the NeurIPS 2021 paper: no penalty before ``n_p``; the sparsification stage, ``n_p`` to ``finish``,
    is split into ``periods`` pruning periods; at the start of each, a share of the target (``target * (i + 1)
    // periods`` chosen in all by the end of period ``i``) is chosen as redundant among the groups not chosen
    yet, by the saliency then (small norm, gradient along the group), the rest staying important (``periods=1``:
    one partition at ``n_p``, the ICLR 2023 paper's); important groups take plain SGD steps, never penalised; the
    period's redundant groups take a penalty whose coefficient is set per group and step so that each fades along
    itself as ``(1 - progress through the period)^3`` and reaches the origin by the period's end, where the
    half-space projection zeroes it exactly, and stays zero; the steps after ``finish`` (give ``finish`` before
    the end of the run) train the remaining network. ``lam`` is then the smallest penalty coefficient;
    ``stage1`` is not used. The default stays 'hspg': on the LeNet-5 benchmark 'dhspg' beats
    it but not channel GMP (BENCHMARKS.md).

    Reference: Chen et al., "Only Train Once: A One-Shot Neural Network Training And Pruning Framework",
    NeurIPS 2021, arXiv 2107.07467. Differences from the paper: the cap on zero groups chooses the groups deepest
    past the half-space instead of at random; the final top-up to an exact target count is ours (the paper
    reports lambda's group sparsity); SGD's Nesterov flag is not carried over (HSPG takes heavy-ball momentum);
    Adam-family optimizers are replaced by HSPG's SGD steps at their learning rate and no momentum.
    """

    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.CHANNEL | Capability.OWN_OPTIMIZER

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = DEFAULT_LAM,
        epsilon: float = 0.0,
        n_p: float | None = None,
        stage1: str = "subgradient",
        variant: str = DEFAULT_VARIANT,
        periods: int | None = None,
        **common: Any,
    ) -> None:
        probe = torch.nn.Parameter(torch.zeros(1))
        HSPG([probe], lr=0.0, lam=lam, epsilon=epsilon, stage1=stage1)  # the optimizer's own option checks
        if stage1 not in STAGE1_STEPS:  # pragma: no cover - HSPG refuses it above
            raise ValueError(stage1)
        if variant not in VARIANTS:
            raise ValueError(f"oto: variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        if periods is None:
            periods = DEFAULT_PERIODS if variant == "dhspg" else 1
        if isinstance(periods, bool) or not isinstance(periods, int) or periods < 1:
            raise ValueError(f"oto: periods must be an integer >= 1, got {periods!r}")
        if variant != "dhspg" and periods != 1:
            raise ValueError(f"oto: periods is an option of variant 'dhspg' only; variant {variant!r} got {periods!r}")
        self.variant, self.periods = variant, periods
        self.lam, self.epsilon, self.stage1, self.n_p = float(lam), float(epsilon), stage1, n_p
        super().__init__(model, **common)

    def setup(self) -> None:
        super().setup()
        # dhspg's stage starts where GMP's ramp does (20% of the run): its groups fade over the rest of it.
        self.switch_step = self.steps(self.n_p, "n_p", default_fraction=0.5 if self.variant == "hspg" else 0.2)
        if not 0 <= self.switch_step <= self.require_total_steps():
            raise ValueError(f"oto: n_p must lie within the run (0 to {self.total_steps} steps), got {self.n_p!r}")
        if self.variant == "dhspg" and not self.switch_step < self.finish_step:
            raise ValueError(
                f"oto: variant 'dhspg' sparsifies from n_p to finish, so n_p must come before finish; got n_p at "
                f"step {self.switch_step}, finish at step {self.finish_step}"
            )
        if self.variant == "dhspg" and self.periods > self.finish_step - self.switch_step:
            raise ValueError(
                f"oto: periods ({self.periods}) must not exceed the steps from n_p to finish "
                f"({self.finish_step - self.switch_step}): every pruning period needs a step"
            )

    def phase_at(self, step: int) -> str:
        if self.pruned_at(step):
            return "sparse"
        if step >= self.switch_step:
            return "half-space"
        return "warm-up" if self.variant == "dhspg" else self.stage1

    def dead_groups(self, step: int) -> list[torch.Tensor] | None:
        # Before the switch a group can only be zero by chance (subgradient) or come back (Prox-SG): not observed.
        return self.zero_groups() if step >= self.switch_step else None

    def on_step(self, step: int) -> None:
        super().on_step(step)
        self._configure_optimizer()

    # ------------------------------------------------------------------ the optimizer
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> HSPG:
        """HSPG over ``optimizer``'s param groups, with their lr, weight decay and (SGD's) momentum."""
        if isinstance(optimizer, HSPG):
            return optimizer
        groups = [
            {
                "params": list(g["params"]),
                "lr": g["lr"],
                "weight_decay": g.get("weight_decay", 0.0),
                "momentum": g.get("momentum", 0.0),
            }
            for g in optimizer.param_groups
        ]
        return HSPG(groups, lr=groups[0]["lr"], groups=zig_members(self.model, self.channel_groups), lam=self.lam,
                    epsilon=self.epsilon, n_p=self.switch_step, stage1=self.stage1,
                    max_zero_groups=self.max_dead, variant=self.variant,
                    n_end=self.finish_step if self.variant == "dhspg" else None, periods=self.periods)  # fmt: skip

    def attach(self, optimizer: torch.optim.Optimizer) -> OTO:
        """Attach to the :class:`~sparsetrain.optim.HSPG` optimizer from :meth:`wrap_optimizer`; others are refused."""
        if not isinstance(optimizer, HSPG):
            raise ValueError(
                f"oto trains through sparsetrain.optim.HSPG, got a plain {type(optimizer).__name__} (nothing would "
                "push groups to zero): use optimizer = sparsifier.wrap_optimizer(optimizer), then "
                "sparsifier.attach(optimizer)"
            )
        super().attach(optimizer)
        self._configure_optimizer()
        return self

    def _configure_optimizer(self) -> None:
        if not isinstance(self._optimizer, HSPG):
            return
        # After the prune to target the penalty is off: the kept groups train freely, and the cap (reached) stops
        # any further projection.
        lam = 0.0 if self.pruned_at(self.count) else self.lam
        for group in self._optimizer.param_groups:
            group.update(lam=lam, epsilon=self.epsilon, n_p=self.switch_step, stage1=self.stage1)
