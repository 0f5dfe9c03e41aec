"""A Hugging Face ``Trainer`` callback that trains with any sparsetrain method.

::

    from sparsetrain.integrations.huggingface import SparsetrainCallback

    callback = SparsetrainCallback("acdc", sparsity=0.9, exclude=["*wte*", "*wpe*"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()                                    # or trainer.train(resume_from_checkpoint=True)

What it does, hook by hook:

- ``on_train_begin``: builds the method's sparsifier on the Trainer's model for ``state.max_steps`` optimizer steps
  (gradient accumulation already counted by the Trainer), or, when the Trainer resumes, rebuilds it from the
  ``sparsetrain.pt`` file of the checkpoint folder; then attaches it to the torch optimizer inside accelerate's
  ``AcceleratedOptimizer`` (the wrapper has no step hooks of its own).
- every optimizer step: the sparsifier's step hooks mask the gradients before the step and zero the masked
  weights after it (``docs/contracts.md``: hard zeros, explicit time). Micro-batches of an accumulation never call
  ``optimizer.step()``, so only real steps count. The Trainer's LR scheduler is left alone.
- ``on_step_begin``: if the Trainer now holds another optimizer, the hooks move to it.
- ``on_step_end``: after a step that ended a decompressed phase (AC/DC), the dense twin copied just before the
  compression is scored on the Trainer's evaluation set when one has been used (mean ``model(**batch).loss``) and
  kept if it is the best; ``callback.dense_twin`` holds it (``{"step", "eval_loss", "state"}``).
- ``on_log``: adds ``sparsity`` (measured on the weights), ``target_sparsity`` and ``phase`` to the Trainer's log
  entry (``trainer.state.log_history``, ``trainer_state.json``, and the callbacks after this one, such as the
  progress printer; ``report_to`` integrations run before user callbacks and do not see them).
- ``on_save``: writes the sparsifier state and the dense twin to ``sparsetrain.pt`` in the checkpoint folder the
  Trainer just wrote (atomically), so ``resume_from_checkpoint`` continues bit for bit.

Resuming: the file is read from ``args.resume_from_checkpoint`` when that is set, else from
``<output_dir>/checkpoint-<global step>`` (where ``trainer.train(resume_from_checkpoint=True)`` resumes from). It
must have been saved at the step the Trainer resumes at, and every weight it masks must be 0 in the loaded model.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ._common import SparseSession, check_state, require_package

_transformers = require_package("transformers", "hf", "sparsetrain.integrations.huggingface")
require_package("accelerate", "hf", "sparsetrain.integrations.huggingface")  # the Trainer needs it to train

TrainerCallback = _transformers.TrainerCallback

STATE_FILE = "sparsetrain.pt"

__all__ = ["STATE_FILE", "SparsetrainCallback"]


class SparsetrainCallback(TrainerCallback):
    """Train with the sparsetrain method ``method`` inside a Hugging Face ``Trainer``.

    Args:
        method: a registered method name (``sparsetrain.list_methods()``), e.g. ``"acdc"`` (Peste et al.,
            NeurIPS 2021, arXiv 2106.12379), ``"gmp"``, ``"rigl"``.
        sparsity: the target fraction of zeros of the sparsified weights.
        **method_options: passed to ``sparsetrain.create``: the method's options and the common ones
            (``distribution``, ``include``, ``exclude``, ``mask_type``, ``seed``, ``unit``). ``total_steps`` and
            ``steps_per_epoch`` default to the Trainer's (optimizer steps).

    Methods that bring their own optimizer (``rda``, ``cram``) are refused: the Trainer steps its own.
    """

    def __init__(self, method: str, sparsity: float | None = None, **method_options: Any) -> None:
        self.session = SparseSession(method, sparsity, method_options)

    # ------------------------------------------------------------------ handles
    @property
    def sparsifier(self):
        """The live :class:`~sparsetrain.Sparsifier` (None before training starts)."""
        return self.session.sparsifier

    @property
    def dense_twin(self) -> dict[str, Any] | None:
        """The best dense model of AC/DC's decompressed phases: ``{"step", "eval_loss", "state"}`` or None."""
        return self.session.dense_twin

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        steps_per_epoch = None
        if train_dataloader is not None:
            try:
                # The Trainer's own count: a last partial accumulation in an epoch is a step too.
                steps_per_epoch = max(1, math.ceil(len(train_dataloader) / args.gradient_accumulation_steps))
            except TypeError:  # an iterable dataset has no length
                steps_per_epoch = None
        saved = self._saved_state(args, state) if state.global_step > 0 else None
        self.session.start(model, state.max_steps, steps_per_epoch, saved)
        self.session.attach(optimizer)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:
            self.session.attach(optimizer)  # no-op unless the Trainer re-created its optimizer

    def on_step_end(self, args, state, control, eval_dataloader=None, **kwargs):
        if self.session.pending_twin is not None:
            loss_of = None if eval_dataloader is None else (lambda model: _eval_loss(model, eval_dataloader))
            self.session.score_twin(loss_of)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.session.sparsifier is None or logs is None:
            return
        metrics = self.session.metrics()
        logs.update(metrics)
        # The Trainer appended a copy of ``logs`` to its history before calling the callbacks.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.session.sparsifier is None or not args.should_save:
            return
        from ..errors import writing
        from ..train.checkpoint import save_atomic

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, STATE_FILE)
        with writing(path):
            save_atomic(self.session.state_dict(state.global_step), path)

    # ------------------------------------------------------------------ resume
    def _saved_state(self, args, state) -> dict[str, Any]:
        folders = []
        if isinstance(args.resume_from_checkpoint, str):
            folders.append(args.resume_from_checkpoint)
        folders.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                data = _load_state(path)
                check_state(data, self.session.method, state.global_step)
                return data
        raise ValueError(
            f"the Trainer resumes at step {state.global_step} but no {STATE_FILE} was found in "
            f"{' or '.join(map(repr, folders))}: without the sparsifier's state the run would not continue where it "
            "stopped. Resume from a checkpoint written with this callback (set TrainingArguments("
            "resume_from_checkpoint=FOLDER) when the folder is not in output_dir)"
        )


def _load_state(path: str) -> Any:
    """The saved session in ``path``, read with ``weights_only=True``: a checkpoint may come from anyone, and
    opening one never runs code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated, foreign or malicious file
        reason = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ValueError(f"{path!r} could not be read as a sparsetrain callback state: {reason[:200]}") from None


@torch.no_grad()
def _eval_loss(model: nn.Module, dataloader: Any) -> float | None:
    """Mean of ``model(**batch).loss`` over ``dataloader`` in eval mode (None if the batches carry no labels)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            output = model(**batch) if isinstance(batch, dict) else model(*batch)
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if loss is None:
                return None
            total += float(loss)
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else None
