"""What ``oto`` and ``variational`` share: whole zero-invariant groups that die during training, and a target.

Both methods make zeros by their own dynamics (HSPG's half-space projection, gates whose posterior falls to 0),
never more than the target allows. Until ``finish`` the masks *observe* the dead groups (a group whose
zero-invariant slices are all exactly zero, or whose gate is 0): observed masks are enforced (a dead group never
comes back), but they are not mask updates of a schedule: ``mask_version`` does not move and the target is 0.
At ``finish`` (default: the end of the run) the groups still alive beyond the target are pruned by the method's
group score, so the run ends with exactly the channel masks' count of pruned groups, and
:func:`sparsetrain.structured.slim` builds the smaller model with no fine-tuning.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import maskops
from ..core import Sparsifier
from ..core.sparsifier import CHANNEL
from ..structured.groups import ZERO_INVARIANT_ROLES


def group_sparsity_for_flops(model: nn.Module, sample: Tensor, remove: float, channel_multiple: int = 1) -> float:
    """The uniform group sparsity whose slim model has about ``1 - remove`` of the dense forward FLOPs.

    Bisection over the fraction of groups pruned in every channel set; FLOPs are counted on the slim model built
    on the meta device (shapes only), so only the kept counts matter, not which channels. With
    ``channel_multiple`` > 1 the kept counts are rounded as :func:`sparsetrain.maskops.channel_keep_count` rounds
    them, and the sparsity returned is the lowest whose rounded slim model removes at least ``remove``.

    Raises:
        ValueError: ``remove`` outside (0, 1), or a ``channel_multiple`` whose smallest model (every set at the
            multiple) still has more than ``1 - remove`` of the FLOPs.
    """
    from ..structured import apply_keep, groups

    if isinstance(remove, bool) or not isinstance(remove, (int, float)) or not 0 < remove < 1:
        raise ValueError(f"target_flops is the fraction of forward FLOPs to remove, in (0, 1); got {remove!r}")
    multiple = maskops.check_channel_multiple(channel_multiple)
    meta = copy.deepcopy(model).to("meta")
    meta_sample = torch.zeros(sample.shape, device="meta")
    zigs = groups(meta, meta_sample)

    def flops_left(s: float) -> float:
        keep = {c.name: list(range(maskops.channel_keep_count(c.width, s, multiple))) for c in zigs.sets}
        small = apply_keep(copy.deepcopy(meta), zigs, keep)
        return groups(small, meta_sample).dense_flops / zigs.dense_flops

    lo, hi = 0.0, 0.999
    if multiple > 1 and flops_left(hi) > 1 - remove:
        raise ValueError(
            f"target_flops {remove:g} cannot be met with channel_multiple {multiple}: with every channel set kept "
            f"at the multiple, {1 - flops_left(hi):.1%} of the forward FLOPs are removed; lower the multiple or "
            "the target"
        )
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_left(mid) > 1 - remove else (lo, mid)
    return hi


class GroupPruning(Sparsifier):
    """Base of methods whose groups die by the method's own dynamics, capped at the target; see the module doc."""

    # The trainer passes its example input to methods that set this (they find the groups on it).
    needs_example_input: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, finish: float | None = None, target_flops: float | None = None,
                 **common: Any) -> None:  # fmt: skip
        mask_type = common.pop("mask_type", CHANNEL)
        if mask_type == "unstructured":
            mask_type = CHANNEL  # the trainer's default mask type: this method knows only whole groups
        if mask_type != CHANNEL:
            raise ValueError(
                f"{self.name} prunes whole zero-invariant groups (mask_type 'channel'); N:M and other mask types "
                f"are not supported, got mask_type={mask_type!r}"
            )
        if common.get("example_input") is None:
            raise ValueError(
                f"{self.name} needs example_input= (an input batch, e.g. next(iter(loader))[0][:1]) to find the "
                "model's zero-invariant groups"
            )
        self.target_flops = target_flops
        if target_flops is not None:
            common["sparsity"] = group_sparsity_for_flops(
                model, common["example_input"], target_flops, common.get("channel_multiple", 1)
            )
        self.finish = finish
        # Counts changes of the observed dead groups; mask_version counts the prune to target (see masks_key).
        self.support_version = 0
        super().__init__(model, mask_type=CHANNEL, **common)

    # ------------------------------------------------------------------ schedule
    def setup(self) -> None:
        total = self.require_total_steps()
        self.finish_step = self.steps(self.finish, "finish", default_fraction=1.0)
        if not 0 <= self.finish_step <= total:
            raise ValueError(f"{self.name}: finish must lie within the run (0 to {total} steps), got {self.finish!r}")
        widths = [s.width for s in self.channel_groups.sets]
        s = self.final_sparsity
        if self.distribution == "uniform":
            multiple = self.channel_multiple
            self.max_dead: list[int] | int = [w - maskops.channel_keep_count(w, s, multiple) for w in widths]
        else:
            self.max_dead = sum(widths) - max(len(widths), maskops.keep_count(sum(widths), s))

    def pruned_at(self, step: int) -> bool:
        return step >= self.finish_step

    def target_sparsity_at(self, step: int) -> float:
        return self.final_sparsity if self.pruned_at(step) else 0.0

    def on_step(self, step: int) -> None:
        if step == self.finish_step:
            # Groups that died in the step just before the prune are dead too: observe them first, or the prune
            # (whose score counts the consumers' slices) may keep one of them and prune a live group instead, and
            # the optimizer keeps the dead one at zero: more groups gone than the target.
            dead = self.dead_groups(step)
            if dead is not None:
                self._observe(self._cap(dead))
            masks = self.compute_masks(self.final_sparsity, self.magnitude_scores(), among_active=True)
            self.set_masks(masks, reason=f"{self.name}: prune to target")
        elif not self.pruned_at(step):
            dead = self.dead_groups(step)
            if dead is not None:
                self._observe(self._cap(dead))

    def dead_groups(self, step: int) -> list[Tensor] | None:
        """Per channel set, the groups that died (a bool per channel), or None when nothing is observed now."""
        return None

    # ------------------------------------------------------------------ observed masks
    def zero_groups(self) -> list[Tensor]:
        """Per channel set, the groups whose zero-invariant parameter slices are all exactly zero."""
        out = []
        for channel_set in self.channel_groups.sets:
            rows = channel_set.channel_matrix(self.params, ZERO_INVARIANT_ROLES)
            alive = torch.zeros(channel_set.width, dtype=torch.bool)
            for row in rows:
                alive |= (row != 0).any(dim=1).cpu()
            out.append(~alive)
        return out

    def dead_priority(self) -> list[Tensor] | None:
        """Per channel set, a score per group: when more groups died than the target allows, the lowest go first."""
        return None

    def _ordered(self, candidates: Tensor, k: int, priority: list[Tensor] | None) -> Tensor:
        """Indices of the ``candidates`` of set ``k``: by :meth:`dead_priority` (lowest first), else by index."""
        index = candidates.nonzero().squeeze(1)
        if priority is not None and index.numel() > 1:
            index = index[torch.argsort(priority[k][index], stable=True)]
        return index

    def _cap(self, dead: list[Tensor]) -> list[Tensor]:
        """Never more dead groups than the target allows: already masked groups first, then by ``dead_priority``."""
        active = [self._active_groups(s) for s in self.channel_groups.sets]
        priority = self.dead_priority()
        out = []
        if isinstance(self.max_dead, list):
            for k, (d, a, cap) in enumerate(zip(dead, active, self.max_dead)):
                new = self._ordered(d & a, k, priority)[: max(0, cap - int((~a).sum()))]
                mark = ~a
                mark[new] = True
                out.append(mark)
            return out
        room = self.max_dead - sum(int((~a).sum()) for a in active)
        for k, (d, a) in enumerate(zip(dead, active)):
            new = d & a
            order = self._ordered(new, k, priority)
            if int(a.sum()) - int(new.sum()) < 1:  # every set keeps a group: the last in the order
                order = order[:-1]
            take = order[: max(0, room)]
            room -= take.numel()
            mark = ~a
            mark[take] = True
            out.append(mark)
        return out

    @torch.no_grad()
    def _observe(self, dead: list[Tensor]) -> None:
        masks = {n: torch.ones_like(m) for n, m in self.masks.items()}
        for channel_set, gone in zip(self.channel_groups.sets, dead):
            pruned = gone.nonzero().squeeze(1)
            if not pruned.numel():
                continue
            for member in channel_set.members:
                if member.buffer:
                    continue
                index = (pruned[:, None] * member.block + torch.arange(member.block)).reshape(-1)
                masks[member.name].index_fill_(member.dim, index.to(masks[member.name].device), False)
        if all(torch.equal(masks[n], self.masks[n]) for n in masks):
            return
        self.masks = masks
        self.support_version += 1
        self._refresh_enforced_masks()
        self._apply_masks()
        if self._optimizer is not None:
            self._zero_state_where_masked(self._optimizer)

    def masks_key(self) -> tuple[int, int]:
        return self.mask_version, self.support_version

    def extra_state(self) -> dict:
        return {"support_version": self.support_version}

    def load_extra_state(self, state: dict) -> None:
        self.support_version = int(state.get("support_version", 0))
