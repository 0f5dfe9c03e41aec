"""GaP: scheduled grow-and-prune, cyclic variant (Ma et al. 2021, arXiv 2106.09857)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core import Sparsifier, register


@register("gap")
class GaP(Sparsifier):
    """Cyclic GaP: one group of layers dense at a time, the rest sparse; groups rotate; ends sparse and fine-tunes.

    The sparsified layers are split into ``groups`` contiguous groups by parameter order (or by ``partition``: a
    list of glob-pattern lists, one per group). Step 0: every layer outside group 0 is pruned to the target by
    per-layer magnitude top-k; group 0 is dense. Every ``period`` the dense group is pruned back by magnitude
    top-k and the next group grows to dense (grown weights enter at 0 with zeroed optimizer state). After
    ``rounds`` full cycles every layer is sparse and training fine-tunes with fixed masks to the end.

    ``period`` in ``unit``; left out, the cycles fill the first 80% of the run. Phases are named 'grow0',
    'grow1', ... (group i dense) and 'sparse' (fine-tuning).
    ``rescale_init`` (default on): the layers pruned at step 0 have their kept weights multiplied by
    sqrt(fan_in / active fan-in) of their output unit (sparse-aware init, Evci et al., AAAI 2022), so the
    model starts at the dense init's signal scale; later prunings leave the trained weights alone. Turn it off
    for a model that is not freshly initialised.
    Reference: Ma et al., "Effective model sparsification by scheduled grow-and-prune methods", ICLR 2022.
    Differences from the paper: the first group grows from a model pruned at initialization (the paper starts
    from a pruned or randomly masked model as well); layer sparsities are uniform (the paper's 'uniform' rows).
    """

    default_distribution = "uniform"
    capabilities = frozenset({"sparse", "mask_updates", "group_phases"})

    def __init__(
        self,
        model: nn.Module,
        *,
        groups: int = 4,
        rounds: int = 1,
        period: float | None = None,
        partition: Sequence[Sequence[str]] | None = None,
        rescale_init: bool = True,
        **common: Any,
    ) -> None:
        self.groups, self.rounds, self.period, self.partition = groups, rounds, period, partition
        self.rescale_init = rescale_init
        super().__init__(model, **common)

    def setup(self) -> None:
        self.group_names = self.partition_groups()
        self.schedule_cycles(periods_per_round=len(self.group_names))

    def partition_groups(self) -> list[list[str]]:
        """Contiguous groups of sparsified parameter names (or the user's ``partition`` patterns)."""
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
        else:
            if not isinstance(self.groups, int) or not 1 <= self.groups <= len(names):
                raise ValueError(
                    f"groups must be an integer in [1, {len(names)}] (the sparsified layers), got {self.groups!r}"
                )
            size, extra = divmod(len(names), self.groups)
            groups, start = [], 0
            for i in range(self.groups):
                end = start + size + (1 if i < extra else 0)
                groups.append(names[start:end])
                start = end
        return groups

    def schedule_cycles(self, periods_per_round: int) -> None:
        """``period_steps`` and ``fine_tune_start``: rounds x periods fill the first 80% unless ``period`` is given."""
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

    def dense_group_at(self, step: int) -> int | None:
        """Index of the dense group at ``step``; None once fine-tuning has started."""
        if step >= self.fine_tune_start:
            return None
        return (step // self.period_steps) % len(self.group_names)

    def phase_at(self, step: int) -> str:
        group = self.dense_group_at(step)
        return "sparse" if group is None else f"grow{group}"

    def target_sparsity_at(self, step: int) -> float:
        group = self.dense_group_at(step)
        if group is None:
            return self.final_sparsity
        dense = sum(self.params[n].numel() for n in self.group_names[group])
        total = sum(p.numel() for p in self.params.values())
        return self.final_sparsity * (1 - dense / total)  # approximate: uniform/erk per-layer rounding aside

    def on_step(self, step: int) -> None:
        if step != 0 and step % self.period_steps != 0:
            return
        if step > self.fine_tune_start:
            return
        group = self.dense_group_at(step)
        dense_names = set() if group is None else set(self.group_names[group])
        pruned = self.compute_masks(self.final_sparsity, self.magnitude_scores())
        masks = {}
        for name, mask in self.masks.items():
            if name in dense_names:
                masks[name] = torch.ones_like(mask)  # grows: pruned weights re-enter at 0
            elif step == 0 or not bool(mask.all()):
                masks[name] = mask if step > 0 else pruned[name]  # sparse groups keep their masks
            else:
                masks[name] = pruned[name]  # the group that was dense is pruned back by magnitude
        self.set_masks(masks, reason="gap" if group is None else f"gap grow group {group}")
