"""Evaluation, weight sparsity and the checkpoint payload: what the trainer and the commands that read its
checkpoints (``eval``, ``prune``, ``deploy``) share, without importing the training loop."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..maskops import count_zeros
from . import checkpoint
from .config import TrainConfig
from .data import iterate_batches


def batch_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of class logits ``(N, C)`` against labels ``(N,)``, or of a language model's logits
    ``(N, T, C)`` against the next tokens ``(N, T)`` (averaged over every position: nats per token)."""
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten().long(), reduction=reduction)
    return nn.functional.cross_entropy(logits, y.long(), reduction=reduction)


def count_correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """Top-1 hits and predictions made: one per sample, or one per position of a language model's output."""
    return int((logits.argmax(-1) == y).sum()), y.numel()


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean loss in nats per token (inf rather than an overflow error for a huge loss)."""
    return math.exp(loss) if loss < 700 else float("inf")


# What a run reports per dataset metric: the key of its metrics rows, the words of the CLI's tables, and whether a
# higher value is better (the best dense model of AC/DC's pair is chosen on it, on validation data).
METRICS = {
    "accuracy": {"key": "acc", "label": "acc", "higher_is_better": True},
    "perplexity": {"key": "ppl", "label": "ppl", "higher_is_better": False},
}


def output_logits(out: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or the ``logits`` of a Hugging Face ``ModelOutput``
    (any mapping with that entry), so a ``transformers`` model is scored like a zoo model.

    Raises:
        TypeError: any other output (the message names its type).
    """
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else None
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned a {type(out).__name__}; evaluate needs logits: a tensor, or a "
                    "Hugging Face ModelOutput (a mapping) with 'logits'")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss, accuracy and perplexity of ``model`` on ``dataset`` (model put in eval mode and restored).

    ``dataset`` is a ``TensorDataset`` of ``(inputs, targets)``; for a language model the targets are the next
    tokens (the inputs shifted by one, as the ``text`` dataset gives them). ``model(inputs)`` may return the
    logits or a Hugging Face ``ModelOutput`` (its ``.logits`` are scored: a pruned GPT-2's perplexity needs no
    wrapper). For a language model the loss is per token, the accuracy that of next-token prediction, and ``ppl``
    its perplexity ``exp(loss)``; for a classifier ``ppl`` is ``exp`` of its loss too, but runs do not report it."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in iterate_batches(dataset, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = output_logits(model(x))
        total_loss += float(batch_loss(logits, y, reduction="sum"))
        hits, count = count_correct(logits, y)
        correct, seen = correct + hits, seen + count
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan"), "ppl": float("nan")}
    return {"loss": total_loss / seen, "acc": 100.0 * correct / seen, "ppl": perplexity(total_loss / seen)}


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
