"""AC/DC: Alternating Compressed/DeCompressed training (Peste et al., NeurIPS 2021, arXiv 2106.12379)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import maskops
from ..core import Capability, ScheduledPruning, register
from ..optim_state import reset_momentum as reset_first_moments
from ..schedules import Cyclic, Phase, acdc_phases

logger = logging.getLogger(__name__)

DEAD_UNITS = ("zero", "reinit", "revive")
ACDC_SCORES = ("magnitude", "normalized", "taylor")
FINAL_FROM = ("dense", "sparse")
DECAY_PHASES = ("all", "final")
REINIT_SCALE = 0.1  # dead_units='reinit': a tenth of the default init, small beside the surviving trained weights


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

    ``cycles`` (default None, the paper: as many as fit) caps the number of compressed/decompressed cycles before
    the final phase; the last decompressed phase then absorbs the rest of the run, so fewer compressions buy a
    longer dense phase before the twin is taken (e.g. 30 epochs, 3-epoch phases, ``cycles=2``: W 0-3, C 3-6,
    D 6-9, C 9-12, D 12-24, final 24-30).

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

    Study options (issue-tracked variants; every default is the paper's behaviour):

    - ``dead_units``: what a decompression does to units (rows of a weight: an output unit or filter) whose
      incoming weights the compression pruned all of. 'zero' (the paper): they re-enter at 0 like every pruned
      weight, and behind a ReLU such a unit gets no gradient, so it can stay dead through the dense phase.
      'reinit': those rows get a fresh draw of PyTorch's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times
      0.1 (seeded by (seed, step)). 'revive': those rows get back the values they had just before the compression.
      Rows with any kept weight are untouched (their pruned weights re-enter at 0).
    - ``layer_floor``: every layer keeps at least ``ceil(layer_floor * numel)`` weights (its highest-scored ones)
      in the global ranking; the rest of the budget is ranked globally as before. 0 (the paper) is no floor.
      Global distribution and unstructured masks only.
    - ``layer_ceiling``: every layer keeps at most ``ceil(layer_ceiling * numel)`` weights in the global ranking
      (its highest-scored ones compete, the rest rank below every other weight), so a small layer the global
      magnitude ranking favours (the classifier, ~45% dense at 98% on LeNet-300-100) gives its share to the
      others. 1 (the paper) is no ceiling. Global distribution and unstructured masks only; at least
      ``layer_floor``; the ceilings must hold the target sparsity's budget. A compression below the target (a
      ramp's first ones) that keeps more weights than the ceilings allow fills the rest with the highest-scored
      weights past them.
    - ``ramp``: the first ``ramp`` compressed phases ramp linearly from half the target sparsity to it (ramp=3:
      0.5 s, 0.75 s, s); the final compressed phase is always at s. 0 or 1 (the paper): every one at s.
    - ``ramp_start``: the fraction of s that ``ramp`` and ``inphase_ramp`` start from (0.5 above), as GMP's ramp
      starts from an initial sparsity (Zhu & Gupta 2017): ramp=2, ramp_start=0.8 puts the first compressed phase
      at 0.8 s and every later one at s. Only with ``ramp`` or ``inphase_ramp`` >= 2; 0.5 is the ramps' default
      (the paper has no ramp).
    - ``inphase_ramp``: the first compressed phase reaches s inside itself, in ``inphase_ramp`` = k mask updates
      at its start and after each k-th of it, at 0.5 s rising linearly to s (k=4: 0.5 s, 0.667 s, 0.833 s, s; the
      masks fixed in between, each update pruning among the weights still kept); later phases are the paper's.
      0 or 1 (the paper): the whole first compressed phase at s. Unstructured masks only; not with ``ramp``.
      With ``dead_units`` 'revive', a row an in-phase update empties gets back its values from just before it.
    - ``score``: what the compression ranks. 'magnitude' (the paper): |w|. 'normalized': |w| divided by its layer's
      root-mean-square |w|, so the global ranking compares weights against their own layer's scale. 'taylor':
      |w * dL/dw| summed over the steps of the last dense phase (first-order Taylor estimate of the loss change,
      Molchanov et al. 2019), read before each optimizer step (|w| where no dense step was seen, e.g. no warm-up).
      Unstructured and N:M masks only.
    - ``final_from``: what the final compressed phase starts from. 'dense' (the paper): the last decompressed
      phase's weights, compressed anew. 'sparse': the sparse model as the compressed phase before it ended, its
      masks and every weight (biases and batch norm's parameters and buffers too, so it continues one
      trajectory), first moments reset as at a decompression (``reset_momentum``); the last decompressed phase is
      then a dense branch that only yields the twin. Holds the kept values of the sparsified weights (float32:
      4 (1 - s) bytes per weight) and a copy of the other parameters and buffers through the last decompressed
      phase. Not with ``reset_momentum=False``, a ramp that leaves that phase below s, or FSDP-sharded parameters.
    - ``decay``: a compression fades the weights it removes instead of zeroing them at once (the decaying pruned
      mask of Kao et al., "Training Recipe for N:M Structured Sparsity with Decaying Pruned Mask", 2022). The kept
      set is chosen at the compression as in the paper and fixed; for the first ``floor(decay * L)`` = W steps of
      the compressed phase (L steps long) the removed weights stay in the mask and train, and after the i-th step
      they are multiplied by (W - i) / (W - i + 1), so that apart from their updates they follow the factor
      1 - i / W down to 0; at step W the masks become the chosen top-k (the removed weights exactly 0, their first
      moments zeroed, as at the paper's compression). Until then the masks, the reported sparsity and the training
      FLOPs count the fading weights as kept. 0 (the paper): removed at once. A fraction in [0, 1); W >= 1 step.
      Their momentum is left as it is during the window (they train like kept weights; it is zeroed at its end).
      Unstructured masks only; not with ``inphase_ramp``, ``final_from='sparse'`` or FSDP-sharded parameters.
    - ``decay_phases``: which compressions fade their removed weights: 'all' (default) or only the 'final' one.

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
        cycles: int | None = None,
        reset_momentum: str | bool = "all",
        dead_units: str = "zero",
        layer_floor: float = 0.0,
        layer_ceiling: float = 1.0,
        ramp: int = 0,
        inphase_ramp: int = 0,
        score: str = "magnitude",
        ramp_start: float = 0.5,
        final_from: str = "dense",
        decay: float = 0.0,
        decay_phases: str = "all",
        **common: Any,
    ) -> None:
        if dead_units not in DEAD_UNITS:
            raise ValueError(f"acdc: dead_units must be one of {', '.join(DEAD_UNITS)}; got {dead_units!r}")
        if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1):
            raise ValueError(
                f"acdc: cycles must be a number of compressed/decompressed cycles >= 1 (or null: as many as fit); "
                f"got {cycles!r}"
            )
        self.cycles = cycles
        if isinstance(layer_floor, bool) or not isinstance(layer_floor, (int, float)) or not 0 <= layer_floor < 1:
            raise ValueError(f"acdc: layer_floor must be a density in [0, 1), e.g. 0.02; got {layer_floor!r}")
        if isinstance(layer_ceiling, bool) or not isinstance(layer_ceiling, (int, float)) or not 0 < layer_ceiling <= 1:
            raise ValueError(f"acdc: layer_ceiling must be a density in (0, 1], e.g. 0.1; got {layer_ceiling!r}")
        if layer_ceiling < layer_floor:
            raise ValueError(
                f"acdc: layer_ceiling={layer_ceiling:g} is below layer_floor={layer_floor:g}; a layer cannot keep at "
                "most fewer weights than it keeps at least"
            )
        if isinstance(ramp, bool) or not isinstance(ramp, int) or ramp < 0:
            raise ValueError(f"acdc: ramp must be a number of compressed phases >= 0 (0: no ramp); got {ramp!r}")
        if isinstance(inphase_ramp, bool) or not isinstance(inphase_ramp, int) or inphase_ramp < 0:
            raise ValueError(
                f"acdc: inphase_ramp must be a number of mask updates in the first compressed phase >= 0 (0: no "
                f"ramp); got {inphase_ramp!r}"
            )
        if isinstance(ramp_start, bool) or not isinstance(ramp_start, (int, float)) or not 0 < ramp_start < 1:
            raise ValueError(
                f"acdc: ramp_start must be a fraction of the sparsity in (0, 1), e.g. 0.8; got {ramp_start!r}"
            )
        if ramp_start != 0.5 and ramp < 2 and inphase_ramp < 2:
            raise ValueError(
                f"acdc: ramp_start={ramp_start:g} is where a ramp starts; give ramp or inphase_ramp >= 2 with it"
            )
        if score not in ACDC_SCORES:
            raise ValueError(f"acdc: score must be one of {', '.join(ACDC_SCORES)}; got {score!r}")
        if final_from not in FINAL_FROM:
            raise ValueError(f"acdc: final_from must be one of {', '.join(FINAL_FROM)}; got {final_from!r}")
        if final_from == "sparse" and reset_momentum is False:
            raise ValueError(
                "acdc: final_from='sparse' puts the weights back to the previous compressed phase's, where the last "
                "dense phase's momentum does not belong; give reset_momentum 'all' or 'sparsified' with it"
            )
        mask_type = common.get("mask_type", "unstructured")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(
                f"acdc: decay must be the fraction of each compressed phase over which the removed weights fade, in "
                f"[0, 1) (0: removed at once, the paper), e.g. 0.3; got {decay!r}"
            )
        if decay_phases not in DECAY_PHASES:
            raise ValueError(f"acdc: decay_phases must be one of {', '.join(DECAY_PHASES)}; got {decay_phases!r}")
        if decay_phases != "all" and not decay:
            raise ValueError(
                f"acdc: decay_phases={decay_phases!r} says which compressions fade; give decay > 0 with it"
            )
        if decay and (inphase_ramp > 1 or final_from != "dense" or mask_type != "unstructured"):
            raise ValueError(
                f"acdc: decay is for unstructured masks, without inphase_ramp or final_from='sparse'; got "
                f"mask_type={mask_type!r}, inphase_ramp={inphase_ramp}, final_from={final_from!r}"
            )
        if inphase_ramp > 1 and ramp > 1:
            raise ValueError(
                f"acdc: ramp={ramp} (across compressed phases) and inphase_ramp={inphase_ramp} (inside the first one) "
                "are alternatives; give one of them"
            )
        if inphase_ramp > 1 and mask_type != "unstructured":
            raise ValueError(f"acdc: inphase_ramp is for unstructured masks; got mask_type={mask_type!r}")
        ceiling = layer_ceiling < 1
        if mask_type == "channel" and (dead_units != "zero" or layer_floor or ceiling or score != "magnitude"):
            raise ValueError(
                "acdc: dead_units, layer_floor, layer_ceiling and score are for unstructured masks; "
                "mask_type='channel' already gives pruned groups back their values at a decompression"
            )
        distribution = common.get("distribution") or "global"
        if (layer_floor or ceiling) and (mask_type != "unstructured" or distribution != "global"):
            raise ValueError(
                "acdc: layer_floor and layer_ceiling apply to the global ranking of unstructured masks only"
            )
        self.dead_units, self.layer_floor, self.ramp, self.score = dead_units, float(layer_floor), ramp, score
        self.layer_ceiling = float(layer_ceiling)
        self.inphase_ramp, self.ramp_start, self.final_from = inphase_ramp, float(ramp_start), final_from
        self.decay, self.decay_phases = float(decay), decay_phases
        # final_from='sparse': the sparse model at the last decompression (kept values of the sparsified weights,
        # copies of the other parameters and buffers), put back at the final compression.
        self._sparse_snapshot: dict[str, dict[str, Tensor]] | None = None
        self._taylor: dict[str, Tensor] | None = None  # score='taylor': |w * grad| summed over the dense phase
        self._dead_rows: dict[str, tuple[Tensor, Tensor]] | None = None  # dead_units: row indices, their values
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
        study = dead_units != "zero" or layer_floor or ceiling or score == "taylor" or final_from != "dense" or decay
        if self.sharded and study:
            raise ValueError(
                "acdc: dead_units, layer_floor, layer_ceiling, score='taylor', final_from='sparse' and decay do not "
                "support FSDP-sharded parameters"
            )

    def setup(self) -> None:
        # ``score`` names AC/DC's own selection scores (checked in __init__), not only the Sparsifier's kinds.
        self.schedule = self.make_schedule()
        if self._resume_step is not None:
            below = self.target_sparsity_at(self._snapshot_step - 1)
            if below != self.final_sparsity:
                raise ValueError(
                    f"acdc: final_from='sparse' resumes the compressed phase before the final one, which "
                    f"ramp={self.ramp} leaves at sparsity {below:g}, below {self.final_sparsity:g}; give a shorter ramp"
                )

    def make_schedule(self) -> Cyclic:
        total = self.require_total_steps()
        self.phases: list[Phase] = acdc_phases(
            total,
            warmup=self.steps(self.warmup, "warmup", default_fraction=0.1),
            compressed=self.steps(self.compressed, "compressed", default_fraction=0.05),
            decompressed=self.steps(self.decompressed, "decompressed", default_fraction=0.05),
            final=self.steps(self.final, "final", default_fraction=0.15),
            cycles=self.cycles,
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
        self._sparse_starts = [p.start for p in self.phases if p.kind == "sparse"]
        # inphase_ramp: the first compressed phase's update steps (its start included), each k-th of it.
        self._inphase_steps: list[int] = []
        self._inphase_end = 0
        if self.inphase_ramp > 1:
            first = next(p for p in self.phases if p.kind == "sparse")
            length = first.end - first.start
            if length < self.inphase_ramp:
                raise ValueError(
                    f"acdc: inphase_ramp={self.inphase_ramp} needs a first compressed phase of at least "
                    f"{self.inphase_ramp} steps; it has {length}"
                )
            self._inphase_steps = [first.start + j * length // self.inphase_ramp for j in range(self.inphase_ramp)]
            self._inphase_end = first.end
        # decay: each fading compression's start -> the step its window ends (the chosen masks installed).
        self._decay_windows: dict[int, int] = {}
        if self.decay:
            sparse = [p for p in self.phases if p.kind == "sparse"]
            for phase in sparse if self.decay_phases == "all" else sparse[-1:]:
                window = math.floor(self.decay * (phase.end - phase.start))
                if window < 1:
                    raise ValueError(
                        f"acdc: decay={self.decay:g} of a compressed phase of {phase.end - phase.start} steps is no "
                        f"step; give at least {1 / (phase.end - phase.start):.3g}"
                    )
                self._decay_windows[phase.start] = phase.start + window
        sizes = [p.numel() for p in self.params.values()]
        budget = maskops.keep_count(sum(sizes), self.final_sparsity)  # the weights the target sparsity keeps
        if sum(math.ceil(self.layer_floor * n) for n in sizes) > budget:
            raise ValueError(
                f"acdc: layer_floor={self.layer_floor:g} keeps more weights than sparsity {self.final_sparsity:g} "
                "allows; lower the floor"
            )
        capacity = sum(math.ceil(self.layer_ceiling * n) for n in sizes)
        if capacity < budget:
            raise ValueError(
                f"acdc: layer_ceiling={self.layer_ceiling:g} lets the layers keep {capacity} weights in all, fewer "
                f"than sparsity {self.final_sparsity:g} keeps ({budget}); raise the ceiling"
            )
        # final_from='sparse': the snapshot is taken where the last decompressed phase starts (the previous
        # compressed phase's end), put back where the final compressed phase starts.
        self._snapshot_step = self._resume_step = None
        if self.final_from == "sparse":
            sparse = [p for p in self.phases if p.kind == "sparse"]
            if len(sparse) < 2:
                raise ValueError(
                    f"acdc: final_from='sparse' resumes the compressed phase before the final one; this run of "
                    f"{total} steps has only one compressed phase"
                )
            self._snapshot_step, self._resume_step = sparse[-2].end, sparse[-1].start
        return Cyclic(tuple(self.phases), self.final_sparsity)

    def target_sparsity_at(self, step: int) -> float:
        """The schedule's sparsity; with ``ramp`` = k, the i-th of the first k compressed phases (from 0) runs at
        s * (r + (1 - r) i / (k - 1)), r = ``ramp_start`` (0.5); the final compressed phase is always at s. With
        ``inphase_ramp`` = k, the first compressed phase runs at s * (r + (1 - r) j / (k - 1)) from its j-th update
        (from 0) to the next."""
        sparsity = self.schedule.sparsity_at(step)
        if self._inphase_steps and sparsity and self._inphase_steps[0] <= step < self._inphase_end:
            j = sum(t <= step for t in self._inphase_steps) - 1
            return sparsity * (self.ramp_start + (1 - self.ramp_start) * j / (self.inphase_ramp - 1))
        if self.ramp < 2 or sparsity == 0:
            return sparsity
        index = sum(start <= step for start in self._sparse_starts) - 1
        if index >= self.ramp - 1 or index == len(self._sparse_starts) - 1:
            return sparsity
        return sparsity * (self.ramp_start + (1 - self.ramp_start) * index / (self.ramp - 1))

    def is_update_step(self, step: int) -> bool:
        ends = self._decay_windows.values()
        return self.schedule.is_update_step(step) or step in self._inphase_steps or step in ends

    def on_step(self, step: int) -> None:
        if step in self._inphase_steps[1:]:
            self._inphase_update(step)
        elif (window := self._decay_window_at(step)) is not None:
            self._fade(step, *window)
        else:
            super().on_step(step)

    def _decay_window_at(self, step: int) -> tuple[int, int] | None:
        """``decay``: the (start, end) of the fading window that ``step`` ends a step of, start < step <= end."""
        for start, end in self._decay_windows.items():
            if start < step <= end:
                return start, end
        return None

    @torch.no_grad()
    def _fade(self, step: int, start: int, end: int) -> None:
        """``decay``: scale the weights the compression at ``start`` removes (kept by the current masks, outside
        the chosen ones, ``_last_sparse_masks``) from the factor 1 - (i - 1) / W to 1 - i / W after the window's
        i-th step; at its end install the chosen masks. Derived from the step and the two masks: nothing else is
        kept, so a checkpoint inside the window resumes as it ran."""
        chosen = {n: maskops.unpack_mask(self._last_sparse_masks[n], p.shape) for n, p in self.params.items()}
        if step == end:
            self.set_masks(chosen, reason="decay end")
            return
        window, i = end - start, step - start
        ratio = (window - i) / (window - i + 1)
        for name, param in self.params.items():
            fading = self.masks[name] & ~chosen[name].to(param.device)
            param.mul_(torch.where(fading, ratio, 1.0).to(param.dtype))

    def masks_at(self, step: int) -> dict[str, Tensor]:
        if step in self._inphase_steps[1:]:
            # Inside the first compressed phase the sparsity only rises: prune among the weights still kept, by
            # the score the phase's compression used (its weights have trained under the mask since).
            return self.compute_masks(self.target_sparsity_at(step), self._selection_scores(), among_active=True)
        if self.score == "magnitude" and not self.layer_floor and self.layer_ceiling == 1:
            return super().masks_at(step)
        return self.compute_masks(self.target_sparsity_at(step), self._selection_scores())

    def _selection_scores(self) -> dict[str, Tensor]:
        """What a compression ranks (``score``), with the ``layer_floor`` weights ranked above every other one and
        the weights beyond each layer's ``layer_ceiling`` below every other one."""
        if self.score == "normalized":
            scores = {}
            for name, magnitude in self.scores("magnitude").items():
                rms = magnitude.float().square().mean().sqrt()
                scores[name] = magnitude.float() / rms if rms > 0 else magnitude.float()
        elif self.score == "taylor" and self._taylor is not None:
            scores = {n: s.clone() for n, s in self._taylor.items()}
        else:
            scores = self.scores("magnitude")
        if self.layer_floor or self.layer_ceiling < 1:
            scores = {n: s.float() for n, s in scores.items()}
        if self.layer_ceiling < 1:
            # Every score is >= 0. The weights past a layer's ceiling are mapped into [-0.5, 0), below every other
            # weight but in their own order (one scale for all layers) and above the -1 that marks pruned weights
            # in an in-phase update: a compression that keeps more weights than the ceilings allow (a ramp's first,
            # lower sparsities) fills the rest by score, not by position among ties. At the target sparsity the
            # capacity check in make_schedule guarantees the ceilings hold. The floor's weights are among the
            # ceiling's (floor <= ceiling, the same ranking), so both hold.
            top = max(float(s.max()) for s in scores.values() if s.numel()) or 1.0
            for s in scores.values():
                beyond = ~maskops.topk_count_mask(s, math.ceil(self.layer_ceiling * s.numel()))
                s[beyond] = 0.5 * s[beyond] / top - 0.5
        if self.layer_floor:
            # The floor's weights rank above every other one, so the global top-k keeps them and shares out the rest.
            for s in scores.values():
                s[maskops.topk_count_mask(s, math.ceil(self.layer_floor * s.numel()))] = math.inf
        return scores

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().before_step(optimizer)
        if self.score != "taylor" or self.phase_at(self.count) != "dense":
            return
        with torch.no_grad():
            if self._taylor is None:
                self._taylor = {n: torch.zeros_like(p, dtype=torch.float) for n, p in self.params.items()}
            for name, param in self.params.items():
                if param.grad is not None:
                    self._taylor[name].add_((param.detach() * param.grad.detach()).abs().float())

    def update_masks(self, step: int) -> None:
        if self.phase_at(step) == "sparse":
            if step == self._resume_step and self._sparse_snapshot is not None:
                self._resume_sparse()
            else:
                if step == self._resume_step:  # e.g. a checkpoint from a run without final_from='sparse'
                    logger.warning(
                        "acdc: final_from='sparse' but no sparse model was kept at step %d; the final compression "
                        "prunes the dense weights, as the paper's",
                        self._snapshot_step,
                    )
                self._compress(step)
        else:
            if step == self._snapshot_step:
                self._take_sparse_snapshot()
            pruned = {n: ~m for n, m in self.masks.items()}
            self.densify("decompress", reset_optimizer_momentum=self.reset_momentum)
            self._taylor = None  # the next compression ranks by this dense phase's products only
            if self._dead_rows is not None:
                self._restore_dead_rows(step)
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
        if self.dead_units != "zero":
            # The rows this compression empties, with their values now (dense): what a decompression restores.
            self._dead_rows = {}
            self._record_dead_rows(masks)
        packed = {n: maskops.pack_mask(m) for n, m in masks.items()}
        difference = None
        if self._last_sparse_masks is not None:
            # Sharded (FSDP2): each rank counts its rows; the counts are summed over the ranks.
            counts = self.sum_over_ranks(maskops.packed_mask_counts(self._last_sparse_masks, packed))
            difference = 100.0 * maskops.packed_relative_mask_difference(counts=counts)
        self._last_sparse_masks = packed
        if step in self._decay_windows:
            # decay: the removed weights stay in the masks and fade (``_fade``) until the window's end.
            fading = sum(int((self.masks[n] & ~m).sum()) for n, m in masks.items())
            self.emit({"event": "compress", "mask_difference_pct": difference})
            self.emit({"event": "decay", "fading": fading, "until": self._decay_windows[step]})
            return
        self.set_masks(masks, reason="compress")
        self.emit({"event": "compress", "mask_difference_pct": difference})

    def _others(self) -> dict[str, Tensor]:
        """The model's parameters that are not sparsified (biases, norms, excluded layers) and its buffers (batch
        norm's running statistics), by their ``state_dict`` names: what a sparse model is besides its weights."""
        sparsified = {id(p) for p in self.params.values()}
        others = {n: p for n, p in self.model.named_parameters() if id(p) not in sparsified}
        return {**others, **dict(self.model.named_buffers())}

    @torch.no_grad()
    def _take_sparse_snapshot(self) -> None:
        """``final_from='sparse'``: keep the sparse model the compressed phase ends on (the last decompression).

        Only the kept values of the sparsified weights (their masks are ``_last_sparse_masks``, unchanged until
        the final compression), and a copy of every other parameter and buffer: restoring the weights alone would
        put the sparse weights behind the dense branch's biases and batch-norm statistics, two trajectories mixed.
        """
        values = {n: p.detach()[self.masks[n]].clone() for n, p in self.params.items()}
        others = {n: t.detach().clone() for n, t in self._others().items()}
        self._sparse_snapshot = {"values": values, "others": others}

    @torch.no_grad()
    def _resume_sparse(self) -> None:
        """``final_from='sparse'``: the final compressed phase continues the sparse model of the snapshot, on its
        masks; first moments reset as at a decompression (they hold the dense branch's direction)."""
        snapshot, self._sparse_snapshot = self._sparse_snapshot, None
        masks = {n: maskops.unpack_mask(self._last_sparse_masks[n], p.shape) for n, p in self.params.items()}
        for name, param in self.params.items():
            values = snapshot["values"][name]
            param.zero_()
            param[masks[name].to(param.device)] = values.to(param.device, param.dtype)
        current = self._others()
        for name, value in snapshot["others"].items():
            current[name].copy_(value)
        self.set_masks(masks, reason="resume sparse")
        if self._optimizer is not None:
            every = self.reset_momentum == "all"
            reset_first_moments(self._optimizer, None if every else list(self.params.values()))
        self._forget_zeros()  # weights written outside the optimizer: the next step re-zeroes in full
        # The masks are the previous compressed phase's: no change against them.
        self.emit({"event": "compress", "mask_difference_pct": 0.0, "resumed": True})

    def _record_dead_rows(self, masks: dict[str, Tensor]) -> None:
        """Add to ``_dead_rows`` the rows ``masks`` empties that the current masks still feed, with their values now."""
        for name, mask in masks.items():
            emptied = ~mask.reshape(mask.shape[0], -1).any(dim=1)
            if name in self._dead_rows:  # inphase_ramp: rows an earlier update of the phase emptied keep their values
                emptied &= self.masks[name].reshape(mask.shape[0], -1).any(dim=1)
            rows = emptied.nonzero().squeeze(1)
            if not rows.numel():
                continue
            values = self.params[name].detach()[rows].clone()
            if name in self._dead_rows:
                old_rows, old_values = self._dead_rows[name]
                rows, values = torch.cat([old_rows, rows]), torch.cat([old_values, values])
            self._dead_rows[name] = (rows, values)

    def _inphase_update(self, step: int) -> None:
        """``inphase_ramp``: raise the first compressed phase's sparsity (pruning among the kept weights)."""
        masks = self.masks_at(step)
        if self.dead_units != "zero":
            self._dead_rows = self._dead_rows or {}
            self._record_dead_rows(masks)
        # The next compression's mask difference compares with the mask this phase ends on.
        self._last_sparse_masks = {n: maskops.pack_mask(m) for n, m in masks.items()}
        self.set_masks(masks, reason=f"inphase_ramp {self.target_sparsity_at(step):.4f}")

    @torch.no_grad()
    def _restore_dead_rows(self, step: int) -> None:
        """Give the rows the last compression emptied their old values ('revive') or a small init ('reinit')."""
        generator = self.generator(step)
        for name, (rows, values) in self._dead_rows.items():
            param = self.params[name]
            if self.dead_units == "revive":
                param[rows] = values.to(param.device, param.dtype)
            else:
                bound = 1.0 / math.sqrt(max(1, param[0].numel()))
                draw = (torch.rand(values.shape, generator=generator) * 2 - 1) * bound * REINIT_SCALE
                param[rows] = draw.to(param.device, param.dtype)
        rows = sum(len(r) for r, _ in self._dead_rows.values())
        self._dead_rows = None
        self.emit({"event": "dead_units", "mode": self.dead_units, "rows": rows})

    def extra_state(self) -> dict:
        return {"last_sparse_masks": self._last_sparse_masks, "pruned_values": self._pruned_values,
                "taylor": self._taylor, "dead_rows": self._dead_rows,
                "sparse_snapshot": self._sparse_snapshot}  # fmt: skip

    def reshard_extra_state(self, extras: Sequence[dict], rows: Sequence[Mapping[str, tuple[int, int]]]) -> dict:
        """The previous compressed phase's masks of this rank's rows, from every saved rank's packed pieces (each
        unpacked with its rows' shape, cut, packed again); the rest as the default (nothing else is kept sharded)."""
        saved = [extra.get("last_sparse_masks") for extra in extras]
        rest = super().reshard_extra_state([{k: v for k, v in e.items() if k != "last_sparse_masks"} for e in extras],
                                           rows)  # fmt: skip
        if all(masks is None for masks in saved):
            return {**rest, "last_sparse_masks": None}
        if any(not isinstance(masks, dict) or set(masks) != set(self.params) for masks in saved):
            raise ValueError(
                "acdc state: the previous compressed phase's masks are missing from some saved pieces or name other "
                f"parameters; expected masks of {sorted(self.params)} in every piece"
            )
        last = {}
        for name, param in self.params.items():
            pieces = []
            for masks, held in zip(saved, rows):
                start, stop = held[name]
                mask = masks[name]
                if mask.dtype != torch.bool:  # packed (the form saved since the masks are packed)
                    mask = maskops.unpack_mask(mask, (stop - start, *param.shape[1:]))
                elif tuple(mask.shape) != (stop - start, *param.shape[1:]):
                    raise ValueError(
                        f"acdc state: previous masks of {name!r} rows {start}-{stop} have shape {tuple(mask.shape)}"
                    )
                pieces.append((start, mask))
            last[name] = maskops.pack_mask(self.local_rows_of(name, pieces))
        return {**rest, "last_sparse_masks": last}

    def load_extra_state(self, state: dict) -> None:
        masks = state.get("last_sparse_masks")
        # Checkpoints written before the masks were packed hold them as boolean tensors: pack those.
        self._last_sparse_masks = None if masks is None else {
            n: maskops.pack_mask(m) if m.dtype == torch.bool else m.clone() for n, m in masks.items()
        }
        self._taylor = state.get("taylor")
        self._dead_rows = state.get("dead_rows")
        snapshot = state.get("sparse_snapshot")
        self._sparse_snapshot = None if snapshot is None else {
            part: {n: t.clone() for n, t in tensors.items()} for part, tensors in snapshot.items()
        }
        values = state.get("pruned_values")
        self._pruned_values = None if values is None else {n: v.clone() for n, v in values.items()}
