"""Batch-norm re-calibration of a pruned model (Peste et al., ICLR 2023, CrAM).

The statistics the dense network gathered no longer describe the pruned one's activations, so they are
re-estimated on about 1000 training samples after pruning. No gradient step is taken.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .calibration import model_inputs, run_model, sample_count, to_device

__all__ = ["recalibrate_batchnorm", "norm_modules"]


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that keep running statistics (BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm with tracking on)."""
    # Duck-typed on what re-calibration uses, so custom norm layers that follow torch's interface count too.
    return [
        m
        for m in model.modules()
        if getattr(m, "track_running_stats", False)
        and isinstance(getattr(m, "running_mean", None), Tensor)
        and hasattr(m, "reset_running_stats")
    ]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Iterable[Any], num_samples: int = 1000) -> int:
    """Re-estimate the batch-norm running statistics of ``model`` on about ``num_samples`` inputs from ``data``.

    Every norm module's statistics are reset, then estimated as a cumulative average (``momentum=None``) over
    whole batches from ``data`` until at least ``num_samples`` samples were seen (a truncated last batch would
    count as much as a full one in that average). Only the norm modules run in training mode, so dropout and
    friends stay in evaluation mode; modes and momenta are restored afterwards. No gradient is computed.

    Args:
        model: the model (its parameters are not changed).
        data: batches as the other one-shot functions take them (``calibration.model_inputs``): tensors of
            inputs, ``(inputs, targets, ...)`` tuples (the first element is the input), e.g.
            ``sparsetrain.train.data.iterate_batches(train_set, 128, shuffle=True, seed=0)``, or Hugging Face
            mappings such as ``{"pixel_values": ..., "labels": ...}``, run as ``model(**batch)`` without
            ``labels``.
        num_samples: how many samples to use at least (1000 in the CrAM paper).

    Returns:
        The number of samples used; 0 when the model has no norm module with running statistics (then ``data``
        is not read).

    Raises:
        ValueError: ``num_samples`` < 1, a batch of another form, or ``data`` yielded no samples (the old
            statistics are then kept).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer (about 1000 is enough), got {num_samples!r}")
    modules = norm_modules(model)
    if not modules:
        return 0
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in modules}
    # Kept to undo the reset when nothing could be measured (empty data, an error in the forward pass).
    saved = [(b, b.clone()) for m in modules for b in m.buffers(recurse=False)]
    seen = 0
    try:
        model.eval()
        for m in modules:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches, not an exponential one
            m.train()
        for batch in data:
            x = model_inputs(batch)
            run_model(model, to_device(x, device))
            seen += sample_count(x)
            if seen >= num_samples:
                break
        if seen == 0:
            raise ValueError("recalibrate_batchnorm: data yielded no samples; pass batches of training inputs")
    except BaseException:
        for buffer, value in saved:
            buffer.copy_(value)
        raise
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.train(training)
    return seen
