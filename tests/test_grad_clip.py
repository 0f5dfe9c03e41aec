"""The trainer clips the gradient the optimizer step applies, not the one masked weights still hold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsetrain.train.config import resolve
from sparsetrain.train.loop import Run


def _clip_spy(monkeypatch, run_holder: list) -> list[tuple[int, bool]]:
    """Wrap the real clip_grad_norm_: record (step, whether any masked weight has a nonzero gradient)."""
    seen: list[tuple[int, bool]] = []
    real = nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        sparsifier = run_holder[0].sparsifier
        leaked = any(
            bool((sparsifier.params[n].grad[~m] != 0).any())
            for n, m in sparsifier.masks.items()
            if sparsifier.params[n].grad is not None
        )
        seen.append((sparsifier.count, leaked))
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", spy)
    return seen


def _run(tmp_path, method: str, **options) -> Run:
    config = resolve(None, dict(dataset="digits", model="mlp", method=method, sparsity=0.9, epochs=1, batch_size=64,
                                grad_clip=0.5, threads=1, plots=False, progress=False, out=str(tmp_path / method),
                                method_options=options))  # fmt: skip
    return Run(config)


def test_clip_measures_only_the_live_weights_gradient(tmp_path, monkeypatch) -> None:
    run = _run(tmp_path, "static")
    seen = _clip_spy(monkeypatch, [run])
    run.run()
    assert len(seen) == run.total_steps
    assert not any(leaked for _, leaked in seen)  # masked gradients were zero when the norm was taken


def test_clip_keeps_the_dense_gradient_a_rigl_update_reads(tmp_path, monkeypatch) -> None:
    run = _run(tmp_path, "rigl", delta=3)
    seen = _clip_spy(monkeypatch, [run])
    run.run()
    updates = {step for step, _ in seen if run.sparsifier.is_update_step(step)}
    assert updates
    assert all(leaked == (step in updates) for step, leaked in seen)


def test_clipped_step_moves_kept_weights_by_the_clipped_live_gradient() -> None:
    # One SGD step by hand, in the trainer's order: masked gradients zeroed, then clipped to norm 1.
    torch.manual_seed(0)
    import sparsetrain

    model = nn.Linear(10, 10, bias=False)
    sparsifier = sparsetrain.create("magnitude", model, sparsity=0.9, total_steps=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    sparsifier.attach(optimizer)
    mask = sparsifier.masks["weight"]
    before = model.weight.detach().clone()
    model.weight.grad = torch.ones(10, 10)  # live part norm sqrt(10), whole norm 10
    sparsifier.mask_gradients()
    norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    assert float(norm) == pytest.approx(10**0.5)
    moved = (before - model.weight.detach())[mask]
    assert moved.norm().item() == pytest.approx(1.0, rel=1e-5)  # the applied update has exactly the clip norm
