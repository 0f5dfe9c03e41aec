"""One-shot M-FAC's vectorised gradients run the zoo's gpt without vmap's fallback (and its warnings)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sparsetrain.models import build_model
from sparsetrain.oneshot.mfac import _looped_gradients, _vmapped_gradients, fisher_gradients
from sparsetrain.train.evaluation import batch_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_GPT = {"layers": 2, "heads": 2, "width": 32}
def test_vectorised_and_looped_fisher_gradients_agree_on_a_gpt_without_warnings(recwarn, caplog) -> None:
    torch.manual_seed(0)
    model = build_model("gpt", input_shape=(16,), num_classes=256, options=TINY_GPT)
    params = [p for p in model.parameters() if p.dim() >= 2]
    batches = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))) for _ in range(6)]
    d = sum(p.numel() for p in params)
    model.eval()
    vmapped = torch.empty(len(batches), d, dtype=torch.float64)
    looped = torch.empty_like(vmapped)
    with caplog.at_level(logging.INFO, logger="sparsetrain.oneshot.mfac"):
        _vmapped_gradients(model, params, batches, batch_loss, vmapped)
        _looped_gradients(model, params, batches, batch_loss, looped)
        through = fisher_gradients(model, params, batches, batch_loss)
    assert looped.abs().max() > 1e-3  # real gradients, not zeros
    torch.testing.assert_close(vmapped, looped, rtol=0, atol=1e-5)
    torch.testing.assert_close(through, looped * math.sqrt(2), rtol=0, atol=1e-5)  # times sqrt(batch size)
    assert [str(w.message) for w in recwarn] == []  # no "batching rule not implemented" fallback warning
    assert "vectorised gradients failed" not in caplog.text  # fisher_gradients took the vmap path
