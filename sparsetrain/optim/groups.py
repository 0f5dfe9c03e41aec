"""Parameter groups for weight decay, shared by the trainer's optimizers and the methods that build their own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

__all__ = ["weight_decay_groups"]


def weight_decay_groups(params: Iterable[Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: weights (``dim() >= 2``) decay by ``weight_decay``, the rest do not.

    Decaying biases and normalization scales does not help and hurts small networks (the usual practice since
    Goyal et al., arXiv 1706.02677, section 5.1's "no bias decay" variant). Both groups are returned, even empty,
    so that their order (decayed first) is fixed and a saved optimizer state matches.
    """
    params = list(params)
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
