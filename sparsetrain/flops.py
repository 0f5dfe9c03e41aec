"""FLOP accounting for sparse training, in the convention of the sparse-training literature.

One FLOP here is one multiply-accumulate of a weight (the convention behind "ResNet-50 costs 4.1 GFLOPs"),
as used by RigL (Evci et al., 2020) and AC/DC (Peste et al., 2021). Only the weights of ``nn.Linear``,
``nn.Conv1d`` and ``nn.Conv2d`` modules (and their subclasses) are counted; biases, normalisation,
activations and pooling are ignored, as in those papers. A sparse layer costs only its nonzero weights.

Training FLOPs per step are ``3 x forward FLOPs per sample x samples``: the forward pass plus roughly twice
as much for the backward pass (gradients w.r.t. activations and w.r.t. weights), at the density in force
at that step. A step that reads the gradient of every weight, masked ones included (RigL's mask updates, RDA
before its prune), computes the dense weight gradient: it costs ``2 f_S + f_D`` per sample instead of ``3 f_S``
(f_S, f_D the sparse and dense forward FLOPs; Evci et al. 2020, appendix H). The compute metric of a sparse run
is its total relative to dense training of equal length.

Typical use::

    counter = FlopCounter(model, sample_batch)        # one forward pass, measures output positions
    tracker = TrainingFlops(counter)
    for step, (x, y) in enumerate(loader):
        ...
        tracker.add(x.shape[0], masks)                 # or forward_flops=cached value per mask change
                                                       # dense_gradients=True on steps that read them
    tracker.ratio                                      # training FLOPs relative to dense training
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "FlopCounter",
    "FlopReport",
    "LayerFlops",
    "TrainingFlops",
    "forward_flops",
    "training_flops_ratio",
]

logger = logging.getLogger(__name__)

# Order matters only for naming: the first matching base class gives the reported ``kind``.
_COUNTED_TYPES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.Conv1d, "Conv1d"),
    (nn.Conv2d, "Conv2d"),
    (nn.Linear, "Linear"),
)

# The forward pass plus a backward pass that costs about twice the forward (activation and weight grads).
_TRAINING_MULTIPLIER = 3


def _kind_of(module: nn.Module) -> str | None:
    for cls, kind in _COUNTED_TYPES:
        if isinstance(module, cls):
            return kind
    return None


def _weight_key(module_name: str) -> str:
    # Matches model.named_parameters(): the root module's weight (e.g. a bare nn.Linear) is just "weight".
    return f"{module_name}.weight" if module_name else "weight"


@dataclass
class LayerFlops:
    """Forward FLOPs (multiply-accumulates) of one layer, per sample.

    Attributes:
        name: Qualified module name, e.g. ``"features.0"``.
        kind: ``"Linear"``, ``"Conv1d"`` or ``"Conv2d"`` (the counted base class).
        weight_shape: Shape of the layer's weight.
        positions: Output positions per sample at which each weight is applied (1 for a Linear on a
            vector, ``T`` for a Linear on ``(B, T, D)``, ``L_out`` for Conv1d, ``H_out * W_out`` for
            Conv2d), summed over every call of the module in one forward pass.
        dense: ``positions * weight.numel()``.
        sparse: ``positions * (number of nonzero weights, or True entries of the layer's mask)``.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    positions: int
    dense: int
    sparse: int


@dataclass
class FlopReport:
    """Per-layer forward FLOPs of a model, per sample."""

    layers: list[LayerFlops] = field(default_factory=list)

    @property
    def dense_total(self) -> int:
        """Forward FLOPs per sample if every weight were nonzero."""
        return sum(layer.dense for layer in self.layers)

    @property
    def sparse_total(self) -> int:
        """Forward FLOPs per sample counting only nonzero (or unmasked) weights."""
        return sum(layer.sparse for layer in self.layers)

    @property
    def ratio(self) -> float:
        """``sparse_total / dense_total``; 1.0 when there is nothing to count."""
        dense = self.dense_total
        return 1.0 if dense == 0 else self.sparse_total / dense


@dataclass
class _Site:
    """A counted module and the number of output positions per sample measured for it."""

    name: str
    kind: str
    module: nn.Module
    positions: int


class FlopCounter:
    """Measures, with one forward pass on a sample input, how many output positions each
    Linear/Conv1d/Conv2d weight is applied at; afterwards the forward FLOPs for any sparsity pattern
    are a cheap sum (no further forward passes).

    The positions depend only on the architecture and the input size, not on the weights, so they are
    measured once; :meth:`forward` then reads the current weights (or given masks) every time it is called.

    Only modules whose ``forward`` actually runs are counted: a layer that is never called (an unused
    head), or whose weight is used through ``torch.nn.functional`` by its parent (e.g. the output
    projection inside ``nn.MultiheadAttention``), does not appear in the report.

    Args:
        model: The network. It is put in eval mode for the measuring pass (so dropout and batch-norm
            statistics are left alone) and every submodule's previous mode is restored afterwards.
        sample_input: An input batch of the size the model will see per sample; ``sample_input.shape[0]``
            is taken as the batch size and the measured positions are divided by it.
    """

    def __init__(self, model: nn.Module, sample_input: torch.Tensor) -> None:
        if sample_input.dim() == 0:
            raise ValueError("sample_input must have a leading batch dimension")
        batch = int(sample_input.shape[0])
        if batch <= 0:
            raise ValueError("sample_input must contain at least one sample")

        self.model = model
        self.batch_size = batch
        self._sites = self._measure(model, sample_input, batch)
        logger.debug(
            "FlopCounter: %d counted layers, %d dense forward FLOPs per sample",
            len(self._sites),
            self.dense_total,
        )

    @staticmethod
    def _measure(model: nn.Module, sample_input: torch.Tensor, batch: int) -> list[_Site]:
        # Totals over the whole batch, per module, accumulated over every call of that module.
        totals: dict[str, int] = {}
        kinds: dict[str, str] = {}
        modules: dict[str, nn.Module] = {}
        handles: list[torch.utils.hooks.RemovableHandle] = []

        def make_hook(name: str, module: nn.Module):
            out_units = module.out_features if isinstance(module, nn.Linear) else module.out_channels

            def hook(_mod: nn.Module, _inputs: Any, output: Any) -> None:
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"{name}: expected a tensor output, got {type(output).__name__}")
                # Every output element is one application of one output unit's weights; dividing out
                # the number of output units leaves (batch x positions), whatever the input layout.
                totals[name] = totals.get(name, 0) + output.numel() // out_units

            return hook

        # Remember each submodule's own mode: a single model.train(prev) would overwrite deliberate mixes
        # (e.g. frozen batch-norm layers kept in eval inside a training model).
        previous_modes = [(m, m.training) for m in model.modules()]
        try:
            for name, module in model.named_modules():
                kind = _kind_of(module)
                if kind is None:
                    continue
                kinds[name] = kind
                modules[name] = module
                handles.append(module.register_forward_hook(make_hook(name, module)))
            model.eval()
            with torch.no_grad():
                model(sample_input)
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in previous_modes:
                module.training = mode

        sites: list[_Site] = []
        # Report in registration order (stable across runs), not call order.
        for name, module in modules.items():
            if name not in totals:
                logger.debug("FlopCounter: %s was not called in the forward pass; not counted", name)
                continue
            total = totals[name]
            if total % batch != 0:
                raise ValueError(
                    f"{name}: {total} output positions over the batch are not divisible by the batch size "
                    f"{batch}; is sample_input.shape[0] really the batch dimension?"
                )
            sites.append(_Site(name=name, kind=kinds[name], module=module, positions=total // batch))
        return sites

    @property
    def dense_total(self) -> int:
        """Dense forward FLOPs per sample; independent of the weights' values, so no nonzero count."""
        return sum(site.positions * site.module.weight.numel() for site in self._sites)

    def forward(
        self, masks: dict[str, torch.Tensor] | None = None, nonzeros: dict[str, int] | None = None
    ) -> FlopReport:
        """Forward FLOPs per sample for the current weights, or for the given masks.

        Args:
            masks: Optional mapping from parameter name (``"<module name>.weight"``, or ``"weight"`` when
                the model itself is the layer) to a mask of the weight's shape; where a layer has a mask,
                its nonzero (True) entries are counted instead of the nonzero entries of its weight.
                Entries for other parameters are ignored.
            nonzeros: Optional mapping from the same names to the weight's count of nonzeros, used before
                ``masks`` and the weights (a sharded model's counts, summed over its ranks).

        Returns:
            A :class:`FlopReport` with one entry per counted layer.
        """
        masks = masks or {}
        layers: list[LayerFlops] = []
        with torch.no_grad():
            for site in self._sites:
                weight = site.module.weight
                key = _weight_key(site.name)
                mask = masks.get(key)
                if nonzeros is not None and key in nonzeros:
                    nonzero = int(nonzeros[key])
                elif mask is not None:
                    if mask.numel() != weight.numel():
                        raise ValueError(f"mask for {key} has {mask.numel()} entries, weight has {weight.numel()}")
                    nonzero = int(torch.count_nonzero(mask))
                else:
                    nonzero = int(torch.count_nonzero(weight))
                layers.append(
                    LayerFlops(
                        name=site.name,
                        kind=site.kind,
                        weight_shape=tuple(weight.shape),
                        positions=site.positions,
                        dense=site.positions * weight.numel(),
                        sparse=site.positions * nonzero,
                    )
                )
        return FlopReport(layers=layers)

    def training_step(self, batch_size: int, masks: dict[str, torch.Tensor] | None = None) -> int:
        """Training FLOPs of one step on ``batch_size`` samples: ``3 * forward sparse FLOPs * batch_size``."""
        return _TRAINING_MULTIPLIER * self.forward(masks).sparse_total * batch_size


def forward_flops(model: nn.Module, sample_input: torch.Tensor) -> FlopReport:
    """Forward FLOPs per sample of ``model`` with its current weights (one forward pass)."""
    return FlopCounter(model, sample_input).forward()


class TrainingFlops:
    """Accumulates training FLOPs of a run step by step, and the same run's dense-equivalent FLOPs.

    Attributes:
        sparse: Training FLOPs spent so far at the densities in force at each step.
        dense: Training FLOPs the same steps would have cost with every weight nonzero.
        samples: Samples processed so far.
    """

    def __init__(self, counter: FlopCounter) -> None:
        self.counter = counter
        # The dense count depends only on shapes and positions, so it is fixed for the run.
        self._dense_forward = counter.dense_total
        self.sparse = 0
        self.dense = 0
        self.samples = 0

    def add(
        self,
        samples: int,
        masks: dict[str, torch.Tensor] | None = None,
        *,
        forward_flops: int | None = None,
        repeat: bool = False,
        dense_gradients: bool = False,
    ) -> None:
        """Record one step (or several) over ``samples`` samples.

        Args:
            samples: Number of samples processed (the batch size for one step).
            masks: Masks in force, as for :meth:`FlopCounter.forward`; without them the current weights'
                nonzeros are counted.
            forward_flops: Sparse forward FLOPs per sample, if the caller already has them (they only
                change when the masks do), which skips the nonzero count. ``masks`` is then ignored.
            repeat: Another forward/backward pass over samples already recorded this step (CrAM's second pass):
                it costs FLOPs but does not add to the dense run it is compared with.
            dense_gradients: The step computes the gradient of every weight, masked ones included (RigL's update
                steps, RDA before its prune): the backward pass's weight-gradient half runs dense, so the step
                costs ``(2 f_S + f_D) x samples`` instead of ``3 f_S x samples`` (Evci et al. 2020, appendix H).
        """
        if samples < 0:
            raise ValueError(f"samples must be non-negative, got {samples}")
        if forward_flops is None:
            forward_flops = self.counter.forward(masks).sparse_total
        if dense_gradients:
            # Forward and activation gradients at the sparse cost, the weight gradient at the dense cost.
            self.sparse += (2 * int(forward_flops) + self._dense_forward) * samples
        else:
            self.sparse += _TRAINING_MULTIPLIER * int(forward_flops) * samples
        if not repeat:
            self.dense += _TRAINING_MULTIPLIER * self._dense_forward * samples
            self.samples += samples

    @property
    def ratio(self) -> float:
        """Training FLOPs relative to dense training of the same steps; 1.0 before any step."""
        return 1.0 if self.dense == 0 else self.sparse / self.dense

    def state_dict(self) -> dict[str, int]:
        """Totals as plain ints, for checkpoints."""
        return {"sparse": int(self.sparse), "dense": int(self.dense), "samples": int(self.samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore totals saved by :meth:`state_dict`, so a resumed run keeps counting from there."""
        self.sparse = int(state["sparse"])
        self.dense = int(state["dense"])
        self.samples = int(state.get("samples", 0))


def training_flops_ratio(phases: list[tuple[int, float]]) -> float:
    """Training FLOPs of a run relative to dense training of equal length.

    Pure arithmetic, for planning or for checking a schedule: ``phases = [(steps, forward_ratio), ...]``
    where ``forward_ratio`` is the sparse/dense forward FLOP ratio during those steps. Assumes equal
    samples per step, so the result is the step-weighted mean of the ratios. E.g. AC/DC's 100-epoch
    ImageNet schedule, half dense and half at ratio ``f``, gives ``0.5 + 0.5 * f``.

    Returns 1.0 for a run with no steps (nothing was saved relative to dense).
    """
    total_steps = 0
    weighted = 0.0
    for steps, forward_ratio in phases:
        if steps < 0:
            raise ValueError(f"steps must be non-negative, got {steps}")
        if forward_ratio < 0:
            raise ValueError(f"forward_ratio must be non-negative, got {forward_ratio}")
        total_steps += steps
        weighted += steps * forward_ratio
    return 1.0 if total_steps == 0 else weighted / total_steps
