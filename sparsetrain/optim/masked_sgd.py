"""``MaskedSGD``: ``torch.optim.SGD`` that applies a sparsifier's masks to the gradients inside its own update.

A sparsifier attached to a plain optimizer zeroes the masked weights' gradients in one pass over every gradient
before the step (so no momentum leaks into them), then the optimizer reads those gradients again. On a large model
that extra pass is memory-bound: at 100M float32 weights on 2 CPU cores it is ~14 ms of a ~290 ms step, about 5%
(BENCHMARKS.md, "Scale"). ``MaskedSGD`` folds the masking into the update: one compiled kernel per weight reads
the weight, its gradient, its momentum buffer and its boolean mask once and writes the weight and the buffer, so
the mask costs one extra byte read per weight instead of a 9-byte read-modify-write pass.

Use it in place of ``torch.optim.SGD``; attaching a sparsifier hands it the masks, nothing else changes::

    optimizer = sparsetrain.optim.MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsifier = sparsetrain.create("gmp", model, sparsity=0.9, total_steps=T).attach(optimizer)

Without masks (nothing attached, or a layer that is dense) it is ``torch.optim.SGD``: the same update, state
dict and checkpoints. With masks the update is SGD's on the masked gradient, computed by a kernel that
``torch.compile`` generates, which may round differently from torch's own kernels in the last bit (fused
multiply-adds); it is deterministic, so a resumed run continues bit-identically. Where ``torch.compile`` cannot
build the kernel (no C++ compiler, for example), a warning is logged once and an eager masked update is used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd

from ..core.sharding import local
from ..core.sparsifier import register_keeps_zeros

log = logging.getLogger(__name__)

# A float's bits read as the signed integer of the same width: multiplying those by a 0/1 mask gives all-zero
# bits, which is +0.0 whatever the gradient was (NaN and inf included; a float multiply would keep NaN).
_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                   torch.bfloat16: torch.int16}  # fmt: skip


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
    """One SGD step on flat views with the gradient masked first; ``torch.optim.SGD``'s update rule, step for step.

    ``mask`` is the boolean mask viewed as uint8 (what the compiler vectorises well). ``first``: the buffer is
    new and takes the gradient as it is (torch's first step, no dampening).
    """
    if maximize:
        grad = -grad
    grad = (grad.view(_SAME_WIDTH_INT[grad.dtype]) * mask.to(_SAME_WIDTH_INT[grad.dtype])).view(grad.dtype)
    if decay:
        grad = grad + weight_decay * param
    if buf is not None:
        if first:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad * (1 - dampening))
        grad = grad + momentum * buf if nesterov else buf
    param.sub_(lr * grad)


_compiled_update: Any = None
_compile_failed = False


def _update(*args: Any, **flags: bool) -> None:
    """Run the compiled update, building it at the first call; fall back to eager if it cannot be built."""
    global _compiled_update, _compile_failed
    if not _compile_failed:
        if _compiled_update is None:
            # dynamic: one kernel for every length (weights are passed flat), no recompilation per layer shape.
            _compiled_update = torch.compile(_masked_sgd_update, dynamic=True)
        try:
            _compiled_update(*args, **flags)
            return
        except Exception as error:  # noqa: BLE001 - any failure to build the kernel: the eager update is exact too
            _compile_failed = True
            log.warning("MaskedSGD: torch.compile could not build the masked update (%s); using the eager one",
                        str(error).splitlines()[0] if str(error) else type(error).__name__)  # fmt: skip
    _masked_sgd_update(*args, **flags)


class MaskedSGD(torch.optim.SGD):
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
        self._step_masks: dict[Tensor, Tensor] = {}

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
    def step(self, closure: Any = None) -> Any:  # noqa: D102 - torch.optim.SGD.step
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain: list[Tensor] = []
            scalars: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}  # per step and group, not per weight
            for param in group["params"]:
                if param.grad is None:
                    continue
                mask = self._step_masks.get(param)
                if mask is None:
                    plain.append(param)
                else:
                    self._masked_step(param, mask, group, scalars)
            if plain:
                self._plain_step(plain, group)
        return loss

    def _plain_step(self, params: list[Tensor], group: dict) -> None:
        """``torch.optim.SGD``'s own update for the parameters without a mask."""
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"], momentum=momentum,
            lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            has_sparse_grad=any(p.grad.is_sparse for p in params), foreach=group["foreach"])  # fmt: skip
        for param, buf in zip(params, buffers):
            self.state[param]["momentum_buffer"] = buf

    def _masked_step(
        self, param: Tensor, mask: Tensor, group: dict, scalars: dict[tuple[torch.dtype, torch.device], list[Tensor]]
    ) -> None:
        weight, grad = local(param), local(param.grad)
        momentum = float(group["momentum"])
        state = self.state[param]
        buf = state.get("momentum_buffer") if momentum != 0 else None
        first = momentum != 0 and buf is None
        if first:
            buf = state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if grad.is_sparse or weight.dtype not in _SAME_WIDTH_INT or grad.dtype != weight.dtype:
            raise ValueError(
                f"MaskedSGD masks dense floating-point gradients of the parameter's dtype; got a {grad.dtype}"
                f"{' sparse' if grad.is_sparse else ''} gradient for a {weight.dtype} parameter"
            )
        # 0-d tensors, not Python floats: the compiled kernel would be rebuilt at every new learning rate.
        # Half-precision weights take float32 scalars, as torch's own kernels compute in float32 for them.
        dtype = torch.float32 if weight.element_size() < 4 else weight.dtype
        values = scalars.get((dtype, weight.device))
        if values is None:
            values = scalars[dtype, weight.device] = [
                torch.tensor(float(group[key]), dtype=dtype, device=weight.device)
                for key in ("lr", "weight_decay", "momentum", "dampening")
            ]
        flags = {"first": first, "nesterov": bool(group["nesterov"]), "maximize": bool(group["maximize"]),
                 "decay": float(group["weight_decay"]) != 0}  # fmt: skip
        local_buf = None if buf is None else local(buf)
        if weight.is_contiguous() and grad.is_contiguous() and (local_buf is None or local_buf.is_contiguous()):
            _update(weight.view(-1), grad.view(-1), None if local_buf is None else local_buf.view(-1),
                    mask.reshape(-1).view(torch.uint8), *values, **flags)  # fmt: skip
        else:
            _masked_sgd_update(weight, grad, local_buf, mask.view(torch.uint8), *values, **flags)


# Its update keeps a weight at +0.0 when the weight, its masked gradient and its momentum are 0, as SGD's does.
register_keeps_zeros(MaskedSGD, like=torch.optim.SGD)
