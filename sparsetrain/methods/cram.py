"""CrAM as a method: one dense model trained to survive one-shot pruning, by a compression-aware optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import maskops
from ..core import Capability, Sparsifier, register
from ..core.selection import input_dim
from ..core.sparsifier import check_nm_parameters
from ..optim.cram import CrAM


@register("cram")
class CrAMMethod(Sparsifier):
    """CrAM: dense training with a compression-aware two-pass step; prune one-shot afterwards at any sparsity.

    The work is done by the optimizer :class:`sparsetrain.optim.CrAM` that :meth:`make_optimizer` wraps around
    the run's base optimizer: each step takes the clean gradient g, ascends to w + rho g, compresses that point
    (global magnitude top-k at a sparsity drawn from ``sparsities``, or N:M with ``mask_type='2:4'``), takes the
    gradient there and steps the base optimizer with it plus g (CrAM+). The training itself is dense: the masks
    stay all ones. ``sparsity`` is the sparsity the trained model is meant to be pruned to afterwards
    (``sparsetrain.oneshot.prune_oneshot`` and ``recalibrate_batchnorm``, or ``sparsetrain prune``); the
    sparsifier only records it. The compressed weights are this sparsifier's selection (``include`` /
    ``exclude``); every trainable parameter is perturbed.

    Needs ``optimizer.step(closure)``: the closure zeroes the gradients, computes the loss, calls backward and
    returns the loss; CrAM calls it twice per step (first at the clean weights). ``attach`` refuses any other
    optimizer: without the wrapper the run would be plain dense training.

    Reference: Peste, Vladu, Kurtic, Lampert, Alistarh, "CrAM: A Compression-Aware Minimizer", ICLR 2023,
    arXiv 2207.14200. Differences from the paper: see :class:`sparsetrain.optim.CrAM` (exact top-k counts,
    sparsity drawn from (seed, step)).
    """

    # prune_after_training: the trainer prunes the final model one-shot to ``sparsity`` (with batch-norm
    # re-calibration) and reports it as the run's sparse model, the trained model as its dense one.
    shardable = False  # see Sparsifier.shardable
    capabilities = Capability.OWN_OPTIMIZER | Capability.CLOSURE | Capability.PRUNE_AFTER_TRAINING

    def __init__(
        self,
        model: nn.Module,
        *,
        sparsity: float | None = None,
        rho: float = 0.05,
        sparsities: Sequence[float] = (0.5, 0.7, 0.9),
        plus: bool = True,
        mask_gradient: bool = True,
        **common: Any,
    ) -> None:
        mask_type = common.pop("mask_type", "unstructured")
        nm = maskops.parse_nm(mask_type)
        distribution = common.pop("distribution", None)
        if distribution not in (None, "global"):
            raise ValueError(
                f"cram compresses by one global magnitude ranking (or N:M); distribution={distribution!r} is not "
                "supported (leave it out or use 'global')"
            )
        if sparsity is not None:
            sparsity = maskops.check_sparsity(sparsity)
        self.target = maskops.nm_sparsity(mask_type, sparsity)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho < 0:
            raise ValueError(f"cram: rho must be a number >= 0 (0.05 in the paper), got {rho!r}")
        self.rho = float(rho)
        self.sparsities = tuple(maskops.check_sparsity(s, "cram: each of sparsities") for s in sparsities)
        self.plus = bool(plus)
        self.mask_gradient = bool(mask_gradient)
        # The training is dense: the base class holds all-ones masks; mask_type describes the compression.
        super().__init__(model, sparsity=0.0, **common)
        self.mask_type = mask_type
        if nm is not None:
            check_nm_parameters(self.params, nm, {n: input_dim(model, n) for n in self.params})

    def target_sparsity_at(self, step: int) -> float:
        return 0.0

    def attach(self, optimizer: torch.optim.Optimizer) -> CrAMMethod:
        """Attach to the :class:`~sparsetrain.optim.CrAM` optimizer from :meth:`wrap_optimizer`; others are refused."""
        if not isinstance(optimizer, CrAM):
            raise ValueError(
                f"cram trains through sparsetrain.optim.CrAM, got a plain {type(optimizer).__name__} (this would be "
                "dense training, no compression-aware step): use optimizer = sparsifier.wrap_optimizer(optimizer), "
                "then sparsifier.attach(optimizer)"
            )
        super().attach(optimizer)
        return self

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> CrAM:
        return optimizer if isinstance(optimizer, CrAM) else self.make_optimizer(optimizer)

    def make_optimizer(self, base_optimizer: torch.optim.Optimizer) -> CrAM:
        """Wrap the run's ``base_optimizer`` (built over ``model.parameters()``) in CrAM; attach the result."""
        return CrAM(
            [p for p in self.model.parameters() if p.requires_grad],
            base_optimizer,
            rho=self.rho,
            sparsities=self.sparsities,
            mask_type=self.mask_type,
            plus=self.plus,
            mask_gradient=self.mask_gradient,
            seed=self.seed,
            model=self.model,
            compress=list(self.params.values()),
        )
