"""Variational structured pruning: learned Bernoulli gates on units and filters under a spike-and-slab prior."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Capability, register
from ..structured.groups import NORM, PRODUCER, ZERO_INVARIANT_ROLES
from ._groupwise import GroupPruning

_EPS = 1e-6


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
    posterior of a useless group falls towards 0 and the others rise towards 1.
    A group is removed as soon as ``theta_g < threshold``: its weights are set to exactly zero and masked (with the
    input slices that read it), so the rest of the run trains a smaller network; the active forward FLOPs fall
    epoch by epoch (the ``sparsetrain train`` summary reports the training FLOPs). Never more groups than the
    target (``sparsity`` of groups, uniform per channel set by default, or ``target_flops``) are removed; at
    ``finish`` (default: the end of the run) the groups still missing are pruned by lowest theta, and the gates are
    removed: kept groups pass with z = 1 (in eval mode the gates are already deterministic, 1 where theta >= 0.5),
    so ``sparsetrain slim`` builds the deterministic final network.

    The gate logits are extra parameters: :meth:`wrap_optimizer` builds the run's optimizer class again over its
    param groups plus one for the logits (``gate_lr``, default the run's lr; no weight decay). The KL gradient is
    added in the pre-step hook, so the sparsifier must be attached (``sparsifier.step()`` is refused).

    Options: ``num_samples`` (N, the training set size: the KL's weight 1 / N; default 60,000), ``prior_keep``
    (pi, default ``1 - sparsity``), ``temperature`` (2/3), ``threshold`` (0.01),
    ``gate_init`` (theta at the start, 0.9), ``gate_lr``, ``finish``, ``target_flops``.

    Reference: V. F. I. Guenter, A. Sideris, "Robust Learning of Parsimonious Deep Neural Networks",
    arXiv 2205.04650 (simultaneous learning and pruning with Bernoulli gates under Gaussian scale-mixture priors).
    Differences from the paper: the paper's analytically derived hyper-prior over the prior parameters is not
    implemented: the slab scale s is fixed per tensor at its initial root-mean-square and pi at ``1 - sparsity``
    (options, not learned); the weights are point estimates (no Gaussian posterior on them, so no entropy term);
    gradients through the gates use the Concrete relaxation (Maddison et al. 2017) rather than the paper's
    estimator; the prune threshold on theta is an option; the run is capped at, and topped up to, an exact target.
    Later steps are cheaper only in FLOPs (the removed groups compute zeros): the model keeps its shape during
    training, so that optimizer state, checkpoints and resume stay as for every method.
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
        gate_lr: float | None = None,
        **common: Any,
    ) -> None:
        checks = (
            ("num_samples", num_samples, lambda v: isinstance(v, int) and v > 0, "an integer > 0"),
            ("prior_keep", prior_keep, lambda v: v is None or 0 < v < 1, "None or in (0, 1)"),
            ("temperature", temperature, lambda v: v > 0, "> 0"),
            ("threshold", threshold, lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            ("gate_init", gate_init, lambda v: 0 < v < 1, "in (0, 1)"),
            ("gate_lr", gate_lr, lambda v: v is None or v >= 0, "None or >= 0"),
        )
        for name, value, ok, allowed in checks:
            number = value is None or (not isinstance(value, bool) and isinstance(value, (int, float)))
            if not number or not ok(value):
                raise ValueError(f"variational: {name} must be {allowed}, got {value!r}")
        self.num_samples, self.prior_keep = int(num_samples), prior_keep
        self.temperature, self.threshold, self.gate_init, self.gate_lr = temperature, threshold, gate_init, gate_lr
        self._handles: list[Any] = []
        self._noise: tuple[int, list[Tensor]] | None = None
        super().__init__(model, **common)

    def setup(self) -> None:
        super().setup()
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
        if not training:
            return (self.logits[k].detach() >= 0).to(self.logits[k].dtype)  # theta >= 0.5: deterministic network
        if self._noise is None or self._noise[0] != self.count:
            generator = self.generator(self.count)
            self._noise = (self.count, [torch.rand(p.shape, generator=generator) for p in self.logits])
        u = self._noise[1][k].to(self.logits[k].device).clamp(_EPS, 1 - _EPS)
        return torch.sigmoid((self.logits[k] + torch.log(u) - torch.log1p(-u)) / self.temperature)

    def _hook(self, k: int):
        def gate(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
            z = self._gates(k, module.training).to(output.dtype)
            return output * z.view(1, -1, *([1] * (output.dim() - 2)))

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
        """The KL term of the negative ELBO over the groups still active (not divided by ``num_samples``)."""
        total = self.logits[0].new_zeros(())
        for k, channel_set in enumerate(self.channel_groups.sets):
            theta = torch.sigmoid(self.logits[k]).clamp(_EPS, 1 - _EPS)
            scaled = 0.0  # sum over the group's weights of (w / s)^2
            for name, dim, var in self.slab[k]:
                rows = self.params[name].movedim(dim, 0).reshape(channel_set.width, -1)
                scaled = scaled + rows.square().sum(dim=1) / var
            bern = theta * torch.log(theta / self.pi) + (1 - theta) * torch.log((1 - theta) / (1 - self.pi))
            per_group = theta * scaled / 2 + bern
            total = total + (per_group * self._active_groups(channel_set).to(per_group)).sum()
        return total

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.pruned_at(self.count):
            with torch.enable_grad():
                (self.kl() / self.num_samples).backward()
        super().before_step(optimizer)  # masked weights' gradients (the KL's included) are exactly 0

    def phase_at(self, step: int) -> str:
        return "sparse" if self.pruned_at(step) else "gated"

    def dead_groups(self, step: int) -> list[Tensor]:
        return [(t < self.threshold).cpu() for t in self.theta()]

    def group_scores(self, scores: dict[str, Tensor]) -> list[Tensor]:
        """Groups rank by their posterior inclusion probability theta (the prune to target keeps the highest)."""
        return [t.float().cpu() for t in self.theta()]

    def on_step(self, step: int) -> None:
        super().on_step(step)
        self._sync_hooks()

    # ------------------------------------------------------------------ the optimizer
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The run's optimizer class built again over its param groups plus the gate logits (no weight decay)."""
        if self._holds_gates(optimizer):
            return optimizer
        groups = [dict(g) for g in optimizer.param_groups]
        lr = groups[0]["lr"] if self.gate_lr is None else self.gate_lr
        groups.append({"params": list(self.logits), "lr": lr, "weight_decay": 0.0})
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
                "slab": [list(s) for s in self.slab]}  # fmt: skip

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "logits" in state:
            with torch.no_grad():
                for p, saved in zip(self.logits, state["logits"]):
                    p.copy_(saved)
        if "slab" in state:
            self.slab = [[(str(n), int(d), float(v)) for n, d, v in s] for s in state["slab"]]
        self._noise = None
        self._sync_hooks()
