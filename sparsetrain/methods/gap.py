"""GaP: scheduled grow-and-prune, cyclic variant (Ma et al. 2021, arXiv 2106.09857)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core import Capability, ScheduledPruning, register
from ..distributions import layer_sparsities
from ..maskops import keep_count
from ..schedules import GroupCycles

INIT_MASKS = ("magnitude", "random")
DEFAULT_GROUPS = 4


def balanced_partition(sizes: Sequence[int], groups: int) -> list[tuple[int, int]]:
    """Split ``sizes`` (parameter counts, in model order) into ``groups`` contiguous non-empty runs of similar total.

    Returns ``(start, end)`` index pairs. Balanced in two passes, both exact dynamic programs over the split
    points: first the smallest possible largest group (the dense phase furthest from the target sparsity), then,
    among the partitions that reach it, the smallest sum of squared group totals (the other groups as even as
    possible). Ties go to the earliest split, so every rank computes the same partition.
    """
    n = len(sizes)
    if not 1 <= groups <= n:
        raise ValueError(f"cannot split {n} layers into {groups} non-empty groups")
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + int(size))

    def best(cost, limit: float) -> tuple[list[list[float]], list[list[int]]]:
        # value[j][i]: best cost of the first i layers in j groups; cut[j][i]: where the last of those j groups starts.
        inf = float("inf")
        value = [[inf] * (n + 1) for _ in range(groups + 1)]
        cut = [[0] * (n + 1) for _ in range(groups + 1)]
        value[0][0] = 0
        for j in range(1, groups + 1):
            for i in range(j, n - (groups - j) + 1):
                for s in range(j - 1, i):
                    total = prefix[i] - prefix[s]
                    if total > limit or value[j - 1][s] == inf:
                        continue
                    candidate = cost(value[j - 1][s], total)
                    if candidate < value[j][i]:
                        value[j][i], cut[j][i] = candidate, s
        return value, cut

    largest, _ = best(lambda before, total: max(before, total), float("inf"))
    _, cut = best(lambda before, total: before + total * total, largest[groups][n])
    bounds, end = [], n
    for j in range(groups, 0, -1):
        start = cut[j][end]
        bounds.append((start, end))
        end = start
    return bounds[::-1]


def unit_sq_norms(weight: Tensor) -> Tensor:
    """Squared L2 norm of each output unit's weights (dim 0: a Linear's row, a conv's output channel)."""
    return weight.detach().reshape(weight.shape[0], -1).float().pow(2).sum(dim=1)


def norm_preserving_scale(weight: Tensor, dense_sq_norms: Tensor) -> Tensor:
    """Per-unit factor that gives the masked ``weight`` (pruned entries 0) each unit's dense squared norm back.

    A unit's pre-activation over inputs with uncorrelated entries of variance v has variance ||w||^2 v, so
    restoring ||w|| restores the dense init's signal scale for any mask. The fan-in rule sqrt(fan_in / active)
    does the same only in expectation over a random mask: after a magnitude top-k it overshoots, since the kept
    weights are the largest. Units with no kept weight (or nothing pruned) get 1.
    """
    kept = unit_sq_norms(weight)
    dense = dense_sq_norms.to(kept.device)
    scale = torch.where((kept > 0) & (kept != dense), (dense / kept.clamp(min=1e-30)).sqrt(), torch.ones_like(kept))
    return scale.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype)


@register("gap")
class GaP(ScheduledPruning):
    """Cyclic GaP: one group of layers dense at a time, the rest sparse; groups rotate; ends sparse and fine-tunes.

    The sparsified layers are split into ``groups`` contiguous groups in parameter order, balanced by parameter
    count (or by ``partition``: a list of glob-pattern lists, one per group). ``groups`` left out is 4, or the
    number of sparsified layers when there are fewer. Step 0: every layer outside group 0 is pruned to the
    target per layer, by magnitude top-k (``init_mask="magnitude"``, the reference's default) or by a random
    mask drawn from the seed (``init_mask="random"``, its ``--retrain-mask-pattern random``); group 0 is dense.
    Every ``period`` the dense group is pruned back by magnitude top-k and the next group grows to dense (grown
    weights enter at 0 with zeroed optimizer state). After ``rounds`` full cycles every layer is sparse and
    training fine-tunes with fixed masks to the end.

    ``period`` in ``unit``; left out, the cycles fill the first 80% of the run. Phases are named 'grow0',
    'grow1', ... (group i dense) and 'sparse' (fine-tuning); the :class:`~sparsetrain.schedules.GroupCycles`
    schedule gives them, and the target sparsity of each: the exact fraction of zeros the masks then hold
    (every layer outside the dense group at its exact per-layer count).
    ``rescale_init`` (default on): the layers pruned at step 0 have the kept weights of each output unit
    multiplied so that the unit's weight norm equals its dense norm (``norm_preserving_scale``): for uncorrelated
    inputs each unit keeps its dense init's output variance whatever the mask (sparse-aware init, Evci et al.,
    AAAI 2022, whose fan-in factor overshoots after a magnitude top-k); later prunings leave the trained weights
    alone. Turn it off for a model that is not freshly initialised.
    Reference: Ma et al., "Effective model sparsification by scheduled grow-and-prune methods", ICLR 2022.
    Differences from the paper: the first group grows from a model pruned at initialization (the paper starts
    from a pruned or randomly masked model as well); layer sparsities are uniform (the paper's 'uniform' rows).
    """

    default_distribution = "uniform"
    capabilities = Capability.SPARSE | Capability.MASK_UPDATES | Capability.GROUP_PHASES

    def __init__(
        self,
        model: nn.Module,
        *,
        groups: int | None = None,
        rounds: int = 1,
        period: float | None = None,
        partition: Sequence[Sequence[str]] | None = None,
        init_mask: str = "magnitude",
        rescale_init: bool = True,
        **common: Any,
    ) -> None:
        if init_mask not in INIT_MASKS:
            raise ValueError(f"init_mask must be one of {', '.join(INIT_MASKS)}; got {init_mask!r}")
        self.groups, self.rounds, self.period, self.partition = groups, rounds, period, partition
        self.init_mask, self.rescale_init = init_mask, rescale_init
        self._dense_sq_norms: dict[str, Tensor] | None = None
        super().__init__(model, **common)

    def make_schedule(self) -> GroupCycles:
        self.group_names = self.partition_groups()
        return self.schedule_cycles(periods_per_round=len(self.group_names))

    def default_groups(self, layers: int) -> int:
        """The group count when ``groups`` is left out: 4, at most one group per sparsified layer."""
        return min(DEFAULT_GROUPS, layers)

    def partition_groups(self) -> list[list[str]]:
        """Contiguous groups of sparsified parameter names balanced by size (or the user's ``partition`` patterns)."""
        if self.distribution == "global":
            raise ValueError(f"{self.name} prunes each layer on its own; use distribution 'uniform' or 'erk'")
        names = list(self.params)
        if self.partition is not None:
            groups: list[list[str]] = []
            for patterns in self.partition:
                patterns = [patterns] if isinstance(patterns, str) else list(patterns)
                group = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
                if not group:
                    raise ValueError(f"gap partition group {patterns!r} matches no sparsified parameter: {names}")
                groups.append(group)
            flat = [n for g in groups for n in g]
            if sorted(flat) != sorted(names) or len(set(flat)) != len(flat):
                raise ValueError(
                    "gap partition must cover every sparsified parameter exactly once; "
                    f"covered {flat}, parameters {names}"
                )
            return groups
        count = self.default_groups(len(names)) if self.groups is None else self.groups
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(names):
            raise ValueError(
                f"groups must be an integer in [1, {len(names)}] (the sparsified layers), got {self.groups!r}"
            )
        sizes = [self.params[n].numel() for n in names]
        return [names[start:end] for start, end in balanced_partition(sizes, count)]

    def schedule_cycles(self, periods_per_round: int, offset: int = 0) -> GroupCycles:
        """The schedule: ``period_steps`` and ``fine_tune_start`` (rounds x periods fill the first 80% unless
        ``period`` is given), the first dense group ``offset``, and each phase's exact sparsity."""
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {self.rounds!r}")
        total = self.require_total_steps()
        if self.period is None:
            self.period_steps = max(1, int(0.8 * total) // (self.rounds * periods_per_round))
        else:
            self.period_steps = self.steps(self.period, "period")
        self.fine_tune_start = self.period_steps * self.rounds * periods_per_round
        if self.period_steps <= 0 or self.fine_tune_start > total:
            raise ValueError(
                f"{self.name} cycles do not fit: {self.rounds} rounds x {periods_per_round} periods x "
                f"{self.period_steps} steps = {self.fine_tune_start} steps > {total} steps of training"
            )
        # Every layer outside the dense group holds exactly its per-layer count of zeros (compute_masks).
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        per_layer = layer_sparsities(self.distribution, shapes, self.final_sparsity)
        zeros = {n: p.numel() - keep_count(p.numel(), per_layer[n]) for n, p in self.params.items()}
        total = sum(p.numel() for p in self.params.values())
        all_zeros = sum(zeros.values())
        group_sparsity = tuple((all_zeros - sum(zeros[n] for n in group)) / total for group in self.group_names)
        return GroupCycles(self.period_steps, self.fine_tune_start, group_sparsity, all_zeros / total, offset)

    def dense_group_at(self, step: int) -> int | None:
        """Index of the dense group at ``step``; None once fine-tuning has started."""
        return self.schedule.dense_group_at(step)

    def initial_masks(self) -> dict[str, Tensor]:
        """Step 0: every layer at the target by ``init_mask``, the step-0 dense group's layers all ones."""
        if self.rescale_init and not self.init_rescaled:
            self._dense_sq_norms = {n: unit_sq_norms(p) for n, p in self.params.items()}
        # Random scores come from (seed, step 0): the same draws on every rank and after a resume.
        pruned = self.compute_masks(self.final_sparsity, self.scores(self.init_mask, 0))
        group = self.dense_group_at(0)
        dense = set() if group is None else set(self.group_names[group])
        return {n: torch.ones_like(m) if n in dense else m for n, m in pruned.items()}

    @torch.no_grad()
    def rescale_kept_weights(self) -> None:
        """GaP's sparse-aware init: each unit's kept weights get its dense weight norm back (see the class doc)."""
        dense_sq_norms, self._dense_sq_norms = self._dense_sq_norms, None
        if self.init_rescaled or dense_sq_norms is None:
            super().rescale_kept_weights()  # already done (a no-op), or called by hand without step-0 norms
            return
        for name, param in self.params.items():
            param.mul_(norm_preserving_scale(param, dense_sq_norms[name]))
        self.init_rescaled = True
        self.emit({"event": "init_rescale"})

    def on_step(self, step: int) -> None:
        if step == 0:
            group = self.dense_group_at(0)
            self.set_masks(self.initial_masks(), reason="gap" if group is None else f"gap grow group {group}")
            return
        if not self.is_update_step(step):
            return
        group = self.dense_group_at(step)
        dense_names = set() if group is None else set(self.group_names[group])
        pruned = self.compute_masks(self.final_sparsity, self.magnitude_scores())
        masks = {}
        for name, mask in self.masks.items():
            if name in dense_names:
                masks[name] = torch.ones_like(mask)  # grows: pruned weights re-enter at 0
            elif not bool(mask.all()):
                masks[name] = mask  # sparse groups keep their masks
            else:
                masks[name] = pruned[name]  # the group that was dense is pruned back by magnitude
        self.set_masks(masks, reason="gap" if group is None else f"gap grow group {group}")
