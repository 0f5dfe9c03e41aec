"""Evaluation, weight sparsity and the checkpoint payload: what the trainer and the commands that read its
checkpoints (``eval``, ``prune``, ``deploy``) share, without importing the training loop."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..maskops import count_zeros
from . import checkpoint
from .config import TrainConfig
from .data import iterate_batches


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset`` (model put in eval mode and restored)."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in iterate_batches(dataset, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss / seen, "acc": 100.0 * correct / seen}


def weight_sparsity(state: Mapping[str, torch.Tensor], names: Iterable[str]) -> float:
    """Fraction of exact zeros over the named tensors of a state dict (the sparsified weights)."""
    names = list(names)
    zeros = sum(count_zeros(state[n]) for n in names)
    return zeros / max(1, sum(state[n].numel() for n in names))


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state dict on the CPU: a snapshot later training steps do not change."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def checkpoint_payload(
    model: nn.Module, spec: dict, config: TrainConfig | Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """What a sparsetrain checkpoint holds: header, model spec and weights, the run's config as a plain dict
    (``TrainConfig.to_dict()``), and ``extra`` (kind, metrics, the resume state)."""
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model_spec": spec,
        "model": cpu_state(model),
        "config": config.to_dict() if isinstance(config, TrainConfig) else config,
        **extra,
    }
