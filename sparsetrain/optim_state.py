"""Optimizer state surgery that works for any ``torch.optim.Optimizer``, with no per-class code.

A buffer is "per-element" when it is a tensor of the parameter's shape (SGD's ``momentum_buffer``, Adam's
``exp_avg`` and ``exp_avg_sq``, RMSprop's ``square_avg``, ...). Scalars such as Adam's ``step`` are left alone.
Masks zero first moments at pruned positions and keep second moments (``SECOND_MOMENT_KEYS``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

# First-moment (momentum) buffers of the torch optimizers. AC/DC resets these at each decompression.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg", "momentum", "exp_avg_ema")

# Second-moment-like buffers: running scales of past gradients (or updates) that divide the step, never move a
# weight by themselves. Adam/AdamW/NAdam/RAdam's exp_avg_sq (max_exp_avg_sq with amsgrad), Adagrad's sum,
# RMSprop/Adadelta's square_avg, Adadelta's acc_delta, Adamax's exp_inf, Adafactor's variance, Rprop's step_size.
# Masks keep them: a masked weight's gradient is 0 and its first moment is 0, so its step is 0 whatever they
# hold, and a weight that re-enters needs its scale. Zeroed while Adam's bias correction is already ~1, the first
# step of a re-entering weight is (1 - beta1) g / sqrt((1 - beta2) g^2) = 3.16 lr instead of about lr |m / sqrt(v)|
# (and Rprop's zeroed step_size would never grow again). Chosen by name, not by sign: a momentum buffer can be
# non-negative by chance, and leaving one alone would leak into a masked weight. A buffer of a name not listed
# here is zeroed, the side on which nothing leaks.
SECOND_MOMENT_KEYS = (
    "exp_avg_sq",
    "max_exp_avg_sq",
    "sum",
    "square_avg",
    "acc_delta",
    "exp_inf",
    "variance",
    "step_size",
)

__all__ = ["MOMENTUM_KEYS", "SECOND_MOMENT_KEYS", "per_element_buffers", "zero_state_where", "reset_momentum"]


def per_element_buffers(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Tensor]:
    """The optimizer's tensors for ``param`` that have the parameter's shape, by state key."""
    state = optimizer.state.get(param, {})
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0
    }


@torch.no_grad()
def zero_state_where(
    optimizer: torch.optim.Optimizer, param: Tensor, pruned: Tensor, *, keep_second_moments: bool = True
) -> None:
    """Zero the per-element buffers of ``param`` where the boolean ``pruned`` is True.

    Second-moment-like buffers (``SECOND_MOMENT_KEYS``) are kept unless ``keep_second_moments`` is False (RigL
    zeroes every slot of a grown weight, as its reference does).
    """
    for key, buffer in per_element_buffers(optimizer, param).items():
        if keep_second_moments and key in SECOND_MOMENT_KEYS:
            continue
        # An FSDP2 buffer is a DTensor: the mask covers this rank's shard.
        (buffer.to_local() if hasattr(buffer, "to_local") else buffer).masked_fill_(pruned, 0)


@torch.no_grad()
def reset_momentum(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None) -> int:
    """Zero the momentum (first-moment) buffers of ``params`` (all of the optimizer's when None).

    Returns the number of buffers reset, so callers and tests can tell that something happened.
    """
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    reset = 0
    for param in params:
        for key, buffer in per_element_buffers(optimizer, param).items():
            if key in MOMENTUM_KEYS:
                buffer.zero_()
                reset += 1
    return reset
