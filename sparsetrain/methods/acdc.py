"""AC/DC: Alternating Compressed/DeCompressed training (Peste et al., NeurIPS 2021, arXiv 2106.12379)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from .. import maskops
from ..core import Capability, ScheduledPruning, register
from ..schedules import Cyclic, Phase, acdc_phases

logger = logging.getLogger(__name__)


@register("acdc")
class ACDC(ScheduledPruning):
    """AC/DC: dense warm-up, then alternating sparse and dense phases, ending sparse; yields a sparse-dense pair.

    Algorithm:
      1. Dense warm-up for ``warmup``.
      2. Cycles of a compressed phase (``compressed`` long) and a decompressed phase (``decompressed`` long)
         while a whole cycle fits before the final compressed phase; the last decompressed phase absorbs the rest.
      3. A final compressed phase of length ``final`` ends the run.
      At each compressed start the mask is re-chosen by magnitude top-k from *all* weights of the just
      trained dense model (global by default); inside the phase the mask is fixed, gradients of masked
      weights are zeroed and masked weights are re-zeroed after every step. At each decompressed start all
      masks become ones: pruned weights re-enter at 0 and momentum buffers are reset (``reset_momentum``).

    ``reset_momentum``: 'all' (default, as the official code: every parameter's momentum buffer, biases and
    batch norm included), 'sparsified' (only the sparsified weights' buffers) or False (none); True means 'all'.
    Only first moments are reset. Second moments (Adam's ``exp_avg_sq``, ...; ``optim_state.SECOND_MOMENT_KEYS``)
    of the weights a compression prunes are recorded then and given back when they re-enter, so a re-entering
    weight takes an ordinary first step, not (1 - beta1) / sqrt(1 - beta2) = 3.16 lr as with zeroed ones.

    Lengths are in ``unit``: 'fraction' of training (the default), 'epochs' (with steps_per_epoch) or 'steps'.
    A length left out is the official 100-epoch ImageNet proportion of the run, whatever the unit:
    warm-up 10%, compressed 5%, decompressed 5%, final 15%. The official
    ImageNet timeline is ``unit='epochs', warmup=10, compressed=5, decompressed=5, final=15`` over 100 epochs.

    Each compressed start records in ``history`` the relative mask difference (%) against the previous
    compressed phase's mask. Events 'phase_end' (sent before the masks change) and 'phase_start' tell a
    trainer when to evaluate and keep the best dense model.

    With ``mask_type='channel'`` (whole zero-invariant groups, :mod:`sparsetrain.structured`) the pruned groups
    re-enter a decompressed phase with the values they had when pruned, not at 0: a group that is zero as a whole
    is a stationary point (ReLU'(0) = 0 and a zero batch-norm scale pass no gradient to any of its weights), so
    at 0 every pruned channel would stay dead through the dense phase. The values are part of ``state_dict``.

    Differences from the official code: exact top-k counts (the reference's strict '>' threshold keeps k-1
    weights); gradients of masked weights are zeroed before the step, so no momentum leaks into them; and the
    mask difference is corrected for changes in sparsity. (The official code trains with SGD; with Adam-like
    optimizers the kept second moments are ours.)

    Built on the :class:`~sparsetrain.schedules.Cyclic` schedule of ``acdc_phases`` and the magnitude score; the
    method itself is only what happens at a phase start: the compression's mask difference, the
    decompression's momentum reset.
    """

    capabilities = (
        Capability.SPARSE | Capability.MASK_UPDATES | Capability.PHASES | Capability.NM | Capability.CHANNEL
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        warmup: float | None = None,
        compressed: float | None = None,
        decompressed: float | None = None,
        final: float | None = None,
        reset_momentum: str | bool = "all",
        **common: Any,
    ) -> None:
        self.warmup, self.compressed, self.decompressed, self.final = warmup, compressed, decompressed, final
        if reset_momentum is True:  # the former boolean option: True reset momentum, now for every parameter
            reset_momentum = "all"
        if reset_momentum not in ("all", "sparsified", False):
            raise ValueError(
                f"acdc: reset_momentum must be 'all', 'sparsified' or false (true means 'all'); got {reset_momentum!r}"
            )
        self.reset_momentum: str | bool = reset_momentum
        # The previous compressed phase's masks, packed 8 to a byte: they only feed the mask-difference statistic.
        self._last_sparse_masks: dict[str, Tensor] | None = None
        self._pruned_values: dict[str, Tensor] | None = None  # channel masks: what the pruned groups held
        super().__init__(model, **common)

    def make_schedule(self) -> Cyclic:
        total = self.require_total_steps()
        self.phases: list[Phase] = acdc_phases(
            total,
            warmup=self.steps(self.warmup, "warmup", default_fraction=0.1),
            compressed=self.steps(self.compressed, "compressed", default_fraction=0.05),
            decompressed=self.steps(self.decompressed, "decompressed", default_fraction=0.05),
            final=self.steps(self.final, "final", default_fraction=0.15),
        )
        if sum(phase.kind == "sparse" for phase in self.phases) < 2:
            # One compressed phase and nothing after it is one-shot pruning with fine-tuning, not AC/DC: no
            # alternation, no dense twin. Said in one line, with the fix, rather than refused: a user may want it.
            lengths = ", ".join(f"{p.kind} {p.start}-{p.end}" for p in self.phases)
            logger.warning(
                "acdc: the run of %d steps has no decompressed phase after a compression (%s), so it is one-shot "
                "pruning with fine-tuning and yields no dense twin; train longer or give the phase lengths as "
                "fractions of the run (method_options unit: fraction, e.g. warmup 0.1, compressed 0.1, "
                "decompressed 0.1, final 0.2)",
                total,
                lengths,
            )
        return Cyclic(tuple(self.phases), self.final_sparsity)

    def update_masks(self, step: int) -> None:
        if self.phase_at(step) == "sparse":
            self._compress(step)
        else:
            pruned = {n: ~m for n, m in self.masks.items()}
            self.densify("decompress", reset_optimizer_momentum=self.reset_momentum)
            if self._pruned_values is not None:
                with torch.no_grad():
                    for name, values in self._pruned_values.items():
                        param = self.params[name]
                        param.copy_(torch.where(pruned[name], values.to(param.device, param.dtype), param))
                self._pruned_values = None

    def _compress(self, step: int) -> None:
        masks = self.masks_at(step)
        if self.channel_groups is not None:
            self._pruned_values = {n: p.detach().clone() for n, p in self.params.items()}
        packed = {n: maskops.pack_mask(m) for n, m in masks.items()}
        difference = None
        if self._last_sparse_masks is not None:
            # Sharded (FSDP2): each rank counts its rows; the counts are summed over the ranks.
            counts = self.sum_over_ranks(maskops.packed_mask_counts(self._last_sparse_masks, packed))
            difference = 100.0 * maskops.packed_relative_mask_difference(counts=counts)
        self._last_sparse_masks = packed
        self.set_masks(masks, reason="compress")
        self.emit({"event": "compress", "mask_difference_pct": difference})

    def extra_state(self) -> dict:
        return {"last_sparse_masks": self._last_sparse_masks, "pruned_values": self._pruned_values}

    def load_extra_state(self, state: dict) -> None:
        masks = state.get("last_sparse_masks")
        # Checkpoints written before the masks were packed hold them as boolean tensors: pack those.
        self._last_sparse_masks = None if masks is None else {
            n: maskops.pack_mask(m) if m.dtype == torch.bool else m.clone() for n, m in masks.items()
        }
        values = state.get("pruned_values")
        self._pruned_values = None if values is None else {n: v.clone() for n, v in values.items()}
