"""A Lightning callback that trains with any sparsetrain method.

::

    from sparsetrain.integrations.lightning import SparsetrainCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[SparsetrainCallback("acdc", sparsity=0.9)])
    trainer.fit(module, loader)                                  # or trainer.fit(module, loader, ckpt_path=...)

What it does, hook by hook:

- ``on_train_start`` (optimizers built, a checkpoint's model, optimizer and loop state restored): builds the
  method's sparsifier on the LightningModule for ``trainer.estimated_stepping_batches`` optimizer steps (gradient
  accumulation counted), or continues the one saved in the checkpoint; attaches it to the torch optimizer under
  Lightning's ``LightningOptimizer``. The sparsifier's step hooks then mask gradients before every real optimizer
  step (inside Lightning's closure, after the backward pass) and zero the masked weights after it. Accumulating
  batches never step, so only real steps count; the LR schedulers are left alone.
- ``on_train_batch_start``: if the trainer now holds another optimizer, the hooks move to it.
- ``on_train_batch_end``: logs ``sparsetrain/sparsity`` (measured on the weights), ``sparsetrain/target_sparsity``
  and ``sparsetrain/dense_phase`` (1 while the next step is in a dense phase) with ``pl_module.log``; keeps the
  dense twin copied at the end of each decompressed phase (AC/DC; ``callback.dense_twin``, the latest one: the
  callback has no validation loss of its own to choose by).
- ``on_save_checkpoint`` / ``on_load_checkpoint``: the sparsifier state and the dense twin travel in the Lightning
  checkpoint under the key ``"sparsetrain"``, so ``fit(..., ckpt_path=...)`` continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

from ._common import SparseSession, check_state, require_package

_lightning = require_package("lightning", "lightning", "sparsetrain.integrations.lightning")

Callback = _lightning.pytorch.Callback

CHECKPOINT_KEY = "sparsetrain"

__all__ = ["CHECKPOINT_KEY", "SparsetrainCallback"]


class SparsetrainCallback(Callback):
    """Train with the sparsetrain method ``method`` inside a Lightning ``Trainer``.

    Args:
        method: a registered method name (``sparsetrain.list_methods()``), e.g. ``"acdc"`` (Peste et al.,
            NeurIPS 2021, arXiv 2106.12379), ``"gmp"``, ``"rigl"``.
        sparsity: the target fraction of zeros of the sparsified weights.
        **method_options: passed to ``sparsetrain.create``: the method's options and the common ones
            (``distribution``, ``include``, ``exclude``, ``mask_type``, ``seed``, ``unit``). ``total_steps`` and
            ``steps_per_epoch`` default to the trainer's (optimizer steps).

    One optimizer (the first the LightningModule configures) is the one sparsified; methods that bring their own
    optimizer (``rda``, ``cram``) are refused.
    """

    def __init__(self, method: str, sparsity: float | None = None, **method_options: Any) -> None:
        self.session = SparseSession(method, sparsity, method_options)
        self._loaded: dict[str, Any] | None = None

    @property
    def sparsifier(self):
        """The live :class:`~sparsetrain.Sparsifier` (None before training starts)."""
        return self.session.sparsifier

    @property
    def dense_twin(self) -> dict[str, Any] | None:
        """The dense model of AC/DC's last decompressed phase: ``{"step", "eval_loss": None, "state"}`` or None."""
        return self.session.dense_twin

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.optimizers:
            raise ValueError("sparsetrain: the LightningModule configures no optimizer: there is nothing to attach to")
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "sparsetrain: the run's length in optimizer steps is unknown (an iterable dataset without max_steps); "
                "set Trainer(max_steps=...)"
            )
        steps_per_epoch = None
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        saved, self._loaded = self._loaded, None
        if saved is not None:
            check_state(saved, self.session.method, trainer.global_step)
        elif trainer.global_step > 0:
            raise ValueError(
                f"the trainer resumes at step {trainer.global_step} but its checkpoint holds no {CHECKPOINT_KEY!r} "
                "state: it was not written with this callback, and the run would not continue where it stopped"
            )
        self.session.start(pl_module, int(total), steps_per_epoch, saved)
        self.session.attach(trainer.optimizers[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.session.attach(trainer.optimizers[0])  # no-op unless the optimizer was replaced

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        session = self.session
        if session.pending_twin is not None:
            session.score_twin(None)
        metrics = session.metrics()
        pl_module.log_dict(
            {
                "sparsetrain/sparsity": float(metrics["sparsity"]),
                "sparsetrain/target_sparsity": float(metrics["target_sparsity"]),
                "sparsetrain/dense_phase": float(metrics["phase"] == "dense"),
            },
            on_step=True,
            on_epoch=False,
        )

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.session.sparsifier is not None:
            checkpoint[CHECKPOINT_KEY] = self.session.state_dict(trainer.global_step)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Called before the optimizers exist: kept until on_train_start builds the sparsifier.
        self._loaded = checkpoint.get(CHECKPOINT_KEY)
