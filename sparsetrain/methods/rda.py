"""RDA with an adaptively weighted l1 penalty (compressed-sensing training) as a method: sparsity from an optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Capability, Sparsifier, register
from ..optim.rda import RDA, check_options, rda_a_schedule

DEFAULT_LAM = 1e-6


@register("rda")
class RDAMethod(Sparsifier):
    """RDA: l1-penalised dual averaging (adaptive weights) makes the zeros; optional top-k to a target at the end.

    The sparsity comes from the optimizer, :class:`sparsetrain.optim.RDA`, that :meth:`make_optimizer` builds:
    every step soft-thresholds the weights with an adaptively weighted l1 penalty of strength ``lam`` (small
    weights get up to ``M`` times the penalty of the largest), and ``a`` rises from 0 (proximal SGD) to 1 (l1-RDA)
    with a cosine over the RDA phase (``anneal``). Until ``finish`` the masks follow the weights (mask =
    weight != 0, observed after every step, never enforced, so a weight the penalty zeroed may come back) and the
    sparsity is whatever ``lam`` produces. With ``prune_to_target`` (the default), at ``finish`` (in ``unit``;
    default 0.9 of training) the weights are pruned by magnitude to exactly ``sparsity`` (under ``distribution``
    and ``mask_type``) and fine-tuned with fixed masks for the rest: the penalty is switched off (``lam = 0``,
    ``a = 0``, ``momentum = 0.9``: momentum SGD), so runs compare at a fixed sparsity. Choose ``lam`` so that the
    RDA phase reaches about the target by itself: the final top-k is then a small correction. The paper's default
    1e-6 suits long runs (LeNet-300-100 on Fashion-MNIST: 62% zeros after 10 epochs, 81% after 30); 1e-5 reaches
    95.7% in 10 epochs. With ``prune_to_target=False`` there is no
    target: ``sparsity`` is only reported and the run ends with lam's sparsity.

    ``attach`` refuses any other optimizer (SGD, Adam, ...): nothing would be penalised and the run would be
    one-shot magnitude pruning at ``finish``; :meth:`wrap_optimizer` builds the RDA optimizer from it.

    Options: ``lam``, ``M``, ``tau``, ``mode`` ('unstructured', 'kernel', 'channel'), ``step_scale`` (see
    :class:`~sparsetrain.optim.RDA`), ``prune_to_target``, ``finish``, ``anneal``.

    Reference: Siegel, Chen, Zhang, Xu, "Training Sparse Neural Networks using Compressed Sensing",
    arXiv 2008.09661. Differences from the paper: the final top-k to a target and the fine-tuning are ours (the
    paper reports lam's sparsity); ``lr`` is on the SGD-with-momentum scale (``s = 10 lr``, see the optimizer);
    biases and norm parameters are never penalised.
    """

    shardable = False  # see Sparsifier.shardable
    capabilities = (
        Capability.SPARSE | Capability.MASK_UPDATES | Capability.NM | Capability.OWN_OPTIMIZER
        | Capability.DENSE_GRADIENTS
    )  # fmt: skip

    def __init__(
        self,
        model: nn.Module,
        *,
        lam: float = DEFAULT_LAM,
        M: float = 500.0,
        tau: float = 9.5,
        mode: str = "unstructured",
        step_scale: float = 10.0,
        prune_to_target: bool = True,
        finish: float | None = None,
        anneal: bool = True,
        **common: Any,
    ) -> None:
        options = dict(lam=lam, M=M, tau=tau, mode=mode, step_scale=step_scale)
        check_options({"lr": 1.0, "weight_decay": 0.0, "a": 0.0, "threshold": None, "momentum": None, **options})
        self.lam, self.M, self.tau, self.mode, self.step_scale = (
            float(lam),
            float(M),
            float(tau),
            mode,
            float(step_scale),
        )
        self.prune_to_target = bool(prune_to_target)
        self.finish = finish
        self.anneal = bool(anneal)
        # Counts changes of the observed support before the prune. mask_version does not move then (it marks
        # top-k mask updates, whose counts are exact); masks_key() combines both for caches.
        self.support_version = 0
        super().__init__(model, **common)

    def setup(self) -> None:
        total = self.require_total_steps()
        self.prune_step: int | None = None
        if self.prune_to_target:
            self.prune_step = self.steps(self.finish, "finish", default_fraction=0.9)
            if not 0 <= self.prune_step <= total:
                raise ValueError(f"rda: finish must lie within the run (0 to {total} steps), got {self.finish!r}")
        # a rises over the penalised phase only: the fine-tuning after the prune is plain momentum SGD.
        self.anneal_steps = max(1, total if self.prune_step is None else self.prune_step)

    # ------------------------------------------------------------------ schedule
    def pruned_at(self, step: int) -> bool:
        return self.prune_step is not None and step >= self.prune_step

    def target_sparsity_at(self, step: int) -> float:
        # No target is imposed while the penalty works: the masks then only describe the weights.
        return self.final_sparsity if self.pruned_at(step) else 0.0

    def phase_at(self, step: int) -> str:
        return "sparse" if self.pruned_at(step) else "rda"

    def needs_dense_gradients(self) -> bool:
        # Until the prune a zeroed weight may come back: its gradient must be averaged like any other.
        return not self.pruned_at(self.count)

    def optimizer_settings(self, step: int) -> dict[str, float | None]:
        """The RDA group options for step ``step``: the ``a`` schedule, and no penalty once pruned to target."""
        if self.pruned_at(step):
            # Fine-tuning: no penalty, and momentum-SGD dynamics. With the paper's beta = exp(-s / tau) the velocity
            # would average over thousands of steps at the small learning rates near the end of a schedule, and
            # the pruned network would barely move (measured: 79.6% instead of 85% after a prune to 95%).
            return {"a": 0.0, "lam": 0.0, "momentum": 0.9}
        settings: dict[str, float | None] = {"lam": self.lam, "momentum": None}
        if self.anneal:
            settings["a"] = rda_a_schedule(step, self.anneal_steps)
        return settings

    def on_step(self, step: int) -> None:
        if self.prune_step is not None and step == self.prune_step:
            self.set_masks(self.compute_masks(self.final_sparsity, self.magnitude_scores()), reason="prune to target")
        elif not self.pruned_at(step):
            with torch.no_grad():
                observed = {n: p.detach() != 0 for n, p in self.params.items()}
            if any(not torch.equal(observed[n], self.masks[n]) for n in observed):
                self.support_version += 1
            self.masks = observed
        self._configure_optimizer(step)

    def masks_key(self) -> tuple[int, int]:
        return self.mask_version, self.support_version

    def extra_state(self) -> dict:
        return {"support_version": self.support_version}

    def load_extra_state(self, state: dict) -> None:
        self.support_version = int(state.get("support_version", 0))

    # ------------------------------------------------------------------ the optimizer
    def make_optimizer(self, params: Iterable[Tensor], lr: float, weight_decay: float = 5e-4) -> RDA:
        """The RDA optimizer this method needs, over ``params`` (pass ``model.parameters()``).

        The sparsified parameters (this sparsifier's selection) are penalised; other weights and 1-D parameters are
        not. Weight decay applies to parameters with dim >= 2, as in the trainer's own optimizer.
        """
        params = list(params)
        selected = {id(p) for p in self.params.values()}
        groups = [
            {"params": [p for p in params if id(p) in selected], "threshold": True, "weight_decay": weight_decay},
            {
                "params": [p for p in params if id(p) not in selected and p.dim() >= 2],
                "threshold": False,
                "weight_decay": weight_decay,
            },
            {"params": [p for p in params if id(p) not in selected and p.dim() < 2], "threshold": False},
        ]
        settings = {"a": 0.0, **self.optimizer_settings(self.count)}
        return RDA(
            [g for g in groups if g["params"]],
            lr,
            lam=settings["lam"],
            M=self.M,
            tau=self.tau,
            weight_decay=0.0,
            a=settings["a"],
            mode=self.mode,
            step_scale=self.step_scale,
            momentum=settings["momentum"],
        )

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> RDA:
        """An RDA optimizer over ``optimizer``'s parameters, at its learning rate and largest weight decay."""
        if isinstance(optimizer, RDA):
            return optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        lr = optimizer.param_groups[0]["lr"]
        weight_decay = max(group.get("weight_decay", 0.0) for group in optimizer.param_groups)
        return self.make_optimizer(params, lr=lr, weight_decay=weight_decay)

    def attach(self, optimizer: torch.optim.Optimizer) -> RDAMethod:
        """Attach to the :class:`~sparsetrain.optim.RDA` optimizer from :meth:`wrap_optimizer`; others are refused."""
        if not isinstance(optimizer, RDA):
            raise ValueError(
                f"rda trains through sparsetrain.optim.RDA, got a plain {type(optimizer).__name__} (nothing would "
                "be penalised: plain training and a magnitude prune at 'finish'): use "
                "optimizer = sparsifier.wrap_optimizer(optimizer), then sparsifier.attach(optimizer)"
            )
        super().attach(optimizer)
        self._configure_optimizer(self.count)
        return self

    def _configure_optimizer(self, step: int) -> None:
        if not isinstance(self._optimizer, RDA):
            return
        settings = self.optimizer_settings(step)
        for group in self._optimizer.param_groups:
            group.update(settings)

    # ------------------------------------------------------------------ enforcement only after the prune
    def _refresh_enforced_masks(self) -> None:
        # Before the prune the masks observe the weights: enforcing them would stop a zeroed weight from coming
        # back, which dual averaging allows. After it they are ordinary fixed masks.
        if self.pruned_at(self.count):
            super()._refresh_enforced_masks()
        else:
            self._enforced_masks = {}
            self._hand_over_masks()
