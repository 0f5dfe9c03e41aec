"""CrAM: the compression-aware minimizer (Peste, Vladu, Kurtic, Lampert, Alistarh, ICLR 2023, arXiv 2207.14200)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import maskops
from ..core.selection import input_dim
from ..core.sparsifier import derived_seed

__all__ = ["CrAM"]

# The draw of the compression sparsity is a pure function of (seed, step) (derived_seed), never the global RNG, so a
# resumed run and every distributed rank draw the same sparsity at the same step.


class CrAM(torch.optim.Optimizer):
    """CrAM+: a SAM-like two-pass step that makes the dense model robust to one-shot pruning.

    ``step(closure)``, where ``closure()`` zeroes the gradients, computes the loss on the batch, calls
    ``backward()`` and returns the loss:

      1. ``closure()`` at w gives the clean gradient g (``step`` calls it itself: the caller does not run a
         backward pass before ``step``);
      2. ascend: w + rho * g (not normalised);
      3. compress the perturbed point: global magnitude top-k over the compressed weights that got a gradient in
         pass 1 at a sparsity drawn uniformly from ``sparsities`` by a generator seeded by (seed, step), or an
         N:M mask (``mask_type='2:4'``); a parameter without a gradient (unused in this batch's loss) is left
         untouched, as in the reference;
      4. ``closure()`` again at C(w + rho g) gives g', multiplied by the compression mask if ``mask_gradient``;
      5. restore w; the gradient becomes g' + g (CrAM+, ``plus=True``) or g';
      6. the base optimizer steps with it (its weight decay, momentum, lr schedule, as usual).

    Returns the clean loss of pass 1. Batch-norm running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked`` of every module of ``model`` that has them) are saved before pass 2 and restored after
    it, so they only ever see the clean weights. Without ``model`` they are not protected: pass the model whenever
    it has batch norm.

    ``param_groups`` and ``state`` are the base optimizer's own objects, so learning-rate schedules, sparsifier
    hooks and optimizer-state surgery act on the base optimizer through this wrapper.

    Args:
        params: the parameters perturbed in pass 2 (normally all the model's trainable parameters); each must be
            trained by ``base_optimizer``.
        base_optimizer: a constructed torch optimizer (SGD, Adam, ...).
        rho: ascent step, >= 0 (0.05 in the paper).
        sparsities: compression sparsities to draw from, each in [0, 1).
        mask_type: 'unstructured' (global top-k) or 'N:M' (e.g. '2:4', along the input dimension).
        plus: CrAM+ (add the clean gradient).
        mask_gradient: multiply g' by the compression mask.
        seed: seeds the sparsity draws with the step counter.
        model: the model whose batch-norm statistics must not see pass 2; with N:M it also tells which compressed
            weights are transposed (in, out) Conv1D weights (Hugging Face), grouped along their dim 0 (without
            ``model`` every weight is grouped along dim 1).
        compress: the parameters compressed in step 3 (default: those of ``params`` with dim >= 2).

    Differences from the paper and its released code: exact top-k counts (the released code keeps the weights above
    a percentile threshold); the sparsity draw comes from (seed, step) instead of the global NumPy RNG; g' is masked
    with the compression mask itself (the released code masks every weight that is zero at the compressed point,
    which also catches weights that were zero before compression); the base optimizer is passed constructed
    rather than as a class.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        base_optimizer: torch.optim.Optimizer,
        *,
        rho: float = 0.05,
        sparsities: Sequence[float] = (0.5, 0.7, 0.9),
        mask_type: str = "unstructured",
        plus: bool = True,
        mask_gradient: bool = True,
        seed: int = 0,
        model: nn.Module | None = None,
        compress: Iterable[Tensor] | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "CrAM: base_optimizer must be a constructed torch.optim.Optimizer, e.g. "
                f"torch.optim.SGD(model.parameters(), lr=0.1), got {type(base_optimizer).__name__}"
            )
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
            raise ValueError(f"CrAM: rho must be a finite number >= 0 (0.05 in the paper), got {rho!r}")
        self.nm = maskops.parse_nm(mask_type)
        if isinstance(sparsities, (int, float)):
            sparsities = (sparsities,)
        sparsities = tuple(maskops.check_sparsity(s, "CrAM: each of sparsities") for s in sparsities)
        if not sparsities:
            raise ValueError("CrAM: sparsities must name at least one sparsity in [0, 1), e.g. (0.5, 0.7, 0.9)")
        params = list(params)
        super().__init__(params, {})  # installs the step hooks torch optimizers have; groups are replaced below
        owned = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
        foreign = [tuple(p.shape) for p in params if id(p) not in owned]
        if foreign:
            raise ValueError(
                f"CrAM: {len(foreign)} parameter(s) (shapes {foreign[:3]}) are not trained by base_optimizer; "
                "build the base optimizer over the same parameters"
            )
        self.base_optimizer = base_optimizer
        # Share the base optimizer's groups and state: schedulers that set group['lr'], sparsifier hooks and
        # optimizer_state surgery then act on the optimizer that really steps.
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self.perturbed: list[Tensor] = params
        self.compressed: list[Tensor] = (
            [p for p in params if p.dim() >= 2] if compress is None else list(compress)
        )  # fmt: skip
        if not self.compressed:
            raise ValueError("CrAM: nothing to compress: no parameter with dim >= 2 (pass compress=[...])")
        perturbed_ids = {id(p) for p in params}
        if any(id(p) not in perturbed_ids for p in self.compressed):
            raise ValueError("CrAM: every parameter in compress must also be in params")
        # Each compressed weight's input dimension (N:M groups run along it): 0 for a transposed (in, out)
        # Conv1D, found from its module, which needs ``model``; 1 (Linear, conv) otherwise.
        names = {} if model is None else {id(p): n for n, p in model.named_parameters()}
        self.input_dims: list[int] = [
            input_dim(model, names[id(p)]) if id(p) in names else 1 for p in self.compressed
        ]  # fmt: skip
        if self.nm is not None:
            for p, dim in zip(self.compressed, self.input_dims, strict=True):
                maskops.check_nm_shape(
                    p.shape, *self.nm, what="CrAM: a compressed weight", remedy="leave it out of compress=",
                    input_dim=dim,
                )
        self.rho = float(rho)
        self.sparsities = sparsities
        self.mask_type = mask_type
        self.plus = bool(plus)
        self.mask_gradient = bool(mask_gradient)
        self.seed = int(seed)
        self.model = model
        self.steps_taken = 0
        self.last_sparsity: float | None = None

    # ------------------------------------------------------------------ the step
    def sparsity_at(self, step: int) -> float:
        """The compression sparsity of step ``step``: uniform over ``sparsities`` from a (seed, step) generator."""
        if self.nm is not None:
            return 1.0 - self.nm[0] / self.nm[1]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, step))
        return self.sparsities[int(torch.randint(len(self.sparsities), (1,), generator=generator))]

    def compression_masks(self, sparsity: float, params: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Boolean masks (kept = True) of the current weights of ``params`` (default ``compressed``) at ``sparsity``
        (one global ranking over them), or N:M."""
        params = self.compressed if params is None else list(params)
        if self.nm is not None:
            dims = {id(p): dim for p, dim in zip(self.compressed, self.input_dims, strict=True)}
            return [maskops.nm_mask(p.detach().abs(), *self.nm, dims.get(id(p), 1)) for p in params]
        if not params:
            return []
        scores = {str(i): p.detach().abs() for i, p in enumerate(params)}
        masks = maskops.global_topk_masks(scores, sparsity)
        return [masks[str(i)] for i in range(len(params))]

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:
        if closure is None or not callable(closure):
            raise TypeError(
                "CrAM.step needs a closure: step(closure) where closure() zeroes the gradients, computes the loss "
                "on the batch, calls loss.backward() and returns the loss (CrAM evaluates it twice)"
            )
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            clean = {p: p.grad.detach().clone() for p in self.perturbed if p.grad is not None}
            originals = {p: p.detach().clone() for p in clean}
            for p, g in clean.items():
                p.add_(g, alpha=self.rho)
            sparsity = self.sparsity_at(self.steps_taken)
            # Only parameters that got a gradient are compressed, as in the reference: one that took no part in
            # the loss (an unused head, a branch not taken) is neither perturbed nor restored, so zeroing it here
            # would leave it pruned for good.
            compressed = [p for p in self.compressed if p in clean]
            masks = self.compression_masks(sparsity, compressed)
            for p, mask in zip(compressed, masks):
                p.mul_(mask)
        # Pass 2 must see g' alone, whether or not the closure zeroes the gradients itself.
        self.base_optimizer.zero_grad(set_to_none=True)
        for p in self.perturbed:
            p.grad = None
        saved_stats = self._save_norm_statistics()
        try:
            with torch.enable_grad():
                closure()
        finally:
            with torch.no_grad():
                self._restore_norm_statistics(saved_stats)
                for p, w in originals.items():
                    p.copy_(w)
        with torch.no_grad():
            if self.mask_gradient:
                for p, mask in zip(compressed, masks):
                    if p.grad is not None:
                        p.grad.mul_(mask)
            if self.plus:
                for p, g in clean.items():
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
        self.base_optimizer.step()
        self.steps_taken += 1
        self.last_sparsity = sparsity
        return loss

    def _save_norm_statistics(self) -> list[tuple[Tensor, Tensor]]:
        if self.model is None:
            return []
        saved = []
        for module in self.model.modules():
            if getattr(module, "running_mean", None) is None and getattr(module, "running_var", None) is None:
                continue
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if isinstance(buffer, Tensor):
                    saved.append((buffer, buffer.detach().clone()))
        return saved

    @staticmethod
    def _restore_norm_statistics(saved: list[tuple[Tensor, Tensor]]) -> None:
        for buffer, value in saved:
            buffer.copy_(value)

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base_optimizer.state_dict(), "cram": {"steps_taken": self.steps_taken}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"base", "cram"}:
            raise ValueError(
                "CrAM.load_state_dict needs a state written by CrAM.state_dict() (keys 'base' and 'cram'); "
                "to load a plain optimizer's state, load it into the base optimizer"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.steps_taken = int(state_dict["cram"]["steps_taken"])
        # load_state_dict of torch optimizers rebuilds the groups and state: share the new objects again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return (
            f"CrAM(rho={self.rho}, sparsities={self.sparsities}, mask_type={self.mask_type!r}, plus={self.plus}, "
            f"base={type(self.base_optimizer).__name__})"
        )
