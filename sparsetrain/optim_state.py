"""Optimizer state surgery that works for any ``torch.optim.Optimizer``, with no per-class code.

A buffer is "per-element" when it is a tensor of the parameter's shape (SGD's ``momentum_buffer``, Adam's
``exp_avg`` and ``exp_avg_sq``, RMSprop's ``square_avg``, ...). Scalars such as Adam's ``step`` are left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

# First-moment (momentum) buffers of the torch optimizers. AC/DC resets these at each decompression.
# Second-moment estimates are deliberately absent: they hold the scale of past gradients, and zeroing them
# while Adam's bias-correction step count keeps running would inflate the next update several-fold.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg", "momentum", "exp_avg_ema")

__all__ = ["MOMENTUM_KEYS", "per_element_buffers", "zero_state_where", "reset_momentum"]


def per_element_buffers(optimizer: torch.optim.Optimizer, param: Tensor) -> dict[str, Tensor]:
    """The optimizer's tensors for ``param`` that have the parameter's shape, by state key."""
    state = optimizer.state.get(param, {})
    return {
        key: value
        for key, value in state.items()
        if isinstance(value, Tensor) and value.shape == param.shape and value.dim() > 0
    }


@torch.no_grad()
def zero_state_where(optimizer: torch.optim.Optimizer, param: Tensor, pruned: Tensor) -> None:
    """Zero every per-element buffer of ``param`` where the boolean ``pruned`` is True."""
    for buffer in per_element_buffers(optimizer, param).values():
        buffer.masked_fill_(pruned, 0)


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
