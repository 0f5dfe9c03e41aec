"""M-FAC: the block-wise Woodbury inverse-Fisher-vector product and diagonal, and the M-FAC optimizer."""

from __future__ import annotations

import pytest
import torch

from sparsetrain.mfac import MFACInverse


def _dense_inverse(grads: torch.Tensor, damp: float, block: int | None) -> torch.Tensor:
    """(damp I + G^T G / m)^-1, block-diagonal over blocks of ``block`` consecutive weights."""
    m, d = grads.shape
    block = block or d
    fisher = torch.zeros(d, d, dtype=grads.dtype)
    for start in range(0, d, block):
        end = min(start + block, d)
        g = grads[:, start:end]
        fisher[start:end, start:end] = damp * torch.eye(end - start, dtype=grads.dtype) + g.T @ g / m
    return torch.linalg.inv(fisher)


@pytest.mark.parametrize(
    ("m", "d", "block"),
    [(1, 50, None), (7, 300, None), (32, 200, None), (64, 500, None), (16, 301, 64), (16, 300, 100), (8, 97, 1)],
)
def test_ihvp_and_diag_equal_the_dense_inverse(m, d, block):
    gen = torch.Generator().manual_seed(m * 1000 + d)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    damp = 0.05
    dense = _dense_inverse(grads, damp, block)
    inverse = MFACInverse(grads, damp, block)
    for _ in range(3):
        v = torch.randn(d, generator=gen, dtype=torch.float64)
        expected = dense @ v
        assert ((inverse.ihvp(v) - expected).norm() / expected.norm()).item() < 1e-4
    assert ((inverse.diag() - dense.diagonal()).norm() / dense.diagonal().norm()).item() < 1e-4


def test_blocks_differ_from_the_full_inverse_and_block_d_equals_it():
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(8, 120, generator=gen, dtype=torch.float64)
    v = torch.randn(120, generator=gen, dtype=torch.float64)
    full = MFACInverse(grads, 0.1).ihvp(v)
    torch.testing.assert_close(MFACInverse(grads, 0.1, 120).ihvp(v), full)
    assert not torch.allclose(MFACInverse(grads, 0.1, 40).ihvp(v), full)


@pytest.mark.parametrize(
    ("grads", "damp", "block", "match"),
    [
        (torch.zeros(0, 10), 0.1, None, "m >= 1.*got m = 0"),
        (torch.zeros(10), 0.1, None, "2-D tensor"),
        (torch.zeros(3, 10), 0.0, None, "damp.*> 0, got 0.0"),
        (torch.zeros(3, 10), -1.0, None, "damp.*> 0, got -1.0"),
        (torch.zeros(3, 10), float("nan"), None, "damp.*got nan"),
        (torch.zeros(3, 10), 0.1, 0, r"block_size.*\[1, d = 10\], got 0"),
        (torch.zeros(3, 10), 0.1, 11, r"block_size.*\[1, d = 10\], got 11"),
        (torch.zeros(3, 10, dtype=torch.long), 0.1, None, "floating point"),
    ],
)
def test_bad_inputs_raise(grads, damp, block, match):
    with pytest.raises(ValueError, match=match):
        MFACInverse(grads, damp, block)


def test_ihvp_checks_the_vector_shape():
    with pytest.raises(ValueError, match=r"shape \(10,\), got \(9,\)"):
        MFACInverse(torch.randn(3, 10), 0.1).ihvp(torch.randn(9))
