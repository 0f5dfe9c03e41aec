"""Pieces several test files use: a checkpoint round trip through bytes, a small conv net with batch norm and a
trained digits MLP checkpoint."""

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


def trained_digits_mlp_checkpoint(path, epochs: int):
    """LeNet-300-100 on the 8x8 digits, trained ``epochs`` epochs by hand (about 0.3 s each), saved at ``path``
    as a ``dense_best`` checkpoint that ``sparsetrain prune`` and ``eval`` accept; returns ``path``."""
    from sparsetrain.train import checkpoint
    from sparsetrain.train.config import defaults
    from sparsetrain.train.data import iterate_batches, load_dataset
    from sparsetrain.train.evaluation import checkpoint_payload
    from sparsetrain.train.models import build_model, model_spec

    config = {**defaults(), "dataset": "digits", "model": "mlp", "batch_size": 64}
    spec = model_spec("mlp", (1, 8, 8), 10)
    torch.manual_seed(0)
    model = build_model(**spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    splits = load_dataset("digits")
    for epoch in range(epochs):
        for x, y in iterate_batches(splits.train, 64, shuffle=True, seed=0, epoch=epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    checkpoint.save_atomic(checkpoint_payload(model, spec, config, kind="dense_best"), path)
    return path
