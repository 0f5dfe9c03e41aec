"""Calibration inputs for post-training pruning: each layer's Hessian from the inputs it sees.

For a layer computing ``W x``, the layer-wise reconstruction error ``||W X - W' X||^2 / N`` is the quadratic
``(w - w')^T H (w - w') / 2`` in every output row, with ``H = 2 X X^T / N`` over the N input vectors the layer
receives (Frantar & Alistarh, NeurIPS 2022, "Optimal Brain Compression", arXiv 2208.11580). A convolution is a
Linear layer on its unfolded input patches, so the same holds with the columns of ``unfold(x)`` as the inputs.

The inputs are captured with forward hooks while calibration batches (training samples, never the test set) run
through the model. Pruning is sequential: the caller captures a layer, prunes it, then captures the next one, so
each layer sees the inputs produced by the already pruned layers before it.

A calibration batch is a tensor (the model's input), an ``(inputs, targets, ...)`` tuple or list, or a mapping in
the Hugging Face form, ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``: the model is then called as
``model(**inputs)`` with every entry but ``labels`` (``model_inputs``), and ``labels`` are the targets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..core.selection import input_dim

__all__ = ["exact_obs_supported", "solver_weight", "layer_columns", "execution_order", "layer_hessian",
           "calibration_inputs", "model_inputs", "batch_targets", "run_model", "ModelInput"]

log = logging.getLogger(__name__)

# What the model is called on: a tensor, ``model(x)``, or keyword arguments, ``model(**x)``.
ModelInput = Tensor | dict[str, Any]


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


_BATCH_FORMS = ("a tensor, an (inputs, targets, ...) tuple or list whose inputs are a tensor, or a mapping of "
                "the model's keyword arguments such as {'input_ids': ..., 'attention_mask': ..., 'labels': ...}")


def model_inputs(batch: Any) -> ModelInput:
    """What the model is called on for one calibration batch: a tensor batch itself, the first element of an
    ``(inputs, targets, ...)`` tuple or list, or a mapping's entries but ``labels``, as keyword arguments
    (``run_model``): ``{"input_ids": ids, "attention_mask": m, "labels": y}`` gives ``model(input_ids=ids,
    attention_mask=m)``. The samples are along dim 0 of every tensor.

    Raises:
        ValueError: any other batch (the message names its type and what is allowed).
    """
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
        if isinstance(batch, Mapping):
            raise ValueError(f"a calibration batch must be {_BATCH_FORMS}; got a {type(batch).__name__} inside a "
                             "tuple or list (pass the mapping itself, with its 'labels')")
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if not all(isinstance(k, str) for k in inputs) or not any(isinstance(v, Tensor) for v in inputs.values()):
            raise ValueError(f"a calibration batch mapping must map keyword names to tensors (besides 'labels'), "
                             f"got keys {list(batch)!r}")
        return inputs
    raise ValueError(f"a calibration batch must be {_BATCH_FORMS}; got a {type(batch).__name__}")


def batch_targets(batch: Any) -> Tensor | None:
    """The targets of a calibration batch: the second element of a tuple or list, a mapping's ``labels``, else
    None."""
    if isinstance(batch, (tuple, list)):
        return batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        return labels if isinstance(labels, Tensor) else None
    return None


def sample_count(x: ModelInput) -> int:
    """How many samples ``x`` holds (dim 0; of a mapping's first tensor)."""
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else 1
    return next(int(v.shape[0]) for v in x.values() if isinstance(v, Tensor))


def take(x: ModelInput, n: int) -> ModelInput:
    """The first ``n`` samples of ``x`` (every tensor of a mapping cut along dim 0)."""
    return index(x, slice(None, n))


def to_device(x: ModelInput, device: torch.device) -> ModelInput:
    """``x`` with its tensors on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in x.items()}


def concat(xs: Sequence[ModelInput]) -> ModelInput:
    """The samples of ``xs`` in one batch (a mapping's tensors concatenated key by key, its other values taken
    from the first)."""
    if isinstance(xs[0], Tensor):
        return torch.cat(list(xs))  # type: ignore[arg-type]
    return {k: torch.cat([x[k] for x in xs]) if isinstance(v, Tensor) else v  # type: ignore[index]
            for k, v in xs[0].items()}


def index(x: ModelInput, rows: Tensor | slice) -> ModelInput:
    """The samples ``rows`` (indices or a slice) of ``x``."""
    if isinstance(x, Tensor):
        return x[rows]
    return {k: v[rows] if isinstance(v, Tensor) and v.dim() else v for k, v in x.items()}


def run_model(model: nn.Module, x: ModelInput) -> Any:
    """``model(x)``, or ``model(**x)`` for keyword arguments."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def calibration_inputs(batches: Iterable[Any], num_samples: int | None = None) -> list[ModelInput]:
    """What the model is called on for each of ``batches`` (``model_inputs``), cut to ``num_samples`` in all.

    Raises:
        ValueError: ``num_samples`` < 1, a batch of another form, or no sample at all.
    """
    return collect_batches(batches, num_samples)[0]


def collect_batches(batches: Iterable[Any], num_samples: int | None = None
                    ) -> tuple[list[ModelInput], list[Tensor] | None]:
    """The model inputs (``model_inputs``) and targets (``batch_targets``; None unless every batch has them) of
    ``batches``, cut to ``num_samples`` in all.

    Raises:
        ValueError: ``num_samples`` < 1, a batch of another form, or no sample at all.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                    or num_samples < 1):
        raise ValueError(f"the number of calibration samples must be a positive integer, got {num_samples!r}")
    inputs: list[ModelInput] = []
    targets: list[Tensor] | None = []
    seen = 0
    for batch in batches:
        x, y = model_inputs(batch), batch_targets(batch)
        size = sample_count(x)
        cut = size if num_samples is None else min(size, num_samples - seen)
        if cut > 0:
            inputs.append(take(x, cut))
            if y is None or targets is None:
                targets = None
            else:
                targets.append(y[:cut])
            seen += cut
        if num_samples is not None and seen >= num_samples:
            break
    if not inputs:
        raise ValueError("no calibration data: the calibration batches yielded no sample (pass training inputs)")
    return inputs, targets


@torch.no_grad()
def execution_order(model: nn.Module, modules: Sequence[nn.Module], sample: ModelInput) -> list[nn.Module]:
    """``modules`` in the order of their first call in one forward pass on ``sample``; uncalled ones left out."""
    order: list[nn.Module] = []
    wanted = {id(m) for m in modules}

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) in wanted and module not in order:
            order.append(module)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        run_model(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def layer_hessian(model: nn.Module, module: nn.Module, inputs: Sequence[ModelInput],
                  damping: float = 0.01) -> Tensor:
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
            run_model(model, to_device(x, device))
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
