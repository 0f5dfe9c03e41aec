"""One-shot M-FAC pruning of a trained model: Optimal Brain Surgeon with a block-wise inverse empirical Fisher.

Reference: E. Frantar, E. Kurtic, D. Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (arXiv 2107.03356); the saliency and the weight update are Optimal Brain Surgeon's
(Hassibi & Stork 1993).

The loss near the trained weights w is modelled by the damped empirical Fisher of m calibration gradients::

    F = damp * I + (1/m) sum_i g_i g_i^T

cut into blocks of B consecutive weights of the flattened, concatenated pruned parameters (block-diagonal F, one
m x m Woodbury system per block: ``sparsetrain.mfac.MFACInverse``). Removing weight i alone costs
``w_i^2 / (2 [F^-1]_ii)`` (its saliency); the weights are ranked by it over all layers at once (``global``), or
per layer. Removing the whole chosen set Q of a block at once is OBS's multi-weight step::

    dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q,      loss increase  w_Q^T (F^-1[Q, Q])^-1 w_Q / 2

applied exactly, block by block, for any size of Q. The |Q| x |Q| matrix is never formed: with R the block's other
coordinates, (F^-1[Q, Q])^-1 is the Schur complement F_QQ - F_QR F_RR^-1 F_RQ, and for F = damp I + G^T G / m
the update reduces to (push-through identity, G_Q / G_R the gradient columns in Q / R, u = G_Q w_Q)::

    dw_Q = -w_Q,      dw_R = G_R^T (m damp I + G_R G_R^T)^-1 u,
    loss increase = damp (|w_Q|^2 + u^T (m damp I + G_R G_R^T)^-1 u) / 2

one m x m Cholesky solve per block, O(m^2 d + m^3 blocks) in all, whatever |Q| is. So the exact set update is
cheaper than the M-FAC paper's iteration in small steps would be, and nothing is approximated beyond F itself.

``steps`` > 1 prunes in several rounds to densities (1 - s)^(j / steps), recomputing the gradients at the pruned
(and corrected) weights before each round, as the M-FAC and WoodFisher papers do to go beyond the range where one
quadratic model holds. Weights pruned in an earlier round stay zero: their gradient columns are masked, so they
decouple (F = damp I there) and are never moved again.

Gradients: m distinct gradients of the training loss (cross-entropy of the logits by default; for Hugging Face
mapping batches, the ``loss`` the model returns for their ``labels``) on calibration samples from the training set,
each over a small batch of b = num_samples // m samples and scaled by sqrt(b), so that
(1/m) sum g g^T estimates the per-sample empirical Fisher whatever b is (and ``damp`` keeps one meaning). The
model runs in eval mode for them (batch norm uses its running statistics, dropout is off). Memory: the m x d
gradients in float64 (m * d * 8 bytes) plus m x m per block.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.selection import input_dim
from ..distributions import layer_sparsities
from ..maskops import check_sparsity, global_topk_masks, nm_mask, parse_nm, topk_mask
from ..mfac import MFACInverse
from .calibration import ModelInput, batch_targets, concat, index, model_inputs, sample_count, take, to_device
from .database import _output_tensor
from .magnitude import prune_oneshot

__all__ = ["prune_mfac", "fisher_gradients", "obs_remove", "DEFAULT_GRADIENTS", "DEFAULT_RELATIVE_DAMP",
           "DEFAULT_BLOCK"]

log = logging.getLogger(__name__)

DEFAULT_GRADIENTS = 256
DEFAULT_RELATIVE_DAMP = 0.01
DEFAULT_BLOCK: int | None = None


def _check_int(value: Any, what: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _check_damp(damp: Any) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"damp (the Fisher's dampening lambda) must be a finite number > 0, got {damp!r}")
    return float(damp)


def _default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy of a model's logits: (N, C) against labels (N,), a language model's (N, T, C) against
    its next tokens (N, T) averaged over every position (as the trainer scores them), or the ``.logits`` of a
    Hugging Face model output (``GPT2LMHeadModel(input_ids)`` returns one, not a tensor)."""
    logits = _output_tensor(outputs)
    if logits.dim() == 3:
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return nn.functional.cross_entropy(logits, targets)


_NEEDS_TARGETS = ("M-FAC calibration batches must be (inputs, targets, ...) tuples or Hugging Face mappings with "
                  "'labels': the Fisher is made of gradients of the training loss, which needs the targets")


def _batches_of_samples(batches: Iterable[Any], count: int, size: int) -> list[tuple[ModelInput, Tensor]]:
    """``count`` (inputs, targets) pairs of ``size`` samples each, cut from ``batches``; fewer if they run out.
    A mapping batch gives its entries but ``labels`` as the inputs (keyword arguments) and ``labels`` as targets."""
    xs: list[ModelInput] = []
    ys: list[Tensor] = []
    need = count * size
    seen = 0
    for batch in batches:
        y = batch_targets(batch)
        if y is None:
            what = (f"a mapping with keys {list(batch)!r}" if isinstance(batch, Mapping) else
                    f"a {type(batch).__name__}" + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
            raise ValueError(f"{_NEEDS_TARGETS}; got {what}")
        x = model_inputs(batch)
        cut = min(sample_count(x), need - seen)
        xs.append(take(x, cut))
        ys.append(y[:cut])
        seen += cut
        if seen >= need:
            break
    if not xs or seen == 0:
        raise ValueError("no calibration data: the calibration batches yielded no sample (pass training batches)")
    x, y = concat(xs), torch.cat(ys)
    full = seen // size
    return [(index(x, slice(i * size, (i + 1) * size)), y[i * size : (i + 1) * size]) for i in range(full)]


def _batch_loss(model: Callable[..., Any], x: ModelInput, y: Tensor,
                loss_fn: Callable[[Tensor, Tensor], Tensor] | None) -> Tensor:
    """The mean loss of one batch. Keyword inputs (a mapping batch) without ``loss_fn``: the ``loss`` the model
    returns when called with ``labels=y`` too (a Hugging Face model's own loss, e.g. the shifted next-token
    cross-entropy of a causal LM); with ``loss_fn``, ``loss_fn(logits, y)``. Else ``loss_fn`` (default
    cross-entropy) on ``model(x)``."""
    if isinstance(x, Mapping):
        if loss_fn is None:
            out = model(**x, labels=y)
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            if not isinstance(loss, Tensor):
                raise ValueError(f"the model returned no 'loss' for a batch with 'labels' (its output is a "
                                 f"{type(out).__name__}): pass loss_fn(outputs, labels)")
            return loss
        return loss_fn(_output_tensor(model(**x)), y)
    return (loss_fn or _default_loss)(model(x), y)


def fisher_gradients(
    model: nn.Module,
    params: Sequence[Tensor],
    batches: Sequence[tuple[ModelInput, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """One gradient per batch of the mean loss w.r.t. ``params``, flattened and concatenated, times sqrt(batch).

    Returns (len(batches), d) in float64 on the parameters' device. The model runs in eval mode; its modes and
    the parameters' ``.grad`` are restored. Coordinates where ``masks`` (one bool tensor per parameter) are
    False get 0: pruned weights stay fixed at zero, so the quadratic model is over the surviving ones.

    Batches of equal size are done in vectorised passes (``torch.func.vmap`` over the batches, 32 at a time),
    which is what makes per-sample gradients affordable; a model that ``vmap`` cannot run (data-dependent
    control flow, unsupported in-place ops) falls back to one backward pass per batch, with the same result.
    """
    params = list(params)
    device = params[0].device
    d = sum(p.numel() for p in params)
    out = torch.empty(len(batches), d, dtype=torch.float64, device=device)
    modes = {m: m.training for m in model.modules()}
    saved = [p.grad for p in params]
    try:
        model.eval()
        done = False
        if len({sample_count(x) for x, _ in batches}) == 1:
            try:
                _vmapped_gradients(model, params, batches, loss_fn, out)
                done = True
            except Exception as error:  # noqa: BLE001 - any vmap limitation: the loop below computes the same
                log.info("M-FAC: vectorised gradients failed (%s: %s); one backward pass per gradient instead",
                         type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        if not done:
            _looped_gradients(model, params, batches, loss_fn, out)
        scale = [math.sqrt(sample_count(x)) for x, _ in batches]
        out *= torch.tensor(scale, dtype=torch.float64, device=device).unsqueeze(1)
        if masks is not None:
            out *= torch.cat([mk.reshape(-1) for mk in masks]).to(device)
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        for m, training in modes.items():
            m.train(training)
    return out


def _looped_gradients(model: nn.Module, params: list[Tensor], batches: Sequence[tuple[ModelInput, Tensor]],
                      loss_fn: Callable[[Tensor, Tensor], Tensor] | None, out: Tensor) -> None:
    """``out[i]`` = the flat gradient of batch i, by one backward pass per batch (any model, any batch sizes)."""
    device = params[0].device
    for i, (x, y) in enumerate(batches):
        with torch.enable_grad():
            loss = _batch_loss(model, to_device(x, device), y.to(device), loss_fn)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        out[i] = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                            for p, g in zip(params, grads)]).to(torch.float64)


def _vmapped_gradients(model: nn.Module, params: list[Tensor], batches: Sequence[tuple[ModelInput, Tensor]],
                       loss_fn: Callable[[Tensor, Tensor], Tensor] | None, out: Tensor) -> None:
    """``out[i]`` = the flat gradient of batch i (equal sizes), by ``vmap(grad(...))`` over the batches."""
    from torch.func import functional_call, grad, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = params[0].device
    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    fixed = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in names}

    def loss_of(free: dict[str, Tensor], x: ModelInput, y: Tensor) -> Tensor:
        def call(*args: Any, **kwargs: Any) -> Any:
            return functional_call(model, {**fixed, **free}, args, kwargs)

        return _batch_loss(call, x, y, loss_fn)

    per_batch = vmap(grad(loss_of), in_dims=(None, 0, 0), chunk_size=32)
    first = batches[0][0]
    x: ModelInput = (torch.stack([b[0] for b in batches]) if isinstance(first, Tensor) else  # type: ignore[misc]
                     {k: torch.stack([b[0][k] for b in batches]) for k in first})  # type: ignore[index]
    x = to_device(x, device)
    y = torch.stack([b[1] for b in batches]).to(device)
    free = {n: p.detach() for n, p in zip(names, params)}
    # Attention through scaled_dot_product_attention (the zoo's gpt and vit, Hugging Face models with "sdpa") runs
    # a fused kernel that vmap has no batching rule for: vmap would warn and run it one batch at a time. The math
    # backend is plain matmul and softmax, which vmap batches; same gradients (to rounding), and faster here.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        grads = per_batch(free, x, y)
    offset = 0
    for n, p in zip(names, params):
        out[:, offset : offset + p.numel()] = grads[n].reshape(len(batches), -1)
        offset += p.numel()


@torch.no_grad()
def obs_remove(inverse: MFACInverse, weights: Tensor, remove: Tensor) -> tuple[Tensor, float]:
    """The exact OBS step that zeroes the weights in ``remove`` (bool, shape (d,)), block by block.

    ``inverse`` is the block-wise F = damp I + G^T G / m. In each block, with Q the removed coordinates and R the
    others, the step is ``dw = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q``, computed as ``dw_Q = -w_Q``,
    ``dw_R = G_R^T (m damp I + G_R G_R^T)^-1 G_Q w_Q`` (one m x m solve per block; see the module docstring).

    Returns:
        ``(dw, loss_increase)``: dw of shape (d,) in ``weights``' dtype, with ``weights + dw`` exactly 0 on
        ``remove``; and the predicted increase of the quadratic model, sum over blocks of
        ``w_Q^T (F^-1[Q, Q])^-1 w_Q / 2``.
    """
    d, size, blocks = inverse.d, inverse.block_size, inverse.blocks
    if weights.shape != (d,) or remove.shape != (d,):
        raise ValueError(f"obs_remove needs weights and remove of shape ({d},), got {tuple(weights.shape)} and "
                         f"{tuple(remove.shape)}")
    grads = inverse.grads  # (blocks, m, B)
    pad = blocks * size - d
    w = nn.functional.pad(weights.to(grads), (0, pad)).reshape(blocks, size)
    q = nn.functional.pad(remove.to(device=grads.device, dtype=torch.bool), (0, pad)).reshape(blocks, size)
    wq = torch.where(q, w, torch.zeros_like(w))
    u = torch.bmm(grads, wq.unsqueeze(2))  # (blocks, m, 1): G_Q w_Q
    rest = grads * (~q).unsqueeze(1)  # G_R: the removed columns zeroed
    system = torch.bmm(rest, rest.transpose(1, 2))
    system.diagonal(dim1=1, dim2=2).add_(inverse.m * inverse.damp)
    solved = torch.cholesky_solve(u, torch.linalg.cholesky(system))  # (m damp I + K_R)^-1 u
    dw = torch.bmm(rest.transpose(1, 2), solved).squeeze(2) - wq
    increase = inverse.damp * (wq.square().sum() + (u * solved).sum()) / 2
    return dw.reshape(-1)[:d].to(weights.dtype), float(increase)


def _masks_from_scores(scores: dict[str, Tensor], sparsity: float | None, mask_type: str,
                       distribution: str, input_dims: dict[str, int]) -> dict[str, Tensor]:
    """Exact masks (True = kept) from ``scores`` as every method makes them: N:M (along each weight's
    ``input_dims`` entry), global or per-layer top-k."""
    nm = parse_nm(mask_type)
    if nm is not None:
        return {n: nm_mask(s, *nm, input_dims[n]) for n, s in scores.items()}
    per_layer = layer_sparsities(distribution, {n: tuple(s.shape) for n, s in scores.items()}, sparsity)
    if per_layer is None:
        return global_topk_masks(scores, sparsity)
    return {n: topk_mask(s, per_layer[n]) for n, s in scores.items()}


def _unflatten(flat: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, p in params.items():
        out[name] = flat[offset : offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return out


@torch.no_grad()
def prune_mfac(
    model: nn.Module,
    sparsity: float | None,
    calibration_batches: Iterable[Any],
    *,
    num_gradients: int = DEFAULT_GRADIENTS,
    num_samples: int | None = None,
    block_size: int | None = DEFAULT_BLOCK,
    damp: float | None = None,
    steps: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    mask_type: str = "unstructured",
    distribution: str = "global",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` **in place** by one-shot M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv 2107.03356).

    Ranks the weights by the OBS saliency ``w_i^2 / (2 [F^-1]_ii)`` with F the block-wise damped empirical
    Fisher of ``num_gradients`` calibration gradients, prunes to ``sparsity`` under ``distribution`` (default
    one global ranking over all pruned layers) and applies the exact multi-weight OBS correction to the remaining
    weights of each block (module docstring). Biases and unpruned parameters are not changed. Re-calibrate
    batch norm afterwards (``recalibrate_batchnorm``), as after any one-shot pruning.

    Args:
        model: the trained model (its modes are restored afterwards).
        sparsity: fraction of zeros in [0, 1); for N:M leave it None.
        calibration_batches: training batches of ``(inputs, targets, ...)``, or Hugging Face mappings with
            ``labels`` (``{"input_ids": ..., "attention_mask": ..., "labels": ...}``); never the test set.
        num_gradients: m, the number of gradients in the Fisher (>= 1).
        num_samples: calibration samples in all (>= m; default m): m gradients of ``num_samples // m`` samples
            each (1: per-sample gradients).
        block_size: B, weights per block of the block-diagonal Fisher (1 <= B <= d, the number of pruned
            weights); None: one block of all d weights.
        damp: the dampening lambda added to the Fisher's diagonal (> 0), on the per-sample gradient scale;
            None (default): 1% of the mean diagonal of (1/m) sum g g^T, so that the default does not depend on
            the loss and model's scale (lambda = 1e-6 is 0.2% on a LeNet-300-100, 0.05% on a LeNet-5).
        steps: pruning rounds (>= 1), each to density (1 - s)^(j / steps) with gradients recomputed at the
            pruned weights; 1: one-shot from the dense weights' gradients.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch (default cross-entropy of the logits:
            (N, C) against (N,) labels, a language model's (N, T, C) against (N, T) next tokens, or a Hugging Face
            output's ``.logits``). For mapping batches the default is the model's own: ``model(**batch).loss``
            with the labels passed; a given ``loss_fn`` gets the output's logits and the labels instead.
        mask_type: 'unstructured' or 'N:M' such as '2:4' (along the input dimension; then ``steps`` must be 1).
        distribution: 'global' (default), 'uniform' or 'erk', as in ``prune_oneshot``.
        include / exclude: glob patterns over parameter names.
        report: if given, filled with ``gradients``, ``samples_per_gradient``, ``block_size``, ``damp``,
            ``steps``, ``loss_increase`` (the quadratic model's predicted increase, summed over steps) and
            ``seconds``.

    Returns:
        The masks (parameter name -> bool, True = kept), as ``prune_oneshot``.

    Raises:
        ValueError: a bad sparsity, mask type, distribution or pattern; m, steps or num_samples < 1; num_samples
            < m; a block size outside [1, d]; damp <= 0; no calibration data.
    """
    start = time.perf_counter()
    m = _check_int(num_gradients, "num_gradients (m, gradients in the Fisher)")
    samples = m if num_samples is None else _check_int(num_samples, "num_samples (calibration samples)")
    if samples < m:
        raise ValueError(f"num_samples must be >= num_gradients: {m} gradients need at least {m} calibration "
                         f"samples, got {samples}")
    steps = _check_int(steps, "steps (pruning rounds)")
    if damp is not None:
        damp = _check_damp(damp)
    if sparsity is not None:
        check_sparsity(sparsity)
    if parse_nm(mask_type) is not None and steps != 1:
        raise ValueError(f"mask_type {mask_type!r} fixes every group's count at once; use steps=1, got {steps}")
    # The magnitude masks validate the remaining options and give the pruned parameters, in model order.
    names = list(prune_oneshot(copy.deepcopy(model), sparsity, mask_type=mask_type, distribution=distribution,
                               include=include, exclude=exclude))
    named = dict(model.named_parameters())
    params = {n: named[n] for n in names}
    input_dims = {n: input_dim(model, n) for n in names}  # N:M groups: dim 0 of a transposed (in, out) Conv1D
    d = sum(p.numel() for p in params.values())
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or not 1 <= block_size <= d):
        raise ValueError(f"block_size must be None (one block) or an integer in [1, {d}] (the number of pruned "
                         f"weights), got {block_size!r}")
    batches = _batches_of_samples(calibration_batches, m, samples // m)
    if len(batches) < m:
        raise ValueError(f"the calibration batches gave {len(batches) * (samples // m)} samples, fewer than the "
                         f"{m * (samples // m)} that {m} gradients of {samples // m} need")

    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    nm_sparsity = sparsity
    total_increase = 0.0
    for step in range(1, steps + 1):
        target = None if sparsity is None else 1.0 - (1.0 - sparsity) ** (step / steps)
        grads = fisher_gradients(model, list(params.values()), batches, loss_fn, list(masks.values()))
        if damp is None:
            # 1% of the mean diagonal of G^T G / m, fixed at the first step: the Fisher's own scale.
            damp = DEFAULT_RELATIVE_DAMP * float(grads.square().mean()) or 1.0
        inverse = MFACInverse(grads, damp, block_size)
        del grads  # the inverse keeps its own copy in block layout
        weights = torch.cat([p.detach().reshape(-1) for p in params.values()]).to(torch.float64)
        saliency = weights.square() / (2.0 * inverse.diag())
        active = torch.cat([mk.reshape(-1) for mk in masks.values()])
        # Already pruned weights rank below every surviving one (pruned weights stay pruned).
        saliency = torch.where(active, saliency, torch.full_like(saliency, -1.0))
        new = _masks_from_scores(_unflatten(saliency, params), target if sparsity is not None else nm_sparsity,
                                 mask_type, distribution, input_dims)
        remove = active & ~torch.cat([new[n].reshape(-1) for n in params])
        dw, increase = obs_remove(inverse, weights, remove)
        total_increase += increase
        for (name, p), delta in zip(params.items(), _unflatten(dw, params).values()):
            keep = new[name].to(p.device)
            p.copy_(torch.where(keep, (p.double() + delta).to(p.dtype), torch.zeros_like(p)))
            masks[name] = keep
        log.info("M-FAC: step %d/%d to sparsity %s, %d weights removed, predicted loss increase %.4g",
                 step, steps, "N:M" if target is None else f"{target:.4f}", int(remove.sum()), increase)
    if report is not None:
        report.update(gradients=m, samples_per_gradient=samples // m, block_size=block_size or d, damp=damp,
                      steps=steps, loss_increase=total_increase, seconds=time.perf_counter() - start)
    return {n: mk.clone() for n, mk in masks.items()}
