"""Pieces several test files use: a checkpoint round trip through bytes, a small conv net with batch norm, a
trained digits MLP checkpoint, and the ``sparsetrain`` command run in a subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import torch
from torch import nn


def run_cli(*args: str, timeout: float = 300, threads: int | None = None) -> subprocess.CompletedProcess:
    """``python -m sparsetrain ARGS`` in a subprocess, output captured, hashing fixed (``PYTHONHASHSEED=0``);
    ``threads`` sets ``OMP_NUM_THREADS``."""
    env = {**os.environ, "PYTHONHASHSEED": "0", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.run([sys.executable, "-m", "sparsetrain", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def assert_masked_plus_zero(sparsifier) -> None:
    """Every masked weight of ``sparsifier`` is exactly +0.0 (not -0.0)."""
    for name, param in sparsifier.params.items():
        masked = param.detach()[~sparsifier.masks[name]]
        assert torch.all(masked == 0) and not torch.signbit(masked).any(), name


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
