"""Pieces several test files use: a checkpoint round trip through bytes and a small conv net with batch norm."""

from __future__ import annotations

import io

import torch
from torch import nn


def roundtrip(obj):
    """``obj`` saved with ``torch.save`` and loaded back with ``weights_only=True``, as a checkpoint would be."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def conv_bn_net() -> nn.Module:
    """Two conv + batch-norm blocks and a linear head, for 1x8x8 inputs (scikit-learn digits)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
