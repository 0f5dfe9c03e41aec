"""Matrix-free inverse-Fisher-vector products (M-FAC).

Reference: E. Frantar, E. Kurtic, D. Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021 (arXiv 2107.03356).

The empirical Fisher over m gradients g_1..g_m (rows of G, shape (m, d)) with dampening lambda is::

    F = lambda I + (1/m) sum_i g_i g_i^T

Applying Sherman-Morrison once per gradient (F_0 = lambda I, F_i = F_{i-1} + g_i g_i^T / m) gives::

    F^-1 v = v / lambda - sum_j d_j w_j (w_j^T v),   w_j = F_{j-1}^-1 g_j,   d_j = 1 / (m + g_j^T w_j)

and every w_j is a combination of g_1..g_j: w_j = sum_k C[j, k] g_k with C lower triangular (the paper's
coefficient matrix). C and d follow from the Gram matrix K = G G^T alone (O(m^3)), so after the O(m^2 d) setup a
product costs O(m d + m^2): q = G v, a = C^T (d * (C q)), F^-1 v = v / lambda - G^T a. No d x d matrix is formed.

Block-wise (the paper's blocked variant), the d weights are cut into blocks of B consecutive weights and each block
gets its own m x m system: F is then block-diagonal, and all blocks are computed at once as batched
(blocks, m, m) tensors. The last block is zero-padded when B does not divide d (padded coordinates have zero
gradients, so they change nothing and are cut off again).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["MFACInverse", "woodbury_coefficients", "woodbury_apply"]


def _check_damp(damp: float) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"M-FAC: damp (lambda) must be a finite number > 0, got {damp!r}")


def woodbury_coefficients(gram: Tensor, damp: float, m: int) -> tuple[Tensor, Tensor]:
    """The paper's coefficients (C, d) for a batch of Gram matrices ``gram`` (blocks, n, n) of n gradients.

    ``m`` is the Fisher's normaliser (1/m in front of the sum; n < m gradients with zero rows for the rest give
    the same F). Returns C (blocks, n, n), lower triangular with C[j, j] = 1 / lambda, and d (blocks, n), such
    that F^-1 v = v / lambda - G^T C^T (d * (C G v)). O(n^3) per block, independent of d.
    """
    _check_damp(damp)
    blocks, n, _ = gram.shape
    coef = torch.zeros_like(gram)
    dvec = torch.zeros(blocks, n, dtype=gram.dtype, device=gram.device)
    inv_damp = 1.0 / damp
    for j in range(n):
        row = torch.zeros(blocks, n, dtype=gram.dtype, device=gram.device)
        row[:, j] = inv_damp
        if j:
            # w_i^T g_j = (C K)[i, j] for the earlier i; w_j = g_j / lambda - sum_i d_i (w_i^T g_j) w_i.
            dots = torch.bmm(coef[:, :j, :], gram[:, :, j : j + 1]).squeeze(2)  # (blocks, j)
            row = row - torch.bmm((dvec[:, :j] * dots).unsqueeze(1), coef[:, :j, :]).squeeze(1)
        coef[:, j, :] = row
        # g_j^T w_j = (C K)[j, j]
        dvec[:, j] = 1.0 / (m + (row * gram[:, :, j]).sum(1))
    return coef, dvec


def woodbury_apply(coef: Tensor, dvec: Tensor, q: Tensor) -> Tensor:
    """a = C^T (d * (C q)) for q = G v of shape (blocks, n): the weights of the rows of G subtracted from v/lambda."""
    inner = dvec * torch.bmm(coef, q.unsqueeze(2)).squeeze(2)
    return torch.bmm(coef.transpose(1, 2), inner.unsqueeze(2)).squeeze(2)


class MFACInverse:
    """The inverse of F = damp * I + (1/m) G^T G for m gradients G (m, d), by M-FAC's static algorithm.

    Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order Information",
    NeurIPS 2021 (arXiv 2107.03356). With ``block_size`` B, F is block-diagonal over blocks of B consecutive
    weights, each block with its own m x m system (the last block zero-padded when B does not divide d); None
    uses one block of all d weights.

    Setup: O(m^2 d) for the Gram matrices and O(m^3) per block for the coefficients. :meth:`ihvp`: O(m d + m^2)
    per product. :meth:`diag`: O(m^2 d). Memory: a copy of G in block layout (m * d, plus padding) and the
    (blocks, m, m) coefficients. Works on any device and dtype of ``gradients`` (use float64 where the
    1/damp scale would lose float32 precision).
    """

    def __init__(self, gradients: Tensor, damp: float, block_size: int | None = None) -> None:
        if not isinstance(gradients, Tensor) or gradients.dim() != 2:
            shape = tuple(gradients.shape) if isinstance(gradients, Tensor) else type(gradients).__name__
            raise ValueError(f"M-FAC: gradients must be a 2-D tensor (m, d), got {shape}")
        m, d = gradients.shape
        if m < 1:
            raise ValueError(f"M-FAC: need m >= 1 gradients (rows of the (m, d) tensor), got m = {m}")
        if d < 1:
            raise ValueError(f"M-FAC: need d >= 1 weights (columns of the (m, d) tensor), got d = {d}")
        if not gradients.is_floating_point():
            raise ValueError(f"M-FAC: gradients must be floating point, got {gradients.dtype}")
        _check_damp(damp)
        if block_size is None:
            block_size = d
        elif isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= d:
            raise ValueError(f"M-FAC: block_size must be None or an integer in [1, d = {d}], got {block_size!r}")
        self.m, self.d, self.damp, self.block_size = m, d, float(damp), block_size
        self.blocks = -(-d // block_size)
        padded = self.blocks * block_size
        grads = gradients.detach()
        if padded != d:
            grads = torch.nn.functional.pad(grads, (0, padded - d))
        # (blocks, m, B), contiguous: every product reads each block's rows in one batched matmul.
        self.grads = grads.reshape(m, self.blocks, block_size).transpose(0, 1).contiguous()
        gram = torch.bmm(self.grads, self.grads.transpose(1, 2))
        self.coef, self.dvec = woodbury_coefficients(gram, self.damp, m)

    def _blocked(self, v: Tensor) -> Tensor:
        if v.shape != (self.d,):
            raise ValueError(f"M-FAC: ihvp needs a vector of shape ({self.d},), got {tuple(v.shape)}")
        v = v.to(self.grads.dtype)
        padded = self.blocks * self.block_size
        if padded != self.d:
            v = torch.nn.functional.pad(v, (0, padded - self.d))
        return v.reshape(self.blocks, self.block_size)

    def ihvp(self, v: Tensor) -> Tensor:
        """F^-1 v for a vector v of shape (d,), in O(m d + m^2)."""
        vb = self._blocked(v)
        q = torch.bmm(self.grads, vb.unsqueeze(2)).squeeze(2)  # (blocks, m)
        a = woodbury_apply(self.coef, self.dvec, q)
        out = vb / self.damp - torch.bmm(a.unsqueeze(1), self.grads).squeeze(1)
        return out.reshape(-1)[: self.d]

    def diag(self) -> Tensor:
        """The diagonal of F^-1, shape (d,): 1/lambda - sum_j d_j (sum_k C[j, k] g_k)^2 elementwise."""
        weighted = torch.bmm(self.coef, self.grads)  # (blocks, m, B): the rows w_j
        out = 1.0 / self.damp - (self.dvec.unsqueeze(2) * weighted.square()).sum(1)
        return out.reshape(-1)[: self.d]
