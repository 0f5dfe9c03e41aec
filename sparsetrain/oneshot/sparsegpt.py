"""SparseGPT: one-shot pruning of a layer too wide for ExactOBS, with lazy column-wise OBS updates.

Frantar & Alistarh, ICML 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot"
(arXiv 2301.00774). ExactOBS keeps one inverse Hessian per output row (cost O(rows d^3)); SparseGPT shares one
for all rows by pruning the columns in a fixed order, left to right. When column j is reached, the OBS update of
a removal in that column only touches the columns to its right, and the inverse Hessian of those columns is
given by row j of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``): removing ``w_j`` costs
``w_j^2 / U_jj^2`` (times 1/2) and moves ``w[j:]`` by ``-(w_j / U_jj) U[j, j:]``. The total cost is one Cholesky
factorisation, O(d^3), plus the updates, O(rows d^2).

Lazy batched updates: columns are processed in blocks of ``block_size`` (B); inside a block the updates are
applied to the block only, and the block's accumulated updates reach the columns to its right in one matrix
product at the end of the block. This is the same arithmetic as updating every column at once, reordered.

Adaptive mask selection (unstructured), as in the paper's reference implementation: when a block starts, its
weights (already updated by all blocks to its left) are scored by ``w^2 / U_jj^2`` and the block's quota of
removals goes to the smallest scores over the whole (rows, B) block, so rows and columns of a block can receive
different counts. The blocks' quotas spread the layer's T removals evenly over the columns (``floor(T c / d)``
by column c), so the layer's count is exact. Weights already exactly 0 (dead units, inputs pruned earlier, a
sparse model pruned further) are removed first, as ExactOBS removes them first: each block's quota covers its
zeros and the others' quotas shrink to keep T (with even shares alone, a block's zeros beyond its share were
counted as kept, and a kept 0 that no update reaches, e.g. at a dead input, stays 0: more zeros than T).
N:M: when the first column of each group of M is reached, the M-N lowest scores of the group (with the
group's current weights) are removed in each row. A conv layer's N:M groups (M input channels at one kernel
position) are made contiguous by processing the columns in (kernel position, channel) order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..maskops import check_sparsity, keep_count, parse_nm
from .calibration import weight_rows_and_hessian

__all__ = ["sparsegpt"]


def _free_removals(w: Tensor, total: int) -> Tensor:
    """The weights already exactly 0 (a dead unit's row, a pruned input, an earlier sparse model's zeros): they
    are removed first, as ExactOBS removes them first (removing a 0 costs nothing). With more of them than
    ``total``, the first ``total`` in column order: then nothing else is removed and the weight is unchanged."""
    free = w == 0
    if int(free.sum()) > total:
        order = free.T.reshape(-1)  # column-major: the order the columns are processed in
        order[order.nonzero().squeeze(1)[total:]] = False
        free = order.reshape(w.shape[1], w.shape[0]).T
    return free


def _block_quota(total: int, done: int, start: int, stop: int, d: int, rows: int, forced: int,
                 forced_after: int) -> int:
    """Removals of the columns [start, stop), given ``done`` removals to their left: the layer's ``total`` spread
    evenly (``floor(total * stop / d)`` by the block's end), but at least the block's ``forced`` free removals,
    leaving room for the ``forced_after`` ones to its right, never more than the block holds and never fewer than
    the columns to its right could not take. The bounds never conflict while ``done`` plus the forced removals
    from ``start`` on is at most ``total`` (true before the first block, kept by every block): the layer's count
    is exact and every free removal is made."""
    low = max(forced, total - done - rows * (d - stop))
    high = min(rows * (stop - start), total - done - forced_after)
    return min(max(total * stop // d - done, low), high)


@torch.no_grad()
def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    *,
    sparsity: float | None = None,
    keep: int | None = None,
    mask_type: str = "unstructured",
    block_size: int = 128,
) -> tuple[Tensor, Tensor, float]:
    """SparseGPT on one layer (Frantar & Alistarh 2023, arXiv 2301.00774): pruned weights, mask, layer error.

    Args:
        weight: (out, in) weights, or a conv weight (out, C, kh, kw) whose columns follow ``unfold``.
        hessian: (d, d) ``2 X X^T / N`` of the layer's inputs with damping (positive definite), d = weight[0].numel().
        sparsity: fraction of the layer's weights removed (unstructured), rounded as ``keep_count`` does; or
        keep: how many weights of the layer stay (unstructured), exact. Give one of the two.
        mask_type: 'unstructured' or 'N:M' (N kept of every M along the input dimension; then sparsity and keep
            are unused).
        block_size: columns per lazy-update block and per mask-selection block (B = Bs; 128 in the paper). For
            N:M it is rounded up to a multiple of M so that a group never straddles two blocks.

    Returns:
        ``(new_weight, mask, error)`` as ``exact_obs``: the weight in ``weight``'s shape and dtype with pruned
        entries exactly 0, the bool mask (True = kept), and ``sum over rows of delta^T H delta / 2``
        (``||W X - W' X||^2 / N``), computed in float64.

    Raises:
        ValueError: a bad count, sparsity, block size or Hessian shape, an N:M that does not fit the input dimension.
    """
    shape = weight.shape
    w, h = weight_rows_and_hessian(weight, hessian)
    rows, d = w.shape
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer (e.g. 128), got {block_size!r}")
    nm = parse_nm(mask_type)
    perm = None
    total = 0
    if nm is not None:
        n, m = nm
        if shape[1] % m:
            raise ValueError(f"mask_type {mask_type!r}: input dimension {shape[1]} is not a multiple of {m}")
        block_size = -(-block_size // m) * m
        taps = d // shape[1]
        if taps > 1:  # (channel, tap) -> (tap, channel): each group of M channels becomes M adjacent columns
            perm = torch.arange(d, device=w.device).reshape(shape[1], taps).T.reshape(-1)
    else:
        if (sparsity is None) == (keep is None):
            raise ValueError("give exactly one of sparsity and keep for unstructured SparseGPT")
        if sparsity is not None:
            keep = keep_count(rows * d, check_sparsity(sparsity))
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= rows * d:
            raise ValueError(f"keep must be a count in [0, {rows * d}] for unstructured SparseGPT, got {keep!r}")
        total = rows * d - keep
    work, h_work = (w, h) if perm is None else (w[:, perm], h[perm][:, perm])
    work = work.clone()
    # Upper Cholesky factor of H^-1: row j holds the OBS update of column j given that columns < j are done.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h_work)), upper=True)
    prune = torch.zeros(rows, d, dtype=torch.bool, device=w.device)
    free = _free_removals(work, total) if nm is None else None
    # Free removals in the columns from c on: the room each block must leave for them.
    free_from = [0] * (d + 1) if free is None else [*free.sum(0).flip(0).cumsum(0).flip(0).tolist(), 0]
    done = 0
    for start in range(0, d, block_size):
        stop = min(start + block_size, d)
        w1 = work[:, start:stop].clone()  # current: every block to the left has been applied
        u1 = u[start:stop, start:stop]
        diag = u1.diagonal()
        p1 = torch.zeros(rows, stop - start, dtype=torch.bool, device=w.device)
        if free is not None:
            forced = free[:, start:stop]
            quota = _block_quota(total, done, start, stop, d, rows, free_from[start] - free_from[stop],
                                 free_from[stop])
            if quota:
                # The block's free removals rank first (-1 < any score), then the smallest scores.
                score = (w1 * w1 / (diag * diag)).masked_fill(forced, -1.0).reshape(-1)
                p1.view(-1)[torch.topk(score, quota, largest=False).indices] = True
            done += quota
        errors = torch.zeros_like(w1)
        for i in range(stop - start):
            if nm is not None and i % m == 0:
                score = w1[:, i : i + m] ** 2 / diag[i : i + m] ** 2
                p1[:, i : i + m].scatter_(1, torch.topk(score, m - n, dim=1, largest=False).indices, True)
            err = torch.where(p1[:, i], w1[:, i], torch.zeros((), dtype=w1.dtype, device=w1.device)) / diag[i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1.0)
            w1[:, i] = w1[:, i].masked_fill(p1[:, i], 0.0)  # exactly 0, whatever the rounding of w - (w/u) u
            errors[:, i] = err
        work[:, start:stop] = w1
        prune[:, start:stop] = p1
        # The lazy part: the whole block's updates reach the columns to its right in one product.
        work[:, stop:].addmm_(errors, u[start:stop, stop:], alpha=-1.0)
    if perm is not None:
        inverse = torch.argsort(perm)
        work, prune = work[:, inverse], prune[:, inverse]
    delta = work - w
    error = float(((delta @ h) * delta).sum() / 2)
    return work.to(weight.dtype).reshape(shape), (~prune).reshape(shape), error
