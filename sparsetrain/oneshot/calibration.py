"""Calibration inputs for post-training pruning: each layer's Hessian from the inputs it sees.

For a layer computing ``W x``, the layer-wise reconstruction error ``||W X - W' X||^2 / N`` is the quadratic
``(w - w')^T H (w - w') / 2`` in every output row, with ``H = 2 X X^T / N`` over the N input vectors the layer
receives (Frantar & Alistarh, NeurIPS 2022, "Optimal Brain Compression", arXiv 2208.11580). A convolution is a
Linear layer on its unfolded input patches, so the same holds with the columns of ``unfold(x)`` as the inputs.

The inputs are captured with forward hooks while calibration batches (training samples, never the test set) run
through the model. Pruning is sequential: the caller captures a layer, prunes it, then captures the next one, so
each layer sees the inputs produced by the already pruned layers before it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.selection import input_dim

__all__ = ["exact_obs_supported", "solver_weight", "layer_columns", "execution_order", "layer_hessian",
           "calibration_inputs"]

log = logging.getLogger(__name__)


def _is_conv1d(module: nn.Module) -> bool:
    # Hugging Face's Conv1D (GPT-2), recognised as the N:M layout does, without importing transformers.
    return isinstance(getattr(module, "weight", None), Tensor) and input_dim(module, "weight") == 0


def solver_weight(module: nn.Module) -> Tensor:
    """``module.weight`` with one row per output unit, as the per-layer solvers take it: the weight itself, or
    a transposed view of a Hugging Face ``Conv1D``'s (in, out) weight, which computes ``x @ weight + bias``
    and so is the Linear layer of weight ``weight.T`` on the same inputs (same Hessian)."""
    return module.weight.T if _is_conv1d(module) else module.weight


def exact_obs_supported(module: nn.Module) -> str | None:
    """``None`` when ``module`` can take the exact (Hessian-based) path, else why not (for a logged note).

    ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2; solved on its transposed weight, see ``solver_weight``) and
    ``nn.Conv2d`` with ``groups=1``, zero padding given as numbers. Depthwise and grouped convolutions have one
    small Hessian per group; they are left to magnitude pruning.
    """
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"a grouped/depthwise Conv2d (groups={module.groups})"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return f"a Conv2d with padding={module.padding!r}, padding_mode={module.padding_mode!r}"
        return None
    return f"a {type(module).__name__} (only Linear, Conv1D and Conv2d are solved exactly)"


def layer_columns(module: nn.Module, x: Tensor) -> Tensor:
    """The input vectors of ``module`` for input ``x`` as rows of a (count, in_features) matrix.

    Linear: every leading index is one vector. Conv2d: ``unfold`` with the layer's kernel, stride, padding and
    dilation gives one patch per output position, laid out (channel, kernel row, kernel column) like
    ``weight.reshape(out_channels, -1)``.
    """
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        patches = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )  # (batch, C*kh*kw, positions)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _inputs(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibration_inputs(batches: Iterable[Any], num_samples: int | None = None) -> list[Tensor]:
    """The input tensors of ``batches`` (tensors or ``(inputs, targets, ...)``), cut to ``num_samples`` in all.

    Raises:
        ValueError: ``num_samples`` < 1, or no sample at all.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"the number of calibration samples must be a positive integer, got {num_samples!r}")
    out: list[Tensor] = []
    seen = 0
    for batch in batches:
        x = _inputs(batch)
        if num_samples is not None:
            x = x[: num_samples - seen]
        if x.shape[0]:
            out.append(x)
            seen += int(x.shape[0])
        if num_samples is not None and seen >= num_samples:
            break
    if not out:
        raise ValueError("no calibration data: the calibration batches yielded no sample (pass training inputs)")
    return out


@torch.no_grad()
def execution_order(model: nn.Module, modules: Sequence[nn.Module], sample: Tensor) -> list[nn.Module]:
    """``modules`` in the order of their first call in one forward pass on ``sample``; uncalled ones left out."""
    order: list[nn.Module] = []
    wanted = {id(m) for m in modules}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) in wanted and module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        model(sample)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def layer_hessian(model: nn.Module, module: nn.Module, inputs: Sequence[Tensor], damping: float = 0.01) -> Tensor:
    """``H = 2 X X^T / N + damping * mean(diag) * I`` (float64) of ``module``'s inputs over a pass of ``inputs``.

    ``model`` runs in its current mode (the caller puts it in eval mode); every call of ``module`` counts, so a
    layer used twice per forward pass sees both inputs. Damping keeps H invertible when some inputs are always
    zero (image borders, dead units); 1% of the mean diagonal as in the OBC paper.
    """
    device = next(module.parameters()).device
    d = solver_weight(module)[0].numel()
    xtx = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        nonlocal count
        cols = layer_columns(mod, args[0].detach()).to(torch.float64)
        xtx.addmm_(cols.T, cols)
        count += cols.shape[0]

    handle = module.register_forward_pre_hook(hook)
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        handle.remove()
    if count == 0:
        raise ValueError("the layer received no input during calibration")
    hessian = 2.0 * xtx / count
    diag = torch.diagonal(hessian)
    damp = damping * float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    diag += damp
    return hessian


def weight_rows_and_hessian(weight: Tensor, hessian: Tensor) -> tuple[Tensor, Tensor]:
    """The layer's weight as float64 rows (output units x inputs, conv kernels flattened as ``unfold`` orders
    them) and its Hessian in float64 on the same device: what both per-layer solvers work on.

    Raises:
        ValueError: the Hessian is not (inputs, inputs).
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    d = w.shape[1]
    h = hessian.to(device=w.device, dtype=torch.float64)
    if h.shape != (d, d):
        raise ValueError(
            f"hessian must be ({d}, {d}) for a weight of shape {tuple(weight.shape)}, got {tuple(h.shape)}"
        )
    return w, h
