"""Generalized regularized dual averaging with an adaptively weighted l1 penalty.

Reference: J. W. Siegel, J. Chen, P. Zhang, J. Xu, "Training Sparse Neural Networks using Compressed Sensing",
arXiv 2008.09661 (the paper calls the method xRDA; its released code is the ``xRDA`` optimizer with ``l1_prox``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..schedules import half_cosine

__all__ = ["RDA", "RDA_MODES", "check_options", "rda_a_schedule"]

RDA_MODES = ("unstructured", "kernel", "channel")


def rda_a_schedule(step: int, total: int) -> float:
    """Averaging parameter ``a`` at ``step`` of ``total``: 0 (proximal SGD) rising to 1 (l1-RDA) with a cosine.

    ``a = (1 - cos(pi * step / total)) / 2``, held at 1 from ``total`` on, as the released code's cosine
    specification does (there the step counter starts at 1; here at 0, so the first step is pure proximal SGD).
    """
    if total <= 0:
        raise ValueError(f"rda_a_schedule needs total > 0 steps, got {total!r}")
    if step < 0:
        raise ValueError(f"rda_a_schedule needs step >= 0, got {step!r}")
    return half_cosine(min(step, total), total, rising=True)


def check_options(group: dict[str, Any]) -> None:
    """Raise ValueError naming the value and its allowed range for a bad hyperparameter of an RDA param group."""
    checks = (
        ("lr", lambda v: v > 0, "> 0"),
        ("lam", lambda v: v >= 0, ">= 0"),
        ("M", lambda v: v >= 1, ">= 1 (the ratio of the largest to the smallest penalty weight)"),
        ("tau", lambda v: v > 0, "> 0"),
        ("weight_decay", lambda v: v >= 0, ">= 0"),
        ("a", lambda v: 0 <= v <= 1, "in [0, 1] (0: proximal SGD, 1: l1-RDA)"),
        ("step_scale", lambda v: v > 0, "> 0"),
    )
    for key, ok, allowed in checks:
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"RDA: {key} must be a finite number {allowed}, got {value!r}")
    if group["mode"] not in RDA_MODES:
        raise ValueError(f"RDA: mode must be one of {', '.join(RDA_MODES)}; got {group['mode']!r}")
    momentum = group["momentum"]
    if momentum is not None and (
        isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1
    ):
        raise ValueError(f"RDA: momentum must be None (beta = exp(-s / tau)) or a number in [0, 1), got {momentum!r}")
    if group["threshold"] not in (None, True, False):
        raise ValueError(
            f"RDA: threshold must be None (automatic: dim >= 2), True or False; got {group['threshold']!r}"
        )


def _group_dims(param: Tensor, mode: str) -> tuple[int, ...] | None:
    """Dimensions reduced to form one penalty group, or None for elementwise (unstructured) penalties.

    Only convolution weights (dim >= 3) are grouped: 'kernel' groups each (out, in) kernel, 'channel' each output
    channel. Linear weights have no kernels, and grouping their rows would let the penalty delete whole classes of
    the classifier, so they stay elementwise in every mode (as in the released code).
    """
    if param.dim() < 3 or mode == "unstructured":
        return None
    if mode == "kernel":
        return tuple(range(2, param.dim()))
    return tuple(range(1, param.dim()))


class RDA(torch.optim.Optimizer):
    """Generalized RDA (xRDA) with the adaptively weighted l1 penalty of Siegel et al. (arXiv 2008.09661).

    Per weight tensor W with state ``w_hat`` (the dual iterate), ``v`` (velocity), ``r`` (running |W|) and
    ``T`` (accumulated threshold), with step ``s = step_scale * lr`` and ``beta = exp(-s / tau)``, one step is::

        g     = grad + weight_decay * W
        r     = beta * r + (1 - beta) * |W|
        c     = M / (1 + (M - 1) * r / max(r))          # in [1, M]: small weights get the large penalty
        T     = a * T + s * c
        w_hat = a * w_hat + (1 - a) * W
        v     = beta * v + (1 - beta) * g
        w_hat = w_hat - s * v
        W     = sign(w_hat) * max(|w_hat| - lam * T, 0)  # soft threshold

    ``a = 0`` is proximal SGD (with the exponentially averaged gradient ``v`` as momentum), ``a = 1`` is l1-RDA:
    ``w_hat`` then accumulates every step and ``T`` every threshold, so a pruned weight comes back only when its
    averaged gradient outweighs its penalty. ``lr`` and ``a`` live in the param groups and are scheduled by the
    caller, like any torch learning rate: :func:`rda_a_schedule` raises ``a`` from 0 to 1 with a cosine, as in the
    released code, and the ``rda`` method does that for you.

    Modes (per param group; only convolution weights, dim >= 3, are grouped, Linear weights stay elementwise):
      - ``unstructured``: r, c, T and the threshold are elementwise.
      - ``kernel``: one group per (out, in) kernel of a conv weight (out, in, k...); ``channel``: one group per
        output channel. r is the running l2 norm of each group, ``c = sqrt(n) * M / (1 + (M - 1) r / max r)``
        with n the group size (the usual group-lasso weight, so ``lam`` has the same per-weight strength as in
        unstructured mode, as in the released code), T accumulates per group, and the group soft threshold is
        ``W = w_hat * max(1 - lam * T / ||w_hat||, 0)``: a group whose norm falls under ``lam * T`` is zeroed
        as a whole.

    Parameters that are not thresholded (group option ``threshold=False``; ``None``, the default, means
    "threshold the parameters with dim >= 2", so biases and norm scales never are) take the same averaged-gradient
    step ``W = W - s * v`` and no penalty. They keep no ``w_hat``: without a threshold it always equals W.

    Scaling (``step_scale``): the paper's step ``s`` multiplies an *average* of gradients (``v``), where SGD with
    momentum 0.9 multiplies a *sum* that is 1 / (1 - 0.9) = 10 times larger. The released CIFAR recipe uses s = 1
    and tau = 9.5, i.e. ``beta = 0.9``: the same update as SGD with lr 0.1 and momentum 0.9. So ``s = step_scale *
    lr`` with ``step_scale = 10`` by default: ``lr`` means what it means for SGD with momentum 0.9 (0.05-0.1 in
    this library's trainer), and the released defaults (lam 1e-6, M 500, tau 9.5, weight decay 5e-4) apply
    unchanged; at lr = 0.1 this is exactly the released recipe. Pass ``step_scale=1`` to give ``s`` directly.

    The velocity's decay ``beta = exp(-s / tau)`` ties its window to the step: as a schedule takes lr towards 0 the
    window grows to ``tau / s`` steps and the update shrinks like ``s^2``, as in the paper. Group option
    ``momentum`` (None by default) fixes ``beta`` instead, giving SGD-with-momentum dynamics at any lr; the ``rda``
    method uses ``momentum=0.9`` for the fine-tuning after its prune, where lr is near the end of its schedule.

    Sparsity is an outcome of ``lam``, not a target: a weight survives where its averaged gradient pressure beats
    ``lam * c``. A larger ``lam`` gives more zeros.

    Args:
        params: parameters or param groups. Group options: lr, lam, M, tau, weight_decay, a, mode, threshold,
            step_scale, momentum.
        lr: learning rate (on the scale of SGD with momentum 0.9, see above); must be > 0.
        lam: l1 strength lambda >= 0.
        M: ratio of the largest to the smallest penalty weight, >= 1 (1: plain l1).
        tau: time scale of the averages r and v, in units of s; > 0.
        weight_decay: l2 coefficient added to the gradient, >= 0.
        a: averaging parameter in [0, 1].
        mode: 'unstructured', 'kernel' or 'channel'.
        threshold: None (automatic: dim >= 2), True or False.
        step_scale: s = step_scale * lr; > 0.
        momentum: None (beta = exp(-s / tau), the paper's rule) or a fixed beta in [0, 1).

    Differences from the paper and its released code: ``s = 10 lr`` (see Scaling) instead of a raw step size;
    weight decay is added to a copy of the gradient, never to ``p.grad`` in place; biases and norm parameters are
    not thresholded (the released code thresholds every parameter); the running averages ``r`` of the group modes
    are group l2 norms (the released kernel prox averages mean absolute values but thresholds l2 norms); a tensor
    whose running average is all zero (a zero-initialised layer) gets no penalty that step, as in the released code.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        lam: float = 1e-6,
        M: float = 500.0,
        tau: float = 9.5,
        weight_decay: float = 5e-4,
        a: float = 0.0,
        mode: str = "unstructured",
        threshold: bool | None = None,
        step_scale: float = 10.0,
        momentum: float | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            lam=lam,
            M=M,
            tau=tau,
            weight_decay=weight_decay,
            a=a,
            mode=mode,
            threshold=threshold,
            step_scale=step_scale,
            momentum=momentum,
        )
        check_options(defaults)  # fail on bad defaults even if every group overrides them
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_options(self.param_groups[-1])

    @staticmethod
    def thresholded(group: dict[str, Any], param: Tensor) -> bool:
        """Whether ``param`` in ``group`` gets the l1 penalty."""
        return param.dim() >= 2 if group["threshold"] is None else bool(group["threshold"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # lr and a are rewritten by schedulers between steps; a schedule may end at lr 0 (a no-op step).
            if not group["lr"] >= 0 or not 0 <= group["a"] <= 1:
                raise ValueError(
                    f"RDA: need lr >= 0 and a in [0, 1] at every step, got lr={group['lr']!r}, a={group['a']!r}"
                )
            s = group["step_scale"] * group["lr"]
            beta = math.exp(-s / group["tau"]) if group["momentum"] is None else float(group["momentum"])
            a, lam, wd = group["a"], group["lam"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("RDA does not support sparse gradients")
                state = self.state[param]
                thresholded = self.thresholded(group, param)
                if "v" not in state:
                    self._init_state(param, state, group, thresholded)
                # v = beta v + (1 - beta) (grad + wd W), without materialising the decayed gradient.
                v = state["v"].mul_(beta).add_(param.grad, alpha=1.0 - beta)
                if wd != 0:
                    v.add_(param, alpha=(1.0 - beta) * wd)
                if not thresholded:
                    param.add_(v, alpha=-s)  # without a threshold w_hat is W: the plain averaged-gradient step
                    continue
                self._threshold_step(param, state, group, s=s, beta=beta, a=a, lam=lam)
        return loss

    @staticmethod
    def _init_state(param: Tensor, state: dict[str, Any], group: dict[str, Any], thresholded: bool) -> None:
        state["v"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if thresholded:
            dims = _group_dims(param, group["mode"])
            magnitude_shape = param.shape if dims is None else param.shape[: param.dim() - len(dims)]
            state["w_hat"] = param.detach().clone(memory_format=torch.preserve_format)
            state["r"] = param.new_zeros(magnitude_shape)
            state["T"] = param.new_zeros(magnitude_shape)

    @staticmethod
    def _threshold_step(
        param: Tensor, state: dict[str, Any], group: dict[str, Any], *, s: float, beta: float, a: float, lam: float
    ) -> None:
        # The order follows the update rule in the class docstring; v is already updated by step().
        dims = _group_dims(param, group["mode"])
        w_hat, v, r, T = state["w_hat"], state["v"], state["r"], state["T"]
        M = group["M"]

        # Adaptive weights from the running magnitude of the current (pre-step) weights.
        magnitude = param.abs() if dims is None else torch.linalg.vector_norm(param, dim=dims)
        r.lerp_(magnitude, 1.0 - beta)
        r_max = r.max()
        # c = top / (1 + (M - 1) r / max r), with top = M (times sqrt(group size) in the group modes, the usual
        # group-lasso weight). An all-zero r (a zero-initialised tensor) gives top = 0: no penalty that step, as
        # in the released code. Scalars stay 0-dim tensors so the step never synchronises with the device.
        top = M * (math.sqrt(math.prod(param.shape[d] for d in dims)) if dims is not None else 1.0)
        top = (r_max > 0).to(r.dtype) * top
        c = r.div(r_max.clamp(min=torch.finfo(r.dtype).tiny)).mul_(M - 1.0).add_(1.0).reciprocal_().mul_(top)
        T.mul_(a).add_(c, alpha=s)

        w_hat.mul_(a).add_(param, alpha=1.0 - a).add_(v, alpha=-s)

        if dims is None:
            # sign(w_hat) * max(|w_hat| - lam T, 0). copysign gives -0.0 where a negative weight vanishes; adding
            # +0.0 turns it into +0.0 (IEEE: -0 + +0 = +0), so zeros look the same whatever their history.
            shrunk = torch.sub(w_hat.abs(), T, alpha=lam).clamp_(min=0)
            torch.copysign(shrunk, w_hat, out=param).add_(0.0)
        else:
            norms = torch.linalg.vector_norm(w_hat, dim=dims, keepdim=True)
            shrink = (1.0 - lam * T.view(norms.shape) / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp_(min=0)
            param.copy_(w_hat * shrink)
