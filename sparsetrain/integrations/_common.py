"""What the framework callbacks share: build a method's sparsifier on the framework's model, attach it to the torch
optimizer under the framework's wrappers, keep AC/DC's dense twin, and save/restore all of it for an exact resume.

The framework modules only translate their hooks into these calls.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn

import sparsetrain

STATE_FORMAT = "sparsetrain-callback"
STATE_VERSION = 1


def require_package(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise an ImportError that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs the {module!r} package, which is not installed ({error}); install it with "
            f"pip install 'sparsetrain[{extra}]'"
        ) from None


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` under a framework's wrappers: accelerate's ``AcceleratedOptimizer`` (its
    ``.optimizer``), Lightning's ``LightningOptimizer`` (its ``._optimizer``), nested or not.

    The wrappers have no step hooks of their own: the sparsifier's hooks must sit on the optimizer that really steps.
    """
    seen = set()
    while id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer


class SparseSession:
    """A method's sparsifier living inside a framework's training run.

    ``start`` builds it on the model for a run of ``total_steps`` optimizer steps, ``attach`` puts its hooks on the
    torch optimizer (again whenever the framework hands over a different one), ``state_dict`` /
    ``load_state_dict`` carry it, with the dense twin, through the framework's checkpoints.

    The dense twin (AC/DC's dense model of the pair): at the end of every decompressed phase after the dense
    warm-up, the dense weights are copied (on the sparsifier's ``phase_end`` event, inside the optimizer step that
    ends the phase, before the compression changes them). ``score_twin`` then gives the copy a validation loss
    when the framework has a validation set; the lowest loss is kept, and without a loss the latest copy is.
    """

    def __init__(self, method: str, sparsity: float | None, options: dict[str, Any]) -> None:
        sparsetrain.get_method(method)  # an unknown name fails at construction, with the list of methods
        self.method = method
        self.sparsity = sparsity
        self.options = dict(options)
        self.sparsifier: sparsetrain.Sparsifier | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.dense_twin: dict[str, Any] | None = None  # {"step", "eval_loss", "state"}
        self.pending_twin: dict[str, Tensor] | None = None  # copied at a phase end, scored after the step
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ building
    def start(
        self,
        model: nn.Module,
        total_steps: int,
        steps_per_epoch: int | None,
        state: dict[str, Any] | None = None,
    ) -> sparsetrain.Sparsifier:
        """Build the sparsifier on ``model``; with ``state`` (from :meth:`state_dict`), continue that run.

        A sparsifier applies its step-0 masks (and, for sparse-from-scratch methods, its init rescaling) to the
        model it is built on. A resumed model already holds trained weights, so they are copied before and put
        back after: the checkpoint's weights, not a second masking of them, are what training continues from.
        """
        if self.sparsifier is not None:
            self.sparsifier.detach()
        self.optimizer = None
        options = dict(self.options)
        options.setdefault("total_steps", int(total_steps))
        if steps_per_epoch:
            options.setdefault("steps_per_epoch", int(steps_per_epoch))
        saved = None if state is None else {n: p.detach().clone() for n, p in model.named_parameters()}
        sparsifier = sparsetrain.create(self.method, model, sparsity=self.sparsity, **options)
        if state is not None:
            check_state(state, self.method)
            sparsifier.load_state_dict(state["sparsifier"])
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(saved[name])
            check_masks_hold(sparsifier)
            twin = state.get("dense_twin")
            self.dense_twin = None if twin is None else dict(twin)
        else:
            self.dense_twin = None
        self.pending_twin = None
        self._model = model
        sparsifier.subscribe(self._on_event)
        self.sparsifier = sparsifier
        return sparsifier

    def attach(self, optimizer: Any) -> None:
        """Hook the sparsifier onto the torch optimizer under ``optimizer``; moves the hooks if it changed."""
        inner = torch_optimizer(optimizer)
        if self.sparsifier is None or inner is self.optimizer:
            return
        self.sparsifier.detach()
        wrapped = self.sparsifier.wrap_optimizer(inner)
        if wrapped is not inner:
            # rda and cram step with an optimizer of their own, which a framework does not know about.
            raise ValueError(
                f"method {self.method!r} trains with its own optimizer (sparsetrain's {type(wrapped).__name__}); "
                "a framework callback can only attach to the framework's optimizer: build that optimizer with "
                f"sparsetrain.create({self.method!r}, model, ...).wrap_optimizer(optimizer) and hand it to the "
                "framework, or choose another method"
            )
        self.sparsifier.attach(inner)
        self.optimizer = inner

    # ------------------------------------------------------------------ the dense twin
    def _on_event(self, event: dict[str, Any]) -> None:
        if event["event"] != "phase_end" or event["phase"] != "dense":
            return
        sparsifier = self.sparsifier
        timeline = sparsifier.timeline()
        warmup_end = timeline[0].end if timeline and timeline[0].kind == "dense" else 0
        if sparsifier.count > warmup_end:  # the dense warm-up is not a decompressed phase
            self.pending_twin = {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}

    def score_twin(self, loss_of: Any = None) -> bool:
        """Keep the pending dense twin if it is the best so far; ``loss_of(model)`` gives its validation loss (or
        None when there is no validation set). Returns whether a twin was pending."""
        weights, self.pending_twin = self.pending_twin, None
        if weights is None:
            return False
        loss = None
        if loss_of is not None:
            loss = self._loss_with(weights, loss_of)
        best = self.dense_twin
        if loss is None or best is None or best["eval_loss"] is None or loss < best["eval_loss"]:
            self.dense_twin = {"step": self.sparsifier.count, "eval_loss": loss, "state": weights}
        return True

    @torch.no_grad()
    def _loss_with(self, weights: dict[str, Tensor], loss_of: Any) -> float | None:
        """``loss_of(model)`` with the model holding ``weights`` for the call (the sparse weights put back after).

        The global CPU random state is kept: evaluating the twin must not change the draws training makes next.
        """
        model = self._model
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        with torch.random.fork_rng(devices=[]):
            model.load_state_dict(weights)
            try:
                loss = loss_of(model)
            finally:
                model.load_state_dict(current)
        return None if loss is None else float(loss)

    # ------------------------------------------------------------------ logs and state
    def metrics(self) -> dict[str, Any]:
        """Measured sparsity of the sparsified weights, the schedule's target and the phase of the next step."""
        sparsifier = self.sparsifier
        return {
            "sparsity": round(sparsifier.sparsity().overall, 6),
            "target_sparsity": round(float(sparsifier.target_sparsity), 6),
            "phase": sparsifier.phase,
        }

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a framework checkpoint keeps of the session at optimizer step ``step``."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "method": self.method,
            "step": int(step),
            "sparsifier": self.sparsifier.state_dict(),
            "dense_twin": self.dense_twin,
        }


def check_state(state: Any, method: str, step: int | None = None) -> None:
    """Refuse a saved session that is not one, is for another method, or was saved at another step."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"the saved sparsetrain state is not one written by a sparsetrain callback (format "
            f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {STATE_FORMAT!r})"
        )
    if state.get("method") != method:
        raise ValueError(
            f"the checkpoint's sparsetrain state is for method {state.get('method')!r}, this callback runs {method!r}"
        )
    if step is not None and state.get("step") != step:
        raise ValueError(
            f"the checkpoint's sparsetrain state was saved at optimizer step {state.get('step')}, the run resumes "
            f"at step {step}: it belongs to another checkpoint"
        )
    if not isinstance(state.get("sparsifier"), dict):
        raise ValueError("the checkpoint's sparsetrain state holds no sparsifier state")


def check_masks_hold(sparsifier: sparsetrain.Sparsifier) -> None:
    """Every masked weight of the resumed model is exactly 0: otherwise the masks come from another run."""
    for name, mask in sparsifier.masks.items():
        param = sparsifier.params[name]
        stray = int(((param.detach() != 0) & ~mask.to(param.device)).sum())
        if stray:
            raise ValueError(
                f"the checkpoint's sparsetrain masks do not fit the model's weights: {stray} weights of {name!r} are "
                "masked but nonzero, so the masks belong to another checkpoint or run"
            )
