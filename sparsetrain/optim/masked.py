"""``MaskedSGD`` and ``MaskedAdamW``: torch's SGD and Adam/AdamW that apply a sparsifier's masks inside their update.

A sparsifier attached to a plain optimizer zeroes the masked weights' gradients in one pass over every gradient
before the step (so no momentum leaks into them), then the optimizer reads those gradients again. On a large model
that extra pass is memory-bound: at 100M float32 weights on 2 CPU cores it costs 12-16 ms of a ~260 ms step
(BENCHMARKS.md, "Scale"). These optimizers fold the masking into the update: one compiled kernel call per weight
reads the weight, its gradient, its optimizer buffers and its boolean mask once and writes the weight and the
buffers, so the mask costs one extra byte read per weight instead of a 9-byte read-modify-write pass. (One call
for all of a group's weights saves the per-call overhead on small models, but its compilation grows with the
number of weights: 48 s for the 53 weights of a small transformer stack, against 7 s once for the per-weight kernel:
``benchmarks/scale.py --compile-time``.)

Use one in place of the torch optimizer; attaching a sparsifier hands it the masks, nothing else changes::

    optimizer = sparsetrain.optim.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsifier = sparsetrain.create("gmp", model, sparsity=0.9, total_steps=T).attach(optimizer)

Without masks (nothing attached, or a layer that is dense) each is the torch optimizer: the same update, state
dict and checkpoints. With masks the update is the torch optimizer's on the masked gradient, computed by a kernel
that ``torch.compile`` generates, which may round differently from torch's own kernels in the last bits (fused
multiply-adds); it is deterministic, so a resumed run continues bit-identically. Where ``torch.compile`` cannot
build the kernel (no C++ compiler, for example), a warning is logged once and the same update runs eagerly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam
from torch.optim.optimizer import _get_scalar_dtype
from torch.optim.sgd import sgd

from ..core.sharding import local
from ..core.sparsifier import register_keeps_zeros

log = logging.getLogger(__name__)

# A float's bits read as the signed integer of the same width: multiplying those by a 0/1 mask gives all-zero
# bits, which is +0.0 whatever the gradient was (NaN and inf included; a float multiply would keep NaN).
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}  # fmt: skip


def _masked(grad: Tensor, mask: Tensor, maximize: bool) -> Tensor:
    """The gradient the step applies: negated for ``maximize``, then exactly +0.0 where ``mask`` (uint8) is 0."""
    if maximize:
        grad = -grad
    ints = _SAME_WIDTH_INT[grad.dtype]
    return (grad.view(ints) * mask.to(ints)).view(grad.dtype)


def _masked_sgd_update(
    param: Tensor,
    grad: Tensor,
    buf: Tensor | None,
    mask: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    momentum: Tensor,
    dampening: Tensor,
    *,
    first: bool,
    nesterov: bool,
    maximize: bool,
    decay: bool,
) -> None:
    """One ``torch.optim.SGD`` step with the gradient masked first. ``first``: the buffer is new and takes the
    gradient as it is (torch's first step, no dampening)."""
    grad = _masked(grad, mask, maximize)
    if decay:
        grad = grad + weight_decay * param
    if buf is not None:
        if first:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad * (1 - dampening))
        grad = grad + momentum * buf if nesterov else buf
    param.sub_(lr * grad)


def _masked_adam_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    mask: Tensor,
    lr: Tensor,
    weight_decay: Tensor,
    beta1: Tensor,
    beta2: Tensor,
    eps: Tensor,
    step_size: Tensor,
    bias_correction2_sqrt: Tensor,
    *,
    maximize: bool,
    decay: bool,
    decoupled: bool,
) -> None:
    """One ``torch.optim.Adam`` / ``AdamW`` step (no AMSGrad) with the gradient masked first. ``step_size`` is
    lr / (1 - beta1^t), as torch computes it for this step."""
    grad = _masked(grad, mask, maximize)
    if decay:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    exp_avg.add_((grad - exp_avg) * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_(grad * grad * (1 - beta2))
    param.sub_(step_size * exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps))


class _CompiledUpdate:
    """An update function compiled at its first call (one kernel for every length: weights are passed flat),
    run eagerly instead, with one warning, where ``torch.compile`` cannot build it."""

    def __init__(self, update: Callable[..., None]) -> None:
        self.update = update
        self.compiled: Any = None
        self.failed = False

    def __call__(self, *args: Any, **flags: bool) -> None:
        if not self.failed:
            if self.compiled is None:
                # dynamic_threads: the kernel is built for the first weight's length, and a small first weight
                # would otherwise give a serial loop for every later, larger one.
                self.compiled = torch.compile(self.update, dynamic=True, options={"cpp.dynamic_threads": True})
            try:
                self.compiled(*args, **flags)
                return
            except Exception as error:  # noqa: BLE001 - any failure to build the kernel: the eager update is exact
                self.failed = True
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                log.warning("%s: torch.compile could not build the masked update (%s); using the eager one",
                            self.update.__name__, reason)  # fmt: skip
        self.update(*args, **flags)


_SGD_UPDATE = _CompiledUpdate(_masked_sgd_update)
_ADAM_UPDATE = _CompiledUpdate(_masked_adam_update)

# The 0-d tensors of a step, made once per group and step (not per weight): keyed by what they depend on.
Scalars = dict[tuple, list[Tensor]]


class _MasksInUpdate:
    """What the masked optimizers share: the masks handed over, the split of each group into masked weights (the
    kernel) and the others (the torch optimizer's own update), and the scalars passed as 0-d tensors."""

    _step_masks: dict[Tensor, Tensor]

    def use_masks(self, masks: Mapping[Tensor, Tensor]) -> None:
        """Mask the gradient of each parameter in ``masks`` (parameter -> boolean mask of its shape, or of its
        local shard under FSDP2) at every following step; an empty mapping turns masking off."""
        for param, mask in masks.items():
            if mask.dtype != torch.bool or mask.shape != local(param).shape:
                raise ValueError(
                    f"use_masks needs a boolean mask of the parameter's shape {tuple(local(param).shape)}; got "
                    f"{mask.dtype} of shape {tuple(mask.shape)}"
                )
        self._step_masks = dict(masks)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One step: the masked weights through the compiled kernel, the others through the torch optimizer's
        own update; ``closure`` as in torch."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # type: ignore[attr-defined]
            self._check_group(group)
            plain: list[Tensor] = []
            scalars: Scalars = {}  # per step and group, not per weight
            for param in group["params"]:
                if param.grad is None:
                    continue
                mask = self._step_masks.get(param)
                if mask is None:
                    plain.append(param)
                    continue
                weight, grad = local(param), local(param.grad)
                if grad.is_sparse or weight.dtype not in _SAME_WIDTH_INT or grad.dtype != weight.dtype:
                    raise ValueError(
                        f"{type(self).__name__} masks dense floating-point gradients of the parameter's dtype; got "
                        f"a {grad.dtype}{' sparse' if grad.is_sparse else ''} gradient for a {weight.dtype} parameter"
                    )
                self._masked_step(param, weight, grad, mask, group, scalars)
            if plain:
                self._plain_step(plain, group)
        return loss

    @staticmethod
    def _tensors(scalars: Scalars, weight: Tensor, values: Iterable[float], *key: Any) -> list[Tensor]:
        """``values`` as 0-d tensors for ``weight``'s kernel, made once per ``key`` in this step and group.

        0-d tensors, not Python floats: the compiled kernel would be rebuilt at every new learning rate.
        Half-precision weights take float32 scalars, as torch's own kernels compute in float32 for them.
        """
        dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
        index = (dtype, weight.device, *key)
        found = scalars.get(index)
        if found is None:
            found = scalars[index] = [
                torch.tensor(float(v), dtype=dtype, device=weight.device) for v in values
            ]
        return found

    def _check_group(self, group: dict) -> None:
        """Refuse a parameter group's settings the update does not implement (once per group and step)."""

    def _masked_step(self, param: Tensor, weight: Tensor, grad: Tensor, mask: Tensor, group: dict,
                     scalars: Scalars) -> None:  # fmt: skip
        """One masked weight's update (``weight`` and ``grad`` are its local tensors), its state advanced."""
        raise NotImplementedError

    def _plain_step(self, params: list[Tensor], group: dict) -> None:
        """The torch optimizer's own update for the weights of ``group`` without a mask."""
        raise NotImplementedError


def _flat(*tensors: Tensor | None) -> list[Tensor | None] | None:
    """Flat views of contiguous tensors (one compiled kernel for every shape), or None if one is not."""
    if any(t is not None and not t.is_contiguous() for t in tensors):
        return None
    return [None if t is None else t.view(-1) for t in tensors]


class MaskedSGD(_MasksInUpdate, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay, maximize) that masks gradients itself.

    A sparsifier attached to it (``sparsifier.attach(optimizer)``) hands it the boolean masks of the weights it
    sparsifies (:meth:`use_masks`) and skips its own pass over the gradients: the update reads each masked
    weight's gradient through its mask, so masked weights, whose values and momentum are +0.0, stay +0.0 (the
    sparsifier's post-step check holds as with ``torch.optim.SGD``). The ``.grad`` tensors themselves are left
    as backward wrote them; call ``sparsifier.mask_gradients()`` before anything that should see them masked
    (norm clipping). Why: see the module docstring and BENCHMARKS.md ("Scale").

    Options are ``torch.optim.SGD``'s; ``foreach`` applies to the weights without a mask. ``fused`` and
    ``differentiable`` are not accepted.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach)  # fmt: skip
        self._step_masks = {}

    def _plain_step(self, params: list[Tensor], group: dict) -> None:
        """``torch.optim.SGD``'s own update for the parameters without a mask."""
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"], momentum=momentum,
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=any(p.grad.is_sparse for p in params), foreach=group["foreach"])  # fmt: skip
        for param, buf in zip(params, buffers):
            self.state[param]["momentum_buffer"] = buf

    def _masked_step(self, param: Tensor, weight: Tensor, grad: Tensor, mask: Tensor, group: dict,
                     scalars: Scalars) -> None:  # fmt: skip
        values = self._tensors(scalars, weight, (group[k] for k in ("lr", "weight_decay", "momentum", "dampening")))
        state = self.state[param]
        buf = state.get("momentum_buffer") if group["momentum"] != 0 else None
        first = group["momentum"] != 0 and buf is None
        if first:
            buf = state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        flags = {"first": first, "nesterov": bool(group["nesterov"]), "maximize": bool(group["maximize"]),
                 "decay": float(group["weight_decay"]) != 0}  # fmt: skip
        tensors = [weight, grad, None if buf is None else local(buf), mask.view(torch.uint8)]
        flat = _flat(*tensors)
        (_SGD_UPDATE if flat is not None else _masked_sgd_update)(*(flat or tensors), *values, **flags)


class MaskedAdamW(_MasksInUpdate, torch.optim.AdamW):
    """``torch.optim.AdamW`` (and Adam's coupled decay with ``decoupled_weight_decay=False``) that masks gradients
    itself, as :class:`MaskedSGD` does for SGD.

    Masked weights stay +0.0: their masked gradient is 0, so their first moment stays 0 and their update is
    0 / (sqrt(v) + eps) = 0, and decoupled decay multiplies +0.0 by a positive factor. Their second moments decay
    by beta2 per step as in torch's Adam (AC/DC and GaP keep and restore them for re-entry, as with AdamW).
    Options are ``torch.optim.AdamW``'s except ``amsgrad``, ``capturable``, ``differentiable`` and ``fused``
    (with AMSGrad use ``torch.optim.AdamW``: the sparsifier masks the gradients itself).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        decoupled_weight_decay: bool = True,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         foreach=foreach)  # fmt: skip
        for group in self.param_groups:
            group["decoupled_weight_decay"] = decoupled_weight_decay
        self._step_masks = {}

    def _state_of(self, param: Tensor) -> dict:
        state = self.state[param]
        if not state:  # torch's own initial state, so state dicts are interchangeable
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _check_group(self, group: dict) -> None:
        taken = [key for key in ("amsgrad", "capturable", "differentiable", "fused") if group.get(key)]
        if taken:
            raise ValueError(f"MaskedAdamW does not take {', '.join(taken)} (a parameter group has it); use "
                             "torch.optim.AdamW, whose gradients the sparsifier masks itself")  # fmt: skip

    def _plain_step(self, params: list[Tensor], group: dict) -> None:
        """``torch.optim.AdamW``'s own update for the parameters without a mask."""
        states = [self._state_of(p) for p in params]
        beta1, beta2 = group["betas"]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
             [s["step"] for s in states], amsgrad=False, has_complex=any(torch.is_complex(p) for p in params),
             beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=group["maximize"], foreach=group["foreach"],
             decoupled_weight_decay=group["decoupled_weight_decay"])  # fmt: skip

    def _masked_step(self, param: Tensor, weight: Tensor, grad: Tensor, mask: Tensor, group: dict,
                     scalars: Scalars) -> None:  # fmt: skip
        state = self._state_of(param)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        # torch's bias corrections, in Python floats as its non-capturable path computes them
        step_size = float(group["lr"]) / (1 - beta1**step)
        correction2_sqrt = math.sqrt(1 - beta2**step)
        values = self._tensors(scalars, weight, (group["lr"], group["weight_decay"], beta1, beta2, group["eps"],
                                                 step_size, correction2_sqrt), step)  # fmt: skip
        flags = {"maximize": bool(group["maximize"]), "decay": float(group["weight_decay"]) != 0,
                 "decoupled": bool(group["decoupled_weight_decay"])}  # fmt: skip
        tensors = [weight, grad, local(state["exp_avg"]), local(state["exp_avg_sq"]), mask.view(torch.uint8)]
        flat = _flat(*tensors)
        (_ADAM_UPDATE if flat is not None else _masked_adam_update)(*(flat or tensors), *values, **flags)


# Their updates keep a weight at +0.0 when the weight, its masked gradient and its first moment are 0, under the
# same conditions as the torch optimizers' (checked on every step's hyperparameters).
register_keeps_zeros(MaskedSGD, like=torch.optim.SGD)
register_keeps_zeros(MaskedAdamW, like=torch.optim.AdamW)
