"""OBC / ExactOBS: one-shot pruning that solves each layer's compression with greedy Optimal Brain Surgeon.

Frantar & Alistarh, NeurIPS 2022, "Optimal Brain Compression" (arXiv 2208.11580). For a layer with weight
rows ``w`` and input Hessian ``H = 2 X X^T / N`` the layer-wise error of a change ``delta`` is
``delta^T H delta / 2`` per row, independently per row. ExactOBS removes, in each row, the weight with the least
saliency ``w_p^2 / [H^-1]_pp``, moves the others by the OBS update ``-w_p / [H^-1]_pp * H^-1[:, p]`` and removes
row and column p from ``H^-1`` (a rank-1 downdate), greedily until the row's count is reached. All rows of a
chunk run in parallel on a (rows, d, d) stack of inverse Hessians.

Unstructured: the paper's allocation inside the layer, i.e. every row records the error increase of each of its
removal steps, and the layer's budget of removals goes to the smallest increases over all rows (so rows get
different counts, the layer's count is exact). N:M: at most M-N removals in each group of M weights along the
input dimension. The final weights of a row are the closed-form optimum for its removed set,
``w'_K = H_KK^-1 (H w)_K`` on the kept set K, which is what the sequential OBS updates compute.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..maskops import parse_nm
from .calibration import (
    calibration_inputs,
    exact_obs_supported,
    execution_order,
    layer_hessian,
    solver_weight,
    to_device,
    weight_rows_and_hessian,
)
from .magnitude import prune_oneshot
from .sparsegpt import sparsegpt

__all__ = ["exact_obs", "prune_obc", "nm_groups", "choose_solver", "solver_summary", "SOLVERS"]

log = logging.getLogger(__name__)

# Bytes of (rows, d, d) inverse Hessians processed at once: bounds memory, large enough to batch well.
_CHUNK_BYTES = 128 << 20

SOLVERS = ("auto", "exact", "sparsegpt")
# ExactOBS costs O(rows d^3) time (one d x d inverse Hessian per row): under "auto" it runs only where d and
# rows * d^2 float64 bytes stay below these bounds (e.g. LeNet-300-100's 300 x 784 layer: 1.4 GiB, exact), and
# SparseGPT (one Cholesky factor for all rows, O(d^3 + rows d^2)) runs on wider layers.
EXACT_MAX_COLUMNS = 1024
EXACT_MAX_BYTES = 2 << 30


def choose_solver(weight_shape: Sequence[int], solver: str = "auto") -> str:
    """'exact' (ExactOBS) or 'sparsegpt' for a layer of this weight shape; ``solver`` other than 'auto' is kept.

    Raises:
        ValueError: ``solver`` not one of 'auto', 'exact', 'sparsegpt'.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if solver != "auto":
        return solver
    rows, d = int(weight_shape[0]), math.prod(int(s) for s in weight_shape[1:])
    return "exact" if d <= EXACT_MAX_COLUMNS and rows * d * d * 8 <= EXACT_MAX_BYTES else "sparsegpt"


def solver_summary(solvers: dict[str, tuple[str, int]]) -> str:
    """One line from ``prune_obc``'s ``solvers`` (name -> (solver, inputs per row)).

    E.g. ``exact for 2 layers, sparsegpt for 1 layer (784 inputs)``: the SparseGPT layers' input widths in brackets.
    """
    parts = []
    for kind in SOLVERS[1:]:
        widths = [d for solver, d in solvers.values() if solver == kind]
        if widths:
            text = f"{kind} for {len(widths)} layer{'s' if len(widths) != 1 else ''}"
            if kind == "sparsegpt":
                text += f" ({', '.join(str(d) for d in sorted(set(widths)))} inputs)"
            parts.append(text)
    return ", ".join(parts) or "no layer solved"


def nm_groups(weight_shape: Sequence[int], m: int) -> Tensor:
    """The N:M group of each column of ``weight.reshape(out, -1)``: M consecutive input channels, same kernel tap.

    A Linear column is an input feature (group ``c // M``); a conv column is (channel c, kernel position s), the
    group ``(c // M) * K + s`` with K kernel positions, matching ``maskops.nm_mask`` (groups along dim 1).
    """
    taps = math.prod(weight_shape[2:]) if len(weight_shape) > 2 else 1
    cols = torch.arange(int(weight_shape[1]) * taps)
    return (cols // taps // m) * taps + cols % taps


def _greedy(w: Tensor, hinv: Tensor, steps: int, groups: Tensor | None, per_group: int) -> tuple[Tensor, Tensor]:
    """Run ``steps`` ExactOBS removals on every row of ``w``; return the removed columns and error increases."""
    rows, d = w.shape
    w = w.clone()
    hinv = hinv.expand(rows, d, d).clone()
    removed = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    order = torch.empty(rows, steps, dtype=torch.long, device=w.device)
    losses = torch.empty(rows, steps, dtype=w.dtype, device=w.device)
    index = torch.arange(rows, device=w.device)
    counts = None
    if groups is not None:
        counts = torch.zeros(rows, int(groups.max()) + 1, dtype=torch.long, device=w.device)
        full_of = groups.expand(rows, d)
    for t in range(steps):
        diag = torch.diagonal(hinv, dim1=1, dim2=2)
        blocked = removed
        if counts is not None:
            blocked = blocked | (counts.gather(1, full_of) >= per_group)
        # Removed columns have [H^-1]_pp = 0 after the downdate: masked here, whatever 0/0 gave.
        score = (w * w / diag).masked_fill(blocked, math.inf)
        p = score.argmin(1)
        losses[:, t] = score[index, p] / 2
        order[:, t] = p
        col = hinv[index, :, p]
        dpp = diag[index, p]
        w -= (w[index, p] / dpp).unsqueeze(1) * col
        w[index, p] = 0.0
        hinv.baddbmm_(col.unsqueeze(2), (col / dpp.unsqueeze(1)).unsqueeze(1), alpha=-1.0)
        removed[index, p] = True
        if counts is not None:
            counts[index, groups[p]] += 1
    return order, losses


def _reconstruct(w: Tensor, hessian: Tensor, keep: Tensor, chunk: int) -> Tensor:
    """Per row, the optimum on the kept columns: ``w'_K = H_KK^-1 (H w)_K``, zero elsewhere (float64)."""
    rows, d = w.shape
    out = torch.zeros_like(w)
    hw = w @ hessian  # (H w)^T per row; H is symmetric
    kept = keep.sum(1)
    kmax = int(kept.max()) if rows else 0
    if kmax == 0:
        return out
    # Kept columns first in each row, padded with pruned ones that become identity rows with a zero target.
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :kmax]
    valid = torch.arange(kmax, device=w.device).unsqueeze(0) < kept.unsqueeze(1)
    eye = torch.eye(kmax, dtype=w.dtype, device=w.device)
    for start in range(0, rows, chunk):
        sl = slice(start, start + chunk)
        i, v = idx[sl], valid[sl]
        both = v.unsqueeze(2) & v.unsqueeze(1)
        a = torch.where(both, hessian[i.unsqueeze(2), i.unsqueeze(1)], eye)
        b = torch.where(v, hw[sl].gather(1, i), torch.zeros((), dtype=w.dtype, device=w.device))
        x = torch.cholesky_solve(b.unsqueeze(2), torch.linalg.cholesky(a)).squeeze(2)
        out[sl].scatter_(1, i, torch.where(v, x, torch.zeros((), dtype=w.dtype, device=w.device)))
    return out


@torch.no_grad()
def exact_obs(
    weight: Tensor,
    hessian: Tensor,
    *,
    keep: int | None = None,
    mask_type: str = "unstructured",
    rows_per_chunk: int | None = None,
) -> tuple[Tensor, Tensor, float]:
    """ExactOBS on one layer (Frantar & Alistarh 2022, arXiv 2208.11580): pruned weights, mask, layer error.

    Args:
        weight: (out, in) weights, or a conv weight (out, C, kh, kw) whose columns follow ``unfold``.
        hessian: (d, d) ``2 X X^T / N`` of the layer's inputs with damping (positive definite), d = weight[0].numel().
        keep: how many weights of the layer stay (unstructured); exact.
        mask_type: 'unstructured' or 'N:M' (N kept of every M along the input dimension; then ``keep`` is unused).
        rows_per_chunk: rows solved at once (default: as many as fit in about 128 MiB of inverse Hessians).

    Returns:
        ``(new_weight, mask, error)``: the weight in ``weight``'s shape and dtype with pruned entries exactly 0,
        the bool mask (True = kept), and ``sum over rows of delta^T H delta / 2`` (``||W X - W' X||^2 / N``).

    Raises:
        ValueError: ``keep`` missing or outside [0, numel], an N:M that does not fit the input dimension.
    """
    shape = weight.shape
    w, h = weight_rows_and_hessian(weight, hessian)
    rows, d = w.shape
    nm = parse_nm(mask_type)
    groups, per_group = None, 0
    if nm is not None:
        n, m = nm
        if shape[1] % m:
            raise ValueError(f"mask_type {mask_type!r}: input dimension {shape[1]} is not a multiple of {m}")
        groups, per_group = nm_groups(shape, m).to(w.device), m - n
        steps = d * (m - n) // m
    else:
        if keep is None or not 0 <= keep <= rows * d:
            raise ValueError(f"keep must be a count in [0, {rows * d}] for unstructured ExactOBS, got {keep!r}")
        total = rows * d - keep
        # Rows may take more than the average: up to a quarter of the row beyond it, which bounds the cost.
        # A row's weights that are already 0 (a dead unit of a trained model is a whole row of them) are its
        # first, free removals: give every row room for all of them, else the ones left over stay 0 while
        # counted as kept, and the layer ends with more zeros than asked.
        zeros = int((w == 0).sum(1).max()) if rows else 0
        steps = min(d, max(-(-total // rows) + -(-d // 4), zeros)) if total else 0
    chunk = rows_per_chunk or max(1, _CHUNK_BYTES // (4 * d * d))
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h)).to(torch.float32)
    orders, step_losses = [], []
    for start in range(0, rows, chunk):
        order, losses = _greedy(w[start : start + chunk].float(), hinv, steps, groups, per_group)
        orders.append(order)
        step_losses.append(losses)
    order = torch.cat(orders) if orders else torch.empty(rows, 0, dtype=torch.long)
    prune = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    if nm is not None:
        prune.scatter_(1, order, True)
    elif total:
        # Non-decreasing per row (cummax), then the smallest increases over all rows, step-major with a stable
        # sort so that equal values take earlier steps first: each row's selection is a prefix of its order.
        losses = torch.cat(step_losses).double().cummax(dim=1).values
        chosen = torch.argsort(losses.T.reshape(-1), stable=True)[:total]
        per_row = torch.bincount(chosen % rows, minlength=rows)
        prefix = torch.arange(steps, device=w.device).unsqueeze(0) < per_row.unsqueeze(1)
        prune.scatter_(1, order, prefix)
    new = _reconstruct(w, h, ~prune, max(1, _CHUNK_BYTES // (8 * d * d)))
    # A row that lost only weights already 0 is its own optimum (H_KK^-1 (H w)_K = w_K): kept exactly, where the
    # solve's rounding would turn its zeros (those left kept when there are more than asked) into tiny values.
    unchanged = ~(prune & (w != 0)).any(1)
    new[unchanged] = w[unchanged]
    delta = new - w
    error = float(((delta @ h) * delta).sum() / 2)
    return new.to(weight.dtype).reshape(shape), (~prune).reshape(shape), error


@torch.no_grad()
def prune_obc(
    model: nn.Module,
    sparsity: float | None,
    calibration_batches: Iterable[Any],
    *,
    mask_type: str = "unstructured",
    distribution: str = "global",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    num_samples: int | None = None,
    damping: float = 0.01,
    layer_errors: dict[str, float] | None = None,
    solver: str = "auto",
    solvers: dict[str, tuple[str, int]] | None = None,
    allocation: str = "magnitude",
    database: Any = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` **in place** with OBC / ExactOBS (Frantar & Alistarh, NeurIPS 2022, arXiv 2208.11580).

    Per-layer sparsities: the ones magnitude pruning with the same ``distribution`` gives (by default global
    magnitude's allocation); OBC then chooses *which* weights of each layer go and compensates the rest. Layers are
    pruned sequentially in forward order, each on the calibration inputs produced by the already pruned layers
    before it. ``nn.Linear``, Hugging Face's ``Conv1D`` (GPT-2, on its transposed weight) and ``nn.Conv2d``
    (groups=1) are solved exactly; any other pruned weight (depthwise convs, embeddings, ...) keeps its
    magnitude mask, with a logged note. Biases are not changed.

    Args:
        model: the trained model; put in eval mode during calibration, its modes restored afterwards.
        sparsity: fraction of zeros in [0, 1); for N:M leave it None.
        calibration_batches: training batches (tensors, ``(inputs, targets, ...)``, or Hugging Face mappings such
            as ``{"input_ids": ..., "attention_mask": ...}``, run as ``model(**batch)`` without ``labels``; every
            position counts, padded ones too); never the test set.
        mask_type: 'unstructured' or 'N:M' such as '2:4' (along the input dimension).
        distribution: per-layer allocation as in ``prune_oneshot``: 'global' (default), 'uniform' or 'erk'.
        include / exclude: glob patterns over parameter names.
        num_samples: use at most this many calibration samples (default: all the batches give).
        damping: added to H's diagonal, as a fraction of its mean diagonal.
        layer_errors: if given, filled with parameter name -> ``||W X - W' X||^2 / N`` on that layer's inputs.
        solver: per-layer solver: 'exact' (ExactOBS), 'sparsegpt' (SparseGPT, Frantar & Alistarh 2023, for wide
            layers), or 'auto' (default): exact up to 1024 inputs per row and 2 GiB of rows x d^2 float64
            inverse Hessians, SparseGPT beyond (``choose_solver``).
        solvers: if given, filled with parameter name -> (the solver that ran, inputs per row); logged too. With
            allocation='database', ``solver`` builds the database (when it is built here) and runs OBC at
            magnitude's allocation, and ``solvers`` describes the result kept.
        allocation: 'magnitude' (the per-layer counts of magnitude pruning with ``distribution``) or 'database'
            (chosen from the OBC database, never worse on the calibration loss: ``database.prune_obc_database``).
        database: with allocation='database', a built ``ObcDatabase`` or a cache file path (else built in memory).
        report: if given, filled with ``allocation`` (the one used) and, for 'database', the details.

    Returns:
        The masks (parameter name -> bool, True = kept), as ``prune_oneshot``.

    Raises:
        ValueError: a bad sparsity, mask type, distribution, pattern or solver, a calibration batch of another
            form, or no calibration data.
    """
    choose_solver((1, 1), solver)  # validates the name before any work
    if allocation not in ("magnitude", "database"):
        raise ValueError(f"allocation must be 'magnitude' or 'database', got {allocation!r}")
    if allocation == "database":
        from .database import prune_obc_database

        return prune_obc_database(model, sparsity, calibration_batches, distribution=distribution,
                                  include=include, exclude=exclude, num_samples=num_samples, damping=damping,
                                  layer_errors=layer_errors, database=database, report=report, solver=solver,
                                  solvers=solvers)
    if report is not None:
        report["allocation"] = "magnitude"
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (e.g. 0.01), got {damping!r}")
    # The magnitude masks validate every option and give each layer's count under the chosen distribution.
    masks = prune_oneshot(copy.deepcopy(model), sparsity, mask_type=mask_type, distribution=distribution,
                          include=include, exclude=exclude)
    inputs = calibration_inputs(calibration_batches, num_samples)
    params = dict(model.named_parameters())
    exact: dict[nn.Module, str] = {}
    for name, mask in masks.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        reason = exact_obs_supported(module) if attr == "weight" else "not a layer's weight"
        if reason is None:
            exact[module] = name
        else:
            log.info("OBC: %s is %s; pruned by magnitude", name, reason)
            params[name].mul_(mask)  # before calibration, so later layers see its pruned outputs
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        ordered = execution_order(model, list(exact), to_device(inputs[0], next(iter(params.values())).device))
        for module, name in exact.items():
            if module not in ordered:
                log.info("OBC: %s is not called in the forward pass; pruned by magnitude", name)
                params[name].mul_(masks[name])
        for module in ordered:
            name = exact[module]
            hessian = layer_hessian(model, module, inputs, damping)
            rows = solver_weight(module)  # a Conv1D's transposed view: rows = outputs, N:M along its inputs
            kind = choose_solver(rows.shape, solver)
            solve = exact_obs if kind == "exact" else sparsegpt
            new, mask, error = solve(rows, hessian, keep=int(masks[name].sum()), mask_type=mask_type)
            if solvers is not None:
                solvers[name] = (kind, rows[0].numel())
            rows.copy_(new)  # writes through the view into the module's own layout
            masks[name] = (mask.T if rows is not module.weight else mask).contiguous().to(masks[name].device)
            if layer_errors is not None:
                layer_errors[name] = error
            log.info("OBC: %s pruned to %d of %d weights by %s, layer error %.4g", name, int(mask.sum()),
                     mask.numel(), kind, error)
    finally:
        for m, training in modes.items():
            m.train(training)
    return masks
