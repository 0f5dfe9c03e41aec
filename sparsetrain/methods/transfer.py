"""Sparse transfer: fine-tune a sparse pretrained model on a new task, its zeros kept as a fixed mask
(Iofinova et al., CVPR 2022, arXiv 2111.13445)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..core import Capability, Sparsifier, register

log = logging.getLogger(__name__)

FREEZE_CHOICES = ("none", "backbone")


def head_parameter_names(model: nn.Module, head: str | Sequence[str] | None = None) -> list[str]:
    """The classifier head's parameter names: those matching the glob patterns ``head``, or by default the
    parameters of the model's last ``nn.Linear`` (in registration order: the zoo's classifiers, torchvision's
    ``fc``)."""
    names = [n for n, _ in model.named_parameters()]
    if head is not None:
        patterns = [head] if isinstance(head, str) else list(head)
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(f"transfer: head={head!r} matches no parameter; the parameters: {', '.join(names)}")
        return chosen
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    if last is None:
        raise ValueError("transfer: the model has no nn.Linear classifier; name the head's parameters with head=")
    prefix = f"{last}." if last else ""
    return [n for n, p in model.named_parameters() if n.startswith(prefix) and "." not in n[len(prefix) :]]


@register("transfer")
class Transfer(Sparsifier):
    """Sparse transfer: the loaded model's zeros become a fixed mask; full fine-tuning or linear probing.

    Algorithm (Iofinova et al., "How Well Do Sparse ImageNet Models Transfer?", CVPR 2022, arXiv 2111.13445):
      1. The model is a pretrained sparse model (``sparsetrain train --init-from CKPT`` loads it; a classifier
         head of another class count is replaced by a freshly initialised one).
      2. At step 0 every sparsified weight that is exactly 0 is masked, and stays masked: the sparsity pattern
         learnt upstream is kept while the nonzero weights are fine-tuned on the new task (the paper's "sparse
         fine-tuning", its best transfer setting for AC/DC and GMP models).
      3. ``freeze='backbone'`` trains only the head (linear probing: every other parameter gets
         ``requires_grad=False``); ``freeze='none'`` (default) trains everything.

    ``sparsity`` is not a target here: the measured sparsity of the loaded zeros is (``final_sparsity``). Only a
    model with no zero at all among its sparsified weights (a dense upstream model, or a fresh one) is pruned
    instead, one-shot by magnitude at step 0 to ``sparsity`` (0 keeps it dense: dense fine-tuning).
    ``head``: glob patterns naming the head's parameters (default: the last ``nn.Linear``).

    Differences from the paper: the paper transfers ImageNet models to twelve datasets; here any checkpoint of a
    zoo model. Batch-norm statistics still update under linear probing (train mode), as in the paper's code.
    """

    capabilities = Capability.SPARSE

    def __init__(
        self,
        model: nn.Module,
        *,
        freeze: str = "none",
        head: str | Sequence[str] | None = None,
        sparsity: float | None = None,
        **common: Any,
    ) -> None:
        if freeze not in FREEZE_CHOICES:
            raise ValueError(f"transfer: freeze must be one of {', '.join(FREEZE_CHOICES)}; got {freeze!r}")
        self.freeze = freeze
        self.head = head
        self.requested_sparsity = 0.0 if sparsity is None else sparsity
        super().__init__(model, sparsity=self.requested_sparsity, **common)

    def setup(self) -> None:
        head = head_parameter_names(self.model, self.head)
        self.head_names = head
        if self.freeze == "backbone":
            for name, param in self.model.named_parameters():
                param.requires_grad_(name in head)
        zeros = {n: p.detach() == 0 for n, p in self.params.items()}
        if any(bool(z.any()) for z in zeros.values()):
            self._initial_masks: dict[str, Tensor] = {n: ~z for n, z in zeros.items()}
            total = sum(z.numel() for z in zeros.values())
            self.final_sparsity = sum(int(z.sum()) for z in zeros.values()) / total
            log.info("transfer: the loaded model's zeros are the mask (sparsity %.4f)", self.final_sparsity)
        else:
            self._initial_masks = self.compute_masks(self.final_sparsity, self.scores("magnitude"))

    def on_step(self, step: int) -> None:
        if step == 0:
            self.set_masks(self._initial_masks, reason="transfer")

    def target_sparsity_at(self, step: int) -> float:
        return self.final_sparsity

    def extra_state(self) -> dict:
        return {"final_sparsity": self.final_sparsity}

    def load_extra_state(self, state: dict) -> None:
        if "final_sparsity" in state:
            self.final_sparsity = float(state["final_sparsity"])
