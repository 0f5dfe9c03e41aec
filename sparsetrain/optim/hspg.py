"""Half-Space Stochastic Projected Gradient (HSPG): group sparsity over zero-invariant groups.

References: T. Chen et al., "Only Train Once: A One-Shot Neural Network Training And Pruning Framework",
NeurIPS 2021, arXiv 2107.07467 (Algorithm 2, the hybrid HSPG); T. Chen et al., "A Half-Space Stochastic Projected
Gradient Method for Group Sparsity Regularization", arXiv 2009.12078 (the Prox-SG first stage); T. Chen et al.,
"OTOv2: Automatic, Generic, User-Friendly", ICLR 2023, arXiv 2303.06862 (DHSPG, ``variant="dhspg"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["HSPG", "STAGE1_STEPS", "VARIANTS", "zig_members"]

# What stage 1 does: "subgradient" (OTO's Algorithm 2) or "prox" (Prox-SG, the HSPG paper's first stage).
STAGE1_STEPS = ("subgradient", "prox")
# "hspg": the NeurIPS 2021 optimizer; "dhspg": OTOv2's DHSPG (a target partition and an adaptive penalty).
VARIANTS = ("hspg", "dhspg")
# dhspg: a redundant group's component along itself fades as (1 - progress through the stage) ** FADE_POWER.
FADE_POWER = 3

# One member of a zero-invariant group set: channel c of the set is ``param.narrow(dim, c*block, block)``.
Member = tuple[Tensor, int, int]


def zig_members(model: nn.Module, zigs: Any) -> list[list[Member]]:
    """The zero-invariant part of every channel set of ``zigs`` (a ``structured.Groups``), as HSPG's ``groups``.

    A group is the channel's weight rows, bias, and batch-norm scale and shift (roles producer and norm): zeroing
    them zeroes the channel. The input slices of the layers that read it (consumers) are not penalised: once the
    channel is zero they are cut with it by :func:`sparsetrain.structured.slim`.
    """
    from ..structured.groups import ZERO_INVARIANT_ROLES

    named = dict(model.named_parameters())
    out = []
    for channel_set in zigs.sets:
        members = [
            (named[m.name], m.dim, m.block)
            for m in channel_set.members
            if m.role in ZERO_INVARIANT_ROLES and not m.buffer and m.name in named
        ]
        if members:
            out.append(members)
    return out


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_group(group: dict[str, Any]) -> None:
    """Raise ValueError naming the option, the value and what is allowed."""
    checks = (
        ("lr", lambda v: v >= 0, ">= 0"),
        ("lam", lambda v: v >= 0, ">= 0"),
        ("epsilon", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
    )
    for key, ok, allowed in checks:
        if not _number(group[key]) or not ok(group[key]):
            raise ValueError(f"HSPG: {key} must be a finite number {allowed}, got {group[key]!r}")
    for key in ("n_p", "step"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"HSPG: {key} must be an integer >= 0, got {value!r}")
    if group["stage1"] not in STAGE1_STEPS:
        raise ValueError(f"HSPG: stage1 must be one of {', '.join(STAGE1_STEPS)}; got {group['stage1']!r}")


def _rows(tensor: Tensor, dim: int, width: int) -> Tensor:
    """``tensor`` as (width, -1), row c = channel c (a view when the layout allows, else a copy)."""
    return tensor.movedim(dim, 0).reshape(width, -1)


class HSPG(torch.optim.Optimizer):
    """Half-Space Stochastic Projected Gradient for ``f(x) + lam * sum_g ||x_g||`` over zero-invariant groups.

    Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467, Algorithm 2. With
    ``grad_psi = grad f + lam * x_g / ||x_g||`` (0 for a zero group) and momentum ``d = m d + grad_psi``:

    - stage 1 (the first ``n_p`` steps), ``stage1="subgradient"`` (the paper's choice):
      ``x = x - lr * d``; ``stage1="prox"`` (Prox-SG, the first stage of the HSPG paper, arXiv 2009.12078):
      ``z = x - lr * d_f`` with ``d_f`` the momentum of ``grad f`` alone, then the exact group-lasso proximal step
      ``x_g = max(0, 1 - lr * lam / ||z_g||) * z_g``;
    - stage 2 (from step ``n_p`` on), the half-space step: the trial point ``t = x - lr * d`` is taken for every
      nonzero group; group g is projected to zero when ``t_g . x_g < epsilon * ||x_g||^2`` (its trial point leaves
      the half-space ``{y : y_g . x_g >= epsilon ||x_g||^2}``), otherwise ``x_g = t_g``. Zero groups stay zero.

    A group spans slices of several parameters (a convolution's output channel with its bias and its batch-norm
    scale and shift): ``groups`` lists the *channel sets*, each a list of members ``(param, dim, block)`` whose
    channel ``c`` is ``param.narrow(dim, c * block, block)`` (build it from ``sparsetrain.structured.groups`` with
    :func:`zig_members`). Every other parameter takes the plain momentum-SGD step. ``lam``, ``epsilon``, ``n_p``,
    ``stage1`` of a group set are read from the param group of its first member; each member steps with its own
    param group's ``lr``. ``step`` (a param-group entry) counts the steps taken, so ``state_dict`` round-trips the
    stage exactly.

    ``max_zero_groups`` caps the group sparsity (the reference code's ``upper_group_sparsity``): an int caps the
    zero groups over all sets (each set keeps at least one group), a sequence caps each set. When more groups
    qualify for the projection than the cap allows, the ones deepest past the half-space (smallest
    ``t_g . x_g / ||x_g||^2``) are projected first: deterministic, where the reference code draws them at random.

    ``variant="dhspg"``: OTOv2's Dual Half-Space Projected Gradient (Chen et al., ICLR 2023, arXiv 2303.06862),
    which needs the target (``max_zero_groups``) and the end of its sparsification stage (``n_end``). Before
    ``n_p`` every parameter takes the plain momentum-SGD step (no penalty). The stage from ``n_p`` to ``n_end``
    is split into ``periods`` pruning periods of (near) equal length (the reference code's ``pruning_periods``;
    1, the default, is one partition for the whole stage). At the first step of period ``i`` (0-based) the groups
    not chosen yet are ranked by saliency, evaluated then, and the highest-ranked are added to the *redundant*
    groups until they number ``floor(target * (i + 1) / periods)`` (per set, or over all sets for an int cap,
    each set keeping one group); the others stay *important*. The saliency is the paper's: the mean of the
    cosine between ``-x_g`` and ``-d_g`` and of ``1 / (||x_g|| / size_g)``, each vector normalised to unit
    length over the groups ranked. Important groups take the momentum-SGD step and are never projected. A
    redundant group of the current period has the trial point ``t_g = x_g - lr * d_g - lr * lam_g * x_g /
    ||x_g||`` (the penalty outside the momentum, as the reference code), with ``lam_g`` chosen at every step so
    that the trial point's component along ``x_g`` is ``((r - 1) / r)^3 ||x_g||``, ``r`` the steps left in the
    period, and at least ``lam``: along itself the group fades as ``(1 - progress through the period)^3`` (the
    cubic of gradual magnitude pruning, Zhu & Gupta 2017), whatever its gradient. It is projected to zero by the
    half-space test above, and at the period's last step (``r = 1``) any of them still nonzero is set to zero
    (its trial point is then within ``lr * ||d_g||`` of the origin); the redundant groups of earlier periods
    stay zero. Differences from the paper: the paper raises ``lam_g`` until the step points into the origin (a
    bound from the angle between ``d_g`` and ``x_g``); this rule also fixes *when* the group reaches the origin,
    so each period's share is met by its end, the target by the end of the stage, and the steps after it train
    the remaining network; the paper (ICLR 2023) partitions once, the reference code's ``pruning_periods`` (as
    in its HESSO optimizer) choose the target in shares as here but fade each share linearly within its period;
    the partition is exact per set where the reference code adds a tolerance to a global count.

    Defaults: ``lam = 1e-3`` (the reference implementation's default for SGD), ``epsilon = 0`` (the most
    conservative half-space: a group is projected only when its trial point crosses the hyperplane through the
    origin normal to ``x_g``; the paper tunes epsilon in [0, 1)), momentum 0 and no weight decay (``lr`` is then
    a plain SGD step size). ``n_p`` has no universal default: the ``oto`` method switches at half of the run.

    Args:
        params: parameters or param groups (options per group: lr, lam, epsilon, n_p, stage1, momentum,
            weight_decay).
        lr: step size, >= 0.
        groups: the channel sets, each a sequence of ``(param, dim, block)``; every param must be in ``params``.
        lam: group-lasso strength lambda >= 0.
        epsilon: half-space parameter in [0, 1).
        n_p: steps of stage 1 before the half-space steps.
        stage1: "subgradient" or "prox".
        momentum: heavy-ball momentum in [0, 1) (``d = m d + g``, as the reference code).
        weight_decay: l2 coefficient added to the gradient, >= 0.
        max_zero_groups: None (no cap), an int (over all sets) or one int per set.
        variant: "hspg" (NeurIPS 2021) or "dhspg" (OTOv2).
        n_end: "dhspg" only: the step by which every redundant group is zero (> ``n_p``).
        periods: "dhspg" only: pruning periods from ``n_p`` to ``n_end``, each choosing its share of the target
            by the saliency at its start (1 to ``n_end - n_p``; the other variant takes 1).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        groups: Sequence[Sequence[Member]] = (),
        lam: float = 1e-3,
        epsilon: float = 0.0,
        n_p: int = 0,
        stage1: str = "subgradient",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        max_zero_groups: int | Sequence[int] | None = None,
        variant: str = "hspg",
        n_end: int | None = None,
        periods: int = 1,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"HSPG: variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        if isinstance(periods, bool) or not isinstance(periods, int) or periods < 1:
            raise ValueError(f"HSPG: periods must be an integer >= 1, got {periods!r}")
        if variant == "dhspg":
            if max_zero_groups is None:
                raise ValueError("HSPG: variant 'dhspg' needs the target, max_zero_groups (got None)")
            if isinstance(n_end, bool) or not isinstance(n_end, int) or not n_end > n_p:
                raise ValueError(f"HSPG: variant 'dhspg' needs n_end, an integer step > n_p ({n_p!r}); got {n_end!r}")
            if periods > n_end - n_p:
                raise ValueError(f"HSPG: periods ({periods}) must not exceed the steps of the stage, n_end - n_p = "
                                 f"{n_end - n_p}: every period needs a step")  # fmt: skip
        elif periods != 1:
            raise ValueError(f"HSPG: periods is for variant 'dhspg' only; variant {variant!r} takes 1, got {periods!r}")
        self.variant, self.n_end, self.periods = variant, n_end, periods
        # dhspg: per set, the redundant groups (a bool per group) chosen so far, all periods together; ``active``
        # those of the latest period (the ones fading now); ``period`` how many periods have chosen theirs.
        self.redundant: list[Tensor] | None = None
        self.active: list[Tensor] | None = None
        self.period = 0
        defaults = dict(lr=lr, lam=lam, epsilon=epsilon, n_p=n_p, stage1=stage1, momentum=momentum,
                        weight_decay=weight_decay, step=0)  # fmt: skip
        _check_group(defaults)
        super().__init__(params, defaults)
        owned = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.groups: list[list[Member]] = []
        self.widths: list[int] = []
        seen: set[int] = set()
        for k, members in enumerate(groups):
            members = [(p, int(d), int(b)) for p, d, b in members]
            if not members:
                raise ValueError(f"HSPG: group set {k} has no members")
            widths = {p.shape[d] // b for p, d, b in members}
            if len(widths) != 1 or any(p.shape[d] % b for p, d, b in members):
                raise ValueError(f"HSPG: the members of group set {k} slice different numbers of channels: {widths}")
            for p, _, _ in members:
                if id(p) not in owned:
                    raise ValueError(f"HSPG: a parameter of group set {k} is not among the optimizer's params")
                if id(p) in seen:
                    raise ValueError(f"HSPG: a parameter is in more than one group set (set {k})")
                seen.add(id(p))
            self.groups.append(members)
            self.widths.append(widths.pop())
        self._owner = owned
        self.max_zero_groups = max_zero_groups
        self._check_cap()

    def _check_cap(self) -> None:
        cap = self.max_zero_groups
        if cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0):
            return
        if (
            isinstance(cap, Sequence)
            and len(cap) == len(self.groups)
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < w for c, w in zip(cap, self.widths))
        ):
            return
        raise ValueError(
            f"HSPG: max_zero_groups must be None, an int >= 0, or one int in [0, width) per group set "
            f"({len(self.groups)} sets); got {cap!r}"
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)  # lr and lam may have been rewritten by a schedule since the last step
        grouped = {id(p) for members in self.groups for p, _, _ in members}

        # Directions of f (gradient + weight decay) for every parameter with a gradient.
        direction: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("HSPG does not support sparse gradients")
                d = p.grad.clone()
                if group["weight_decay"]:
                    d.add_(p, alpha=group["weight_decay"])
                direction[id(p)] = d

        # Parameters outside every group: the momentum-SGD step.
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in grouped or id(p) not in direction:
                    continue
                p.add_(self._momentum(p, direction[id(p)], group["momentum"]), alpha=-group["lr"])

        if self.variant == "dhspg":
            pending = self._dhspg(direction)
        else:
            pending = self._hspg(direction)
        for k, project, zero, trial in self._apply_cap(pending):
            keep = ~(project | zero)
            self._write(self.groups[k], [t * keep[:, None].to(t.dtype) for t in trial])
        for group in self.param_groups:
            group["step"] += 1
        return loss

    def _hspg(self, direction: dict[int, Tensor]) -> list:
        """The NeurIPS 2021 steps of every set; sets in the half-space stage are returned for the projection."""
        pending = []  # (set index, projection candidates, depth, zero groups, trial rows) of half-space sets
        for k, members in enumerate(self.groups):
            if any(id(p) not in direction for p, _, _ in members):
                continue  # a member without a gradient: the set does not step (as torch optimizers skip it)
            lead = self.param_groups[self._owner[id(members[0][0])]]
            width = self.widths[k]
            x = [_rows(p, d, width) for p, d, _ in members]
            norm = torch.sqrt(sum(r.square().sum(dim=1) for r in x))
            nonzero = norm > 0
            safe = torch.where(nonzero, norm, torch.ones_like(norm))
            half_space = lead["step"] >= lead["n_p"]
            prox = not half_space and lead["stage1"] == "prox"
            trial = []
            for (p, d, _), rows in zip(members, x):
                g = _rows(direction[id(p)], d, width)
                if not prox:  # the subgradient of lam ||x_g||: lam x_g / ||x_g||, and 0 at a zero group
                    g = g + lead["lam"] * rows / safe[:, None] * nonzero[:, None]
                own = self.param_groups[self._owner[id(p)]]
                step_dir = self._momentum(p, g.reshape(p.movedim(d, 0).shape).movedim(0, d), own["momentum"])
                trial.append(rows - own["lr"] * _rows(step_dir, d, width))
            if prox:
                # The exact proximal operator of lr * lam * ||.||: shrink the group's norm by lr * lam, or to 0.
                lr = self.param_groups[self._owner[id(members[0][0])]]["lr"]
                z_norm = torch.sqrt(sum(t.square().sum(dim=1) for t in trial))
                shrink = (1 - lr * lead["lam"] / z_norm.clamp(min=torch.finfo(z_norm.dtype).tiny)).clamp(min=0)
                trial = [t * shrink[:, None] for t in trial]
            if half_space:
                dot = sum((t * r).sum(dim=1) for t, r in zip(trial, x))
                candidates = nonzero & (dot < lead["epsilon"] * norm.square())
                depth = torch.where(candidates, dot / safe.square(), torch.full_like(dot, math.inf))
                pending.append((k, candidates, depth, ~nonzero, trial))
            else:
                self._write(members, trial)
        return pending

    def _dhspg(self, direction: dict[int, Tensor]) -> list:
        """OTOv2's DHSPG steps of every set (see the class doc), all returned for the projection."""
        stepping = []  # (set index, rows, momentum directions as rows, lead param group)
        for k, members in enumerate(self.groups):
            if any(id(p) not in direction for p, _, _ in members):
                continue  # a member without a gradient: the set does not step (as torch optimizers skip it)
            width = self.widths[k]
            rows, dirs = [], []
            for p, d, _ in members:
                own = self.param_groups[self._owner[id(p)]]
                rows.append(_rows(p, d, width))
                dirs.append(_rows(self._momentum(p, direction[id(p)], own["momentum"]), d, width))
            stepping.append((k, rows, dirs))
        lead = self.param_groups[0]
        sparsify = lead["step"] >= lead["n_p"]
        left = 0
        if sparsify:
            period = self._period_at(lead["step"])
            if self.period <= period:  # this period's groups are not chosen yet: choose them by today's saliency
                self._partition({k: (rows, dirs) for k, rows, dirs in stepping}, period)
            left = self._period_start(period + 1) - lead["step"]  # steps left in the period, this one included
        pending = []
        for k, rows, dirs in stepping:
            members = self.groups[k]
            lr = [self.param_groups[self._owner[id(p)]]["lr"] for p, _, _ in members]
            trial = [r - a * g for r, g, a in zip(rows, dirs, lr)]
            norm = torch.sqrt(sum(r.square().sum(dim=1) for r in rows))
            zero = norm == 0
            project = torch.zeros_like(zero)
            if sparsify and left > 0:
                penalised = self.active[k] & ~zero  # type: ignore[index]
                # Groups of earlier periods were zeroed at their period's end: should one have missed it (its set
                # had no gradient then), it is zeroed now.
                late = self.redundant[k] & ~self.active[k] & ~zero  # type: ignore[index]
                safe = torch.where(zero, torch.ones_like(norm), norm)
                step_lr = lr[0]
                if step_lr > 0:
                    # lam_g: the trial point's component along x_g, ||x|| - lr <d, x> / ||x|| - lr lam_g, is
                    # ((left - 1) / left) ** 3 ||x||: over the stage the group fades as (1 - progress) ** 3, the
                    # cubic of gradual magnitude pruning (fast while the network is plastic, gently near zero).
                    # Never below lam.
                    inner = sum((g * r).sum(dim=1) for g, r in zip(dirs, rows))
                    fade = 1 - ((left - 1) / left) ** FADE_POWER
                    lam_g = (norm * fade / step_lr - inner / safe).clamp(min=lead["lam"])
                    shrink = torch.where(penalised, step_lr * lam_g / safe, torch.zeros_like(norm))
                    trial = [t - shrink[:, None] * r for t, r in zip(trial, rows)]
                dot = sum((t * r).sum(dim=1) for t, r in zip(trial, rows))
                project = penalised & ((dot < lead["epsilon"] * norm.square()) | (left == 1)) | late
            pending.append((k, project, torch.zeros_like(norm), zero, trial))
        return pending

    def _period_start(self, period: int) -> int:
        """The first step of ``period`` (0-based) of the stage; ``periods`` gives ``n_end``."""
        assert self.n_end is not None
        n_p = self.param_groups[0]["n_p"]
        return n_p + (period * (self.n_end - n_p)) // self.periods

    def _period_at(self, step: int) -> int:
        """The period ``step`` (>= n_p) falls in; the last one from ``n_end`` on."""
        period = 0
        while period + 1 < self.periods and self._period_start(period + 1) <= step:
            period += 1
        return period

    def _partition(self, stepping: dict[int, tuple[list[Tensor], list[Tensor]]], period: int = 0) -> None:
        """Choose the redundant groups of ``period`` in every set (class doc): the share of the target up to and
        including ``period``, less the groups earlier periods chose, by the highest saliency among the others."""
        chosen = self.redundant if self.redundant is not None else [torch.zeros(w, dtype=torch.bool) for w in
                                                                     self.widths]  # fmt: skip
        chosen = [c.cpu() for c in chosen]
        cosines, inverse_norms = [], []
        for k, members in enumerate(self.groups):
            width = self.widths[k]
            rows, dirs = stepping.get(k, ([_rows(p, d, width) for p, d, _ in members], None))
            x = torch.cat([r.float() for r in rows], dim=1)
            # A set without a gradient now has no direction: cosine 0.
            g = torch.cat([r.float() for r in dirs], dim=1) if dirs is not None else torch.zeros_like(x)
            cosines.append(torch.nn.functional.cosine_similarity(-x, -g, dim=1).cpu())
            inverse_norms.append((1.0 / (x.norm(dim=1) / x.shape[1] + 1e-6)).cpu())
        cos, inv = torch.cat(cosines), torch.cat(inverse_norms)
        # The saliency is normalised over the groups still to choose from: the zero groups of earlier periods
        # (inverse norm 1e6) would otherwise flatten every other group's norm score.
        candidate = ~torch.cat(chosen)
        score = torch.full_like(cos, -math.inf)
        score[candidate] = (0.5 * torch.nn.functional.normalize(cos[candidate], dim=0)
                            + 0.5 * torch.nn.functional.normalize(inv[candidate], dim=0))  # fmt: skip
        per_set = list(torch.split(score, self.widths))
        cap = self.max_zero_groups
        # The periods up to this one take their share of the target: cap * (period + 1) // periods in all.
        share = period + 1
        new = [torch.zeros(w, dtype=torch.bool) for w in self.widths]
        if isinstance(cap, int):
            # One count over all sets, highest score first (ties by position), each set keeping one group.
            order = torch.argsort(-score, stable=True)
            owner = torch.repeat_interleave(torch.arange(len(self.widths)), torch.tensor(self.widths))
            offsets = [0, *torch.cumsum(torch.tensor(self.widths), 0).tolist()]
            taken = [int(c.sum()) for c in chosen]
            left = cap * share // self.periods - sum(taken)
            for i in order.tolist():
                if left <= 0:
                    break
                k = int(owner[i])
                if candidate[i] and taken[k] < self.widths[k] - 1:
                    new[k][i - offsets[k]] = True
                    taken[k] += 1
                    left -= 1
        else:
            candidates = torch.split(candidate, self.widths)
            for k, (s, count) in enumerate(zip(per_set, cap)):  # type: ignore[arg-type]
                more = max(0, count * share // self.periods - int(chosen[k].sum()))
                order = torch.argsort(-s, stable=True)
                new[k][order[candidates[k][order]][:more]] = True
        self.active = [n.to(members[0][0].device) for n, members in zip(new, self.groups)]
        self.redundant = [(c | n).to(members[0][0].device) for c, n, members in zip(chosen, new, self.groups)]
        self.period = period + 1

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, plus (``dhspg``) the partition: the redundant groups chosen so far, those of
        the latest period, and how many periods have chosen theirs."""
        state = super().state_dict()

        def indices(masks: list[Tensor] | None) -> list[list[int]] | None:
            return None if masks is None else [m.nonzero().squeeze(1).tolist() for m in masks]

        state["redundant"] = indices(self.redundant)
        state["active"] = indices(self.active)
        state["period"] = self.period
        state["periods"] = self.periods
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        redundant = state_dict.pop("redundant", None)
        # A checkpoint from before the periods: one partition, all of it the latest period's.
        active = state_dict.pop("active", redundant)
        period = state_dict.pop("period", 0 if redundant is None else 1)
        periods = state_dict.pop("periods", self.periods)
        if periods != self.periods:
            raise ValueError(f"HSPG: the saved state is of a run with periods={periods}, this optimizer has "
                             f"periods={self.periods}")  # fmt: skip
        super().load_state_dict(state_dict)
        if redundant is None:
            self.redundant = self.active = None
            self.period = 0
            return
        if len(redundant) != len(self.groups) or len(active) != len(self.groups):
            raise ValueError(f"HSPG: the saved partition has {len(redundant)} group sets, this optimizer "
                             f"{len(self.groups)}")  # fmt: skip

        def masks(index_lists: list[list[int]]) -> list[Tensor]:
            out = []
            for k, index in enumerate(index_lists):
                width = self.widths[k]
                if not isinstance(index, list) or not all(type(i) is int and 0 <= i < width for i in index):
                    raise ValueError(f"HSPG: the saved partition of group set {k} is not a list of group indices "
                                     f"in [0, {width})")  # fmt: skip
                mask = torch.zeros(width, dtype=torch.bool)
                mask[torch.tensor(index, dtype=torch.long)] = True
                out.append(mask.to(self.groups[k][0][0].device))
            return out

        self.redundant, self.active, self.period = masks(redundant), masks(active), int(period)

    def _momentum(self, p: Tensor, d: Tensor, momentum: float) -> Tensor:
        if momentum == 0:
            return d
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = d.clone()
        else:
            state["momentum_buffer"].mul_(momentum).add_(d)
        return state["momentum_buffer"]

    def _apply_cap(self, pending: list) -> list[tuple[int, Tensor, Tensor, list[Tensor]]]:
        """Which candidates each half-space set projects, under ``max_zero_groups``."""
        cap = self.max_zero_groups
        out = []
        if cap is None:
            return [(k, cand, zero, trial) for k, cand, _, zero, trial in pending]
        if not isinstance(cap, int):
            for k, cand, depth, zero, trial in pending:
                out.append((k, self._deepest(cand, depth, cap[k] - int(zero.sum())), zero, trial))
            return out
        # One cap over all sets: the zero groups of every set count, including sets not stepping now; each set
        # keeps at least one nonzero group.
        total_zero = sum(int(self._zero_groups(k).sum()) for k in range(len(self.groups)))
        allowed = max(0, cap - total_zero)
        per_set = []
        for k, cand, depth, zero, _ in pending:
            room = self.widths[k] - 1 - int(zero.sum())  # leave one group alive in the set
            per_set.append(self._deepest(cand, depth, room))
        if not pending:
            return out
        flat_depth = torch.cat([torch.where(c, d, torch.full_like(d, math.inf)) for c, (_, _, d, _, _) in
                                zip(per_set, pending)])  # fmt: skip
        flat_cand = torch.cat(per_set)
        chosen = self._deepest(flat_cand, flat_depth, allowed)
        offset = 0
        for k, cand, _, zero, trial in pending:
            n = cand.numel()
            out.append((k, chosen[offset : offset + n], zero, trial))
            offset += n
        return out

    @staticmethod
    def _deepest(candidates: Tensor, depth: Tensor, room: int) -> Tensor:
        """At most ``room`` of ``candidates``: the deepest past the half-space, ties by index."""
        count = int(candidates.sum())
        if count <= max(room, 0):
            return candidates
        chosen = torch.zeros_like(candidates)
        if room > 0:
            order = torch.argsort(torch.where(candidates, depth, torch.full_like(depth, math.inf)), stable=True)
            chosen[order[:room]] = True
        return chosen

    def _zero_groups(self, k: int) -> Tensor:
        width = self.widths[k]
        norm = sum(_rows(p, d, width).square().sum(dim=1) for p, d, _ in self.groups[k])
        return norm == 0

    @staticmethod
    def _write(members: list[Member], rows: list[Tensor]) -> None:
        for (p, d, _), r in zip(members, rows):
            # +0.0 for zeros (a projected negative weight would otherwise be -0.0).
            p.copy_(r.reshape(p.movedim(d, 0).shape).movedim(0, d)).add_(0.0)

    def group_sparsity(self) -> float:
        """The fraction of groups (over all sets) whose every slice is exactly zero."""
        total = sum(self.widths)
        return sum(int(self._zero_groups(k).sum()) for k in range(len(self.groups))) / max(1, total)
