"""Variational structured pruning: learned Bernoulli gates on units and filters under a spike-and-slab prior."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Capability, register
from ..structured.groups import NORM, PRODUCER, ZERO_INVARIANT_ROLES
from ..structured.slim_training import WIDTH_AWARE
from ._groupwise import GroupPruning

_EPS = 1e-6
# The gates' natural-gradient step size at the run's initial learning rate (it follows the run's schedule).
DEFAULT_GATE_LR = 0.002
# Floor of theta (1 - theta), the Bernoulli's Fisher information, in the natural gradient (a gate at 0 or 1 has
# none; the floor bounds the step there).
_FISHER_FLOOR = 1e-4
# The slab scale: fixed at the weights' initial RMS, or re-estimated from the posterior (empirical Bayes).
SLAB_MODES = ("fixed", "empirical")


@register("variational")
class Variational(GroupPruning):
    """Variational structured pruning: Bernoulli gates on units/filters learned with the weights; gates at 0 pruned.

    Every zero-invariant group g (a unit or filter with its bias and batch-norm scale and shift, residual channels
    tied; :func:`sparsetrain.structured.groups`) gets a gate ``z_g`` multiplying its output channel (after its
    batch norm when it has one) with the variational posterior ``q(z_g) = Bernoulli(theta_g)``,
    ``theta_g = sigmoid(phi_g)``, learned together with the weights. The prior is a Gaussian scale mixture: the
    effective weights ``z_g w_g`` are 0 (the spike, scale 0) with probability ``1 - pi`` and ``N(0, s^2)`` (the
    slab) with probability ``pi``. Training minimises the negative ELBO per sample: the data loss (the gates drawn
    from a Concrete relaxation of q, temperature ``temperature``, noise from the sparsifier's (seed, step)
    generator) plus ``KL / num_samples`` with, per group, ::

        KL_g = theta |w_g / s|^2 / 2 + theta log(theta / pi) + (1 - theta) log((1 - theta) / (1 - pi))

    (a gate that is off costs nothing for its weights: under the spike they are unidentified). Keeping a group
    costs its weights' slab penalty and the prior's odds against it; the data term pays for the useful ones, so the
    posterior of a useless group falls towards 0 and the others rise towards 1. The KL's weight rises linearly
    from 0 to 1 over ``kl_warmup`` (default: half of the run; :meth:`kl_weight`), so the data term ranks the
    groups before the prior closes gates.

    The gate logits take the ELBO's natural-gradient step (the Bernoulli's gradient in theta, i.e. the per-sample
    gradient times ``N / (theta (1 - theta))``), at step size ``gate_lr`` scaled by the run's learning-rate
    schedule, without momentum: each logit moves towards its fixed point ``logit(pi) - keep cost - N dLoss/dtheta``
    at rate ``gate_lr`` whatever N, so gates settle to 0 or 1 within a short run.
    A group is removed as soon as ``theta_g < threshold``: its weights are set to exactly zero and masked (with the
    input slices that read it), so the rest of the run trains a smaller network; the active forward FLOPs fall
    epoch by epoch (the ``sparsetrain train`` summary reports the training FLOPs). Never more groups than the
    target (``sparsity`` of groups, uniform per channel set by default, or ``target_flops``) are removed (when
    more gates close at once, the lowest theta go first); a set that reaches its target is *settled*: its other
    groups are kept, their gates removed (z = 1) and their logits frozen (:meth:`settled`). At ``finish``
    (default: the end of the run) the groups still missing are pruned by lowest ``theta * RMS`` of the group (the
    posterior mean size of its effective weights), and the gates are removed: kept groups pass with z = 1 (in
    eval mode the gates are already deterministic, 1 where theta >= 0.5), so ``sparsetrain slim`` builds the
    deterministic final network.

    The gate logits are extra parameters: :meth:`wrap_optimizer` builds the run's optimizer class again over its
    param groups plus one for the logits (no weight decay, no momentum). The KL gradient is added in the pre-step
    hook, so the sparsifier must be attached (``sparsifier.step()`` is refused).

    **Empirical-Bayes slab** (``slab="empirical"``; the default ``"fixed"`` keeps s at the initial RMS). The
    slab's log density of a kept group's weights is ``-|w_g|^2 / (2 s^2) - |g| log s`` plus a constant (``|g|``
    the number of weights the group has in the tensor), so the ELBO's terms in one tensor's slab variance
    ``v = s^2`` are ``-sum_g theta_g (|w_g|^2 / (2 v) + |g| log(v) / 2)``; setting their derivative in v,
    ``sum_g theta_g (|w_g|^2 / (2 v^2) - |g| / (2 v))``, to zero gives the maximiser (a maximum: the
    derivative is positive below it and negative above) ::

        v = sum_g theta_g |w_g|^2 / sum_g theta_g |g|

    the theta-weighted mean square of the groups' weights (type-II maximum likelihood: the prior's parameter
    chosen from the data). Alone it can collapse: with point-estimate weights the joint optimum over (w, s) is
    unbounded at w = 0, s -> 0 (the normaliser ``-|g| log s`` grows without limit), and a smaller s makes the
    penalty ``|w / s|^2 / 2`` shrink the weights faster. With ``slab_prior_weight`` nu > 0, v also has an
    inverse-Gamma hyper-prior ``IG(a, b)`` with ``a + 1 = nu n / 2`` and ``b = nu n v0 / 2`` (n the tensor's
    number of gated weights, its mode the initial mean square v0); adding its log density
    ``-(a + 1) log v - b / v`` moves the maximum (MAP) to ::

        v = (b + sum_g theta_g |w_g|^2 / 2) / (a + 1 + sum_g theta_g |g| / 2)
          = (nu n v0 + sum_g theta_g |w_g|^2) / (nu n + sum_g theta_g |g|)

    i.e. nu times the tensor's weights as pseudo-weights at the initial scale; since ``sum_g theta_g |g| <= n``,
    it keeps ``s >= s0 sqrt(nu / (1 + nu))``. v is re-estimated per tensor before
    every step from the current weights and theta (detached: no gradient flows through it), over the groups the
    KL sums (unmasked groups of the sets still gated), and the KL then carries the slab's normaliser, per
    group ``theta_g |g| log(s / s0)`` (summed over the group's tensors), measured from the initial scale s0: the
    fixed prior is the case s = s0, where the term is 0, so both start from the same KL and, to first order in
    s - s0, the same gate cost. The current s and s0 are part of the sparsifier's state (resume is exact).

    **The slab on the gates only** (``slab_on_weights=False``; default true, the ELBO above). The KL's slab term
    ``theta |w_g / s|^2 / 2`` does two things: it prices keeping group g for its gate (the gradient in theta),
    and it pulls the weights towards 0 (the gradient in w: a weight decay of ``theta / (s^2 N)``). With the
    point-estimate weights here the second is a MAP weight penalty on top of the run's own weight decay, and with
    few training samples it dominates: MNIST-1D's 3,600 samples and s0 the initial RMS of its convolutions make it
    ~0.06 per weight, 125 times a usual 5e-4. With ``slab_on_weights=False`` the term keeps pricing the gates (its
    value and its gradient in theta are unchanged) but the weights see no gradient from it, so their only prior is
    the optimizer's weight decay. What it changes against the ELBO: the objective the weights descend is the data
    loss plus the run's weight decay, not the negative ELBO. Measured (BENCHMARKS.md, structured pruning): +5.7
    points on MNIST-1D at 100 epochs, within the seeds' spread on Fashion-MNIST LeNet-5 and ResNet-20; so the
    default stays the ELBO.

    Options: ``num_samples`` (N, the training set size: the KL's weight 1 / N; default 60,000), ``prior_keep``
    (pi, default ``1 - sparsity``), ``temperature`` (2/3), ``threshold`` (0.01), ``gate_init`` (theta at the
    start, 0.9), ``gate_lr`` (0.002), ``kl_warmup`` (in ``unit``; default half of the run), ``finish``,
    ``target_flops``, ``slab`` (``"fixed"`` or ``"empirical"``), ``slab_prior_weight`` (nu, default 0: the
    hyper-prior's weight relative to the tensor's size, used by ``"empirical"`` only), ``slab_on_weights``
    (default true; below). The defaults of
    ``gate_lr`` and ``kl_warmup`` were chosen on Fashion-MNIST LeNet-5 (4 epochs, 50% of FLOPs removed).

    Reference: V. F. I. Guenter, A. Sideris, "Robust Learning of Parsimonious Deep Neural Networks",
    arXiv 2205.04650 (simultaneous learning and pruning with Bernoulli gates under Gaussian scale-mixture priors).
    Differences from the paper: the paper's analytically derived hyper-prior over the prior parameters is not
    implemented: the slab scale s is fixed per tensor at its initial root-mean-square, or (``slab="empirical"``)
    set from the data by the empirical-Bayes estimate above (ours, not the paper's hyper-prior), and pi is
    ``1 - sparsity`` (an option, not learned); the weights are point estimates (no Gaussian posterior on them, so
    no entropy term); gradients through the gates use the Concrete relaxation (Maddison et al. 2017) rather than
    the paper's estimator; the natural-gradient gate step, the KL warm-up, the settling of a set at its target and
    the prune threshold on theta are ours; the run is capped at, and topped up to, an exact target.
    The model keeps its shape during training, so that optimizer state, checkpoints and resume stay as for every
    method; removed groups compute zeros, so later steps are cheaper in FLOPs only, unless the run uses
    :class:`~sparsetrain.structured.SlimTraining` (``slim_training: auto`` in the trainer), which runs the
    narrower network: the gates are then applied to the kept channels it shares through ``slim_kept``.
    """

    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.CHANNEL | Capability.OWN_OPTIMIZER
    needs_attach = True

    def __init__(
        self,
        model: nn.Module,
        *,
        num_samples: int = 60000,
        prior_keep: float | None = None,
        temperature: float = 2.0 / 3.0,
        threshold: float = 0.01,
        gate_init: float = 0.9,
        gate_lr: float = DEFAULT_GATE_LR,
        kl_warmup: float | None = None,
        slab: str = "fixed",
        slab_prior_weight: float = 0.0,
        slab_on_weights: bool = True,
        **common: Any,
    ) -> None:
        checks = (
            ("num_samples", num_samples, lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
            ("prior_keep", prior_keep, lambda v: v is None or 0 < v < 1, "None or in (0, 1)"),
            ("temperature", temperature, lambda v: v > 0, "> 0"),
            ("threshold", threshold, lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            ("gate_init", gate_init, lambda v: 0 < v < 1, "in (0, 1)"),
            ("gate_lr", gate_lr, lambda v: v is not None and v >= 0, ">= 0"),
            ("slab_prior_weight", slab_prior_weight, lambda v: v is not None and 0 <= v < math.inf, ">= 0"),
        )
        if not isinstance(slab_on_weights, bool):
            raise ValueError(f"variational: slab_on_weights must be true or false, got {slab_on_weights!r}")
        if slab not in SLAB_MODES:
            raise ValueError(f"variational: slab must be one of {', '.join(map(repr, SLAB_MODES))}, got {slab!r}")
        for name, value, ok, allowed in checks:
            number = value is None or (not isinstance(value, bool) and isinstance(value, (int, float)))
            if not number or not ok(value):
                raise ValueError(f"variational: {name} must be {allowed}, got {value!r}")
        self.num_samples, self.prior_keep = int(num_samples), prior_keep
        self.temperature, self.threshold, self.gate_init, self.gate_lr = temperature, threshold, gate_init, gate_lr
        self.kl_warmup = kl_warmup
        self.slab_mode, self.slab_prior_weight = slab, float(slab_prior_weight)
        self.slab_on_weights = slab_on_weights
        self._handles: list[Any] = []
        self._settled: list[bool] = []
        self._base_lr: float | None = None  # the run's lr when the gates joined the optimizer
        self._noise: tuple[int, list[Tensor]] | None = None
        # Channel set name -> kept channel indices, for the sets SlimTraining cuts (it fills this dict): a gate
        # vector wider than its module's output is indexed by them. Empty when the model runs at full width.
        self.slim_kept: dict[str, Tensor] = {}
        super().__init__(model, **common)

    def setup(self) -> None:
        super().setup()
        self.warmup_step = self.steps(self.kl_warmup, "kl_warmup", default_fraction=0.5)
        if not 0 <= self.warmup_step <= self.require_total_steps():
            raise ValueError(
                f"variational: kl_warmup must lie within the run (0 to {self.total_steps} steps), "
                f"got {self.kl_warmup!r}"
            )
        self._settled = [False] * len(self.channel_groups.sets)
        device = next(iter(self.params.values())).device
        logit = math.log(self.gate_init / (1 - self.gate_init))
        self.logits = [nn.Parameter(torch.full((s.width,), logit, device=device)) for s in self.channel_groups.sets]
        pi = 1.0 - self.final_sparsity if self.prior_keep is None else self.prior_keep
        self.pi = min(max(pi, _EPS), 1 - _EPS)
        # The slab's variance per tensor: its initial mean square (tensors that start at zero carry no prior).
        self.slab: list[list[tuple[str, int, float]]] = []
        for channel_set in self.channel_groups.sets:
            members = []
            for m in channel_set.members:
                if m.role in ZERO_INVARIANT_ROLES and not m.buffer:
                    var = float(self.params[m.name].detach().float().square().mean())
                    if var > 0:
                        members.append((m.name, m.dim, var))
            self.slab.append(members)
        # The initial variances s0^2: the empirical slab's reference (its normaliser log(s / s0), its hyper-prior).
        self.slab0: list[list[tuple[str, int, float]]] = [list(members) for members in self.slab]
        # The gates act on the channel after its batch norm (a norm renormalises what comes before it), on the
        # producing layers' outputs where the set has no norm.
        self.gated: list[list[str]] = []
        for channel_set in self.channel_groups.sets:
            roles = NORM if any(m.role == NORM for m in channel_set.members) else PRODUCER
            self.gated.append(sorted({m.module for m in channel_set.members if m.role == roles}))

    # ------------------------------------------------------------------ the gates
    def theta(self) -> list[Tensor]:
        """Per channel set, the posterior inclusion probabilities theta_g (detached)."""
        return [torch.sigmoid(p.detach()) for p in self.logits]

    def _gates(self, k: int, training: bool) -> Tensor:
        if self._settled[k]:  # the set reached its target: its other groups are kept, z = 1
            return torch.ones_like(self.logits[k].detach())
        if not training:
            return (self.logits[k].detach() >= 0).to(self.logits[k].dtype)  # theta >= 0.5: deterministic network
        if self._noise is None or self._noise[0] != self.count:
            generator = self.generator(self.count)
            self._noise = (self.count, [torch.rand(p.shape, generator=generator) for p in self.logits])
        u = self._noise[1][k].to(self.logits[k].device).clamp(_EPS, 1 - _EPS)
        return torch.sigmoid((self.logits[k] + torch.log(u) - torch.log1p(-u)) / self.temperature)

    def _hook(self, k: int):
        name = self.channel_groups.sets[k].name

        def gate(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            z = self._gates(k, module.training).to(output.dtype)
            if output.shape[1] != z.shape[0]:
                # SlimTraining runs the module narrower: its output holds the kept channels only.
                kept = self.slim_kept.get(name)
                if kept is None or kept.numel() != output.shape[1]:
                    raise RuntimeError(
                        f"variational: {name!r} outputs {output.shape[1]} channels, its gates are {z.shape[0]} "
                        "and no kept channels were shared for it (slim_kept)"
                    )
                z = z.index_select(0, kept.to(z.device))
            return output * z.view(1, -1, *([1] * (output.dim() - 2)))

        setattr(gate, WIDTH_AWARE, True)  # SlimTraining may cut the gated modules
        return gate

    def _sync_hooks(self) -> None:
        """Gates while the method runs, none after the prune to target (kept groups pass with z = 1)."""
        wanted = not self.pruned_at(self.count)
        if wanted and not self._handles:
            modules = dict(self.model.named_modules())
            for k, names in enumerate(self.gated):
                for name in names:
                    self._handles.append(modules[name].register_forward_hook(self._hook(k)))
        elif not wanted and self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def kl(self) -> Tensor:
        """The KL term of the negative ELBO over the groups still gated (not divided by ``num_samples``).

        Sets that reached their target (:meth:`settled`) no longer carry gates, so no KL. With
        ``slab="empirical"`` it includes the slab's normaliser ``theta_g |g| log(s / s0)`` (class docstring).
        """
        total = self.logits[0].new_zeros(())
        for k, channel_set in enumerate(self.channel_groups.sets):
            if self._settled[k]:
                continue
            theta = torch.sigmoid(self.logits[k]).clamp(_EPS, 1 - _EPS)
            scaled = 0.0  # sum over the group's weights of (w / s)^2
            normaliser = 0.0  # the empirical slab's sum over the group's weights of log(s / s0)
            for (name, dim, var), (_, _, var0) in zip(self.slab[k], self.slab0[k]):
                rows = self.params[name].movedim(dim, 0).reshape(channel_set.width, -1)
                energy = rows.square().sum(dim=1)
                if not self.slab_on_weights:  # the slab prices the gates only: no pull on the weights
                    energy = energy.detach()
                scaled = scaled + energy / var
                if self.slab_mode == "empirical":
                    normaliser = normaliser + rows.shape[1] * 0.5 * math.log(var / var0)
            bern = theta * torch.log(theta / self.pi) + (1 - theta) * torch.log((1 - theta) / (1 - self.pi))
            per_group = theta * scaled / 2 + bern
            if self.slab_mode == "empirical":
                per_group = per_group + theta * normaliser
            total = total + (per_group * self._active_groups(channel_set).to(per_group)).sum()
        return total

    @torch.no_grad()
    def update_slab(self) -> None:
        """``slab="empirical"``: each tensor's slab variance set to the ELBO's maximiser (class docstring).

        ``s^2 = (nu n s0^2 + sum_g theta_g |w_g|^2) / (nu n + sum_g theta_g |g|)`` (n the tensor's gated weights)
        over the unmasked groups of the sets still gated (those the KL sums); a tensor whose groups carry no
        weight (every theta 0, nu 0) keeps
        its variance. Computed in float64 from the detached weights and theta: no gradient flows through s.
        """
        if self.slab_mode != "empirical":
            return
        nu = self.slab_prior_weight
        for k, channel_set in enumerate(self.channel_groups.sets):
            if self._settled[k] or not self.slab[k]:
                continue
            theta = torch.sigmoid(self.logits[k].detach()).clamp(_EPS, 1 - _EPS).double()
            weight = theta * self._active_groups(channel_set).to(theta)
            updated = []
            for (name, dim, var), (_, _, var0) in zip(self.slab[k], self.slab0[k]):
                rows = self.params[name].detach().movedim(dim, 0).reshape(channel_set.width, -1).double()
                squares = float((weight.to(rows.device) * rows.square().sum(dim=1)).sum())
                count = float(weight.sum()) * rows.shape[1]
                pseudo = nu * rows.numel()  # the hyper-prior's pseudo-weights at the initial scale
                estimate = (pseudo * var0 + squares) / (pseudo + count) if pseudo + count > 0 else 0.0
                updated.append((name, dim, estimate if estimate > 0 else var))
            self.slab[k] = updated

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.pruned_at(self.count):
            self.update_slab()
            with torch.enable_grad():
                kl = self.kl()
                if kl.requires_grad:  # not when every set has settled (no gates left)
                    (self.kl_weight(self.count) * kl / self.num_samples).backward()
            self._natural_gate_gradient(optimizer)
        super().before_step(optimizer)  # masked weights' gradients (the KL's included) are exactly 0

    @torch.no_grad()
    def _natural_gate_gradient(self, optimizer: torch.optim.Optimizer) -> None:
        """The logits' gradient as the ELBO's natural gradient, and the gates' step size on the run's schedule.

        Why: the loss is per sample and the KL divided by N, so the logits' plain gradient is the ELBO's divided
        by N and, through sigmoid', by theta (1 - theta): at the weights' learning rate the gates do not move in
        a run of a few epochs (theta stayed at its initial value in a 4-epoch Fashion-MNIST run). The natural
        gradient of a Bernoulli in its logit is the gradient in theta, ``N / (theta (1 - theta))`` times the
        per-sample one: the step ``logit -= gate_lr * dELBO/dtheta`` moves each logit towards its fixed point
        ``logit(pi) - keep cost - N dLoss/dtheta`` at rate ``gate_lr``, whatever N, so gates settle to 0 or 1.
        """
        for k, p in enumerate(self.logits):
            if p.grad is not None and self._settled[k]:
                p.grad.zero_()  # its gates are gone: the logits stay where they settled
            elif p.grad is not None:
                theta = torch.sigmoid(p)
                p.grad.mul_(self.num_samples / (theta * (1 - theta)).clamp(min=_FISHER_FLOOR))
        # The trainer writes one learning rate into every param group each step: the gates' group follows the
        # run's schedule at its own scale (gate_lr at the run's initial lr).
        held = {id(p) for p in self.logits}
        gate_groups = [g for g in optimizer.param_groups if any(id(p) in held for p in g["params"])]
        others = [g for g in optimizer.param_groups if not any(id(p) in held for p in g["params"])]
        if not gate_groups:
            return
        factor = 1.0
        if others:
            lr = float(others[0]["lr"])
            # A run at lr 0 trains nothing, gates included.
            factor = lr / self._base_lr if self._base_lr else float(lr > 0)
        for group in gate_groups:
            group["lr"] = self.gate_lr * factor

    def kl_weight(self, step: int) -> float:
        """The KL's weight at ``step``: linear from 0 to 1 over the first ``kl_warmup`` of the run, then 1.

        Why: at initialisation the network has learnt nothing, so no group is worth its keep cost yet and, at full
        weight, the KL closes every gate within a few steps (seen on LeNet-5: all of fc1 in 5 steps). The warm-up
        (KL annealing, Sønderby et al. 2016) lets the data term rank the groups first; gates then close one by one
        as the weight rises, the least useful first.
        """
        if self.warmup_step <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_step)

    def settled(self) -> list[bool]:
        """Per channel set, whether it reached its target of removed groups (its gates are then gone, z = 1)."""
        return list(self._settled)

    def _update_settled(self) -> None:
        dead = [int((~self._active_groups(s)).sum()) for s in self.channel_groups.sets]
        if isinstance(self.max_dead, list):
            self._settled = [d >= cap for d, cap in zip(dead, self.max_dead)]
        else:
            self._settled = [sum(dead) >= self.max_dead] * len(dead)

    def phase_at(self, step: int) -> str:
        return "sparse" if self.pruned_at(step) else "gated"

    def dead_groups(self, step: int) -> list[Tensor]:
        return [(t < self.threshold).cpu() for t in self.theta()]

    def group_scores(self, scores: dict[str, Tensor]) -> list[Tensor]:
        """Groups rank by the posterior mean of their effective weights' size: theta times the group's RMS.

        Why not theta alone: where the gates have settled theta decides (0 or 1), but gates still undecided at the
        prune (a short run) carry little information, and ranking them by theta alone kept worse channels than
        magnitude does (79.9% against 85.9% for channel GMP on Fashion-MNIST LeNet-5).
        """
        return [t.float().cpu() * m.float().cpu() for t, m in zip(self.theta(), super().group_scores(scores))]

    def dead_priority(self) -> list[Tensor]:
        return [t.float().cpu() for t in self.theta()]

    def on_step(self, step: int) -> None:
        super().on_step(step)
        self._update_settled()
        self._sync_hooks()

    # ------------------------------------------------------------------ the optimizer
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The run's optimizer class built again over its param groups plus the gate logits (no weight decay)."""
        if self._holds_gates(optimizer):
            return optimizer
        groups = [dict(g) for g in optimizer.param_groups]
        self._base_lr = float(groups[0]["lr"])
        gates: dict[str, Any] = {"params": list(self.logits), "lr": self.gate_lr, "weight_decay": 0.0}
        if "momentum" in optimizer.defaults:  # plain natural-gradient steps (SGD): gate_lr is the step size
            gates.update(momentum=0.0, nesterov=False)
        groups.append(gates)
        # Only the options its constructor takes (AdamW keeps a 'decoupled_weight_decay' default it does not accept).
        accepted = inspect.signature(type(optimizer).__init__).parameters
        defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
        try:
            return type(optimizer)(groups, **defaults)
        except TypeError as error:
            raise ValueError(
                f"variational adds its gate logits to the optimizer by building {type(optimizer).__name__} again, "
                f"which failed ({error}); build the optimizer yourself with the extra param group "
                "{'params': sparsifier.logits, 'weight_decay': 0.0}"
            ) from None

    def _holds_gates(self, optimizer: torch.optim.Optimizer) -> bool:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        return all(id(p) in held for p in self.logits)

    def attach(self, optimizer: torch.optim.Optimizer) -> Variational:
        """Attach to an optimizer that holds the gate logits (from :meth:`wrap_optimizer`); others are refused."""
        if not self._holds_gates(optimizer):
            raise ValueError(
                f"variational learns gate logits the given {type(optimizer).__name__} does not hold: use "
                "optimizer = sparsifier.wrap_optimizer(optimizer), then sparsifier.attach(optimizer)"
            )
        super().attach(optimizer)
        return self

    def detach(self) -> None:
        super().detach()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {**super().extra_state(), "logits": [p.detach().clone() for p in self.logits],
                "slab": [list(s) for s in self.slab], "slab0": [list(s) for s in self.slab0]}  # fmt: skip

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "logits" in state:
            with torch.no_grad():
                for p, saved in zip(self.logits, state["logits"]):
                    p.copy_(saved)
        if "slab" in state:
            self.slab = [[(str(n), int(d), float(v)) for n, d, v in s] for s in state["slab"]]
            # A checkpoint from before the empirical slab: its s never moved, so s0 is s.
            saved0 = state.get("slab0", state["slab"])
            self.slab0 = [[(str(n), int(d), float(v)) for n, d, v in s] for s in saved0]
        self._noise = None
        self._update_settled()
        self._sync_hooks()
