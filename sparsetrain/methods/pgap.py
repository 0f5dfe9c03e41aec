"""Parallel GaP: k workers each grow a different group, merged and pruned every period (Ma et al. 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core import Capability, register
from ..optim_state import reset_momentum
from ..schedules import GroupCycles
from .gap import GaP


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@register("pgap")
class ParallelGaP(GaP):
    """Parallel GaP: with k data-parallel ranks, rank i trains its own replica with group (i + r) mod k dense.

    Each round lasts ``period``; the replicas train without gradient all-reduce (``synchronize_gradients`` is
    False, and the trainer runs backward under DDP's ``no_sync``). At the end of a round the replicas are merged:
    every group's weights come from the rank that grew it (a broadcast), all other parameters are averaged,
    momentum is reset, and every layer is pruned to the target by per-layer magnitude top-k, identically on all
    ranks: right after a merge every layer is at the target on every rank, with the same values everywhere.
    The next round then grows each rank's next group from that pruned state (the weights pruned at the merge
    re-enter at 0). After ``rounds`` rounds training fine-tunes the merged sparse model with fixed masks,
    data-parallel as usual. ``groups`` defaults to the number of ranks (one group per worker); in one process it
    is cyclic GaP with one dense group per round, 2 groups by default (1 for a one-layer model). Groups are
    balanced by parameter count; ``init_mask`` and ``rescale_init`` are GaP's: the step-0 mask by magnitude or
    at random, and each pruned unit's kept weights scaled back to the unit's dense weight norm.

    Reference: Ma et al., "Effective model sparsification by scheduled grow-and-prune methods", ICLR 2022,
    arXiv 2106.09857 (parallel GaP, section 3.2).
    Differences from the paper: non-group parameters (biases, norms) are averaged at the merge; optimizer
    momentum restarts from zero after each merge.
    """

    shardable = False  # see Sparsifier.shardable
    capabilities = GaP.capabilities | Capability.REPLICA_PHASES

    def __init__(self, model: nn.Module, *, groups: int | None = None, rounds: int = 2, period: float | None = None,
                 **common: Any) -> None:  # fmt: skip
        rank, world = _world()
        self.rank, self.world = rank, world
        super().__init__(model, groups=groups, rounds=rounds, period=period, **common)

    def default_groups(self, layers: int) -> int:
        """One group per rank; in one process 2 (at most one per sparsified layer)."""
        return self.world if self.world > 1 else min(2, layers)

    def make_schedule(self) -> GroupCycles:
        self.group_names = self.partition_groups()
        if self.world > 1 and len(self.group_names) != self.world:
            raise ValueError(
                f"pgap grows one group per rank: groups must equal the number of processes ({self.world}), "
                f"got {len(self.group_names)}"
            )
        # Rank i grows group (i + round) mod k: GaP's rotation, one period per round, offset by the rank.
        return self.schedule_cycles(periods_per_round=1, offset=self.rank)

    def synchronize_gradients(self) -> bool:
        """False while replicas train apart (the rounds); True while fine-tuning the merged model."""
        return self.world == 1 or self.count >= self.fine_tune_start

    @torch.no_grad()
    def on_step(self, step: int) -> None:
        if step == 0:
            self.set_masks(self.initial_masks(), reason=f"pgap grow group {self.dense_group_at(0)}")
            return
        if not self.is_update_step(step):
            return
        self._merge(step)
        # Every layer to the target, the group this rank grows next included: the merged weights are the same on
        # every rank, so are these masks. Without this the next grower would keep the dense weights its previous
        # grower broadcast, and a group would stay dense for all the rounds.
        self.set_masks(self.compute_masks(self.final_sparsity, self.magnitude_scores()), reason="pgap merge")
        group = self.dense_group_at(step)
        if group is not None:
            grown = set(self.group_names[group])
            # The next round regrows its group from the pruned state: the weights pruned above re-enter at 0.
            masks = {n: torch.ones_like(m) if n in grown else m for n, m in self.masks.items()}
            self.set_masks(masks, reason=f"pgap grow group {group}")

    def _merge(self, step: int) -> None:
        """Replicas -> one model: each group from the rank that grew it in the round just ended; the rest averaged."""
        if self.world == 1:
            return
        k = len(self.group_names)
        owner_of = {}
        round_index = (step - 1) // self.period_steps
        for rank in range(self.world):
            for name in self.group_names[(rank + round_index) % k]:
                owner_of[name] = rank
        for name, param in self.model.named_parameters():
            if name in owner_of:
                dist.broadcast(param.data, src=owner_of[name])
            else:
                dist.all_reduce(param.data)
                param.data.div_(self.world)
        if self._optimizer is not None:
            reset_momentum(self._optimizer)
