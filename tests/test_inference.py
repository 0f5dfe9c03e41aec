"""Sparse CPU kernels: outputs match dense, the per-layer choice follows its stated rule, any module tree works.

No timing is asserted here (speed lives in benchmarks/inference.py); the only choice asserted is the robust one:
at 30% sparsity CSR is several times slower than dense, far beyond the 5% margin the rule demands.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from sparsetrain.inference import KernelReport, SparseLinear, time_call, to_sparse_kernels

FAST = {"repeats": 3, "min_time": 5e-4}  # enough to exercise the timing path; tests assert no speed


def prune_(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Zero the smallest-magnitude weights of every Linear, per layer (exact count)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.add_(1e-3 * torch.randn(m.weight.shape, generator=g))
                k = int(sparsity * m.weight.numel())
                order = m.weight.abs().flatten().argsort()
                m.weight.view(-1)[order[:k]] = 0.0
    return model


def wide_mlp(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    return prune_(model, sparsity).eval()


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(64,), (1, 64), (8, 64), (2, 5, 64)])
def test_sparse_linear_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = prune_(nn.Linear(64, 48, bias=bias), 0.8)
    sparse = SparseLinear.from_linear(layer)
    assert sparse.crow_indices.dtype == torch.int32 and sparse.col_indices.dtype == torch.int32
    assert sparse.sparsity == pytest.approx(0.8, abs=1 / 64)
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert_close(sparse(x), layer(x))
    with torch.no_grad():
        assert_close(sparse(x), layer(x))


def test_sparse_linear_copies_pickles_and_converts():
    torch.manual_seed(0)
    layer = prune_(nn.Linear(32, 16), 0.9)
    sparse = SparseLinear.from_linear(layer)
    x = torch.randn(4, 32)
    expected = layer(x).detach()
    sparse(x)  # builds the cached CSR tensor, which has no storage to copy
    assert_close(copy.deepcopy(sparse)(x), expected)
    assert_close(pickle.loads(pickle.dumps(sparse))(x), expected)
    assert_close(sparse.double()(x.double()), expected.double())
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    fresh = SparseLinear.from_linear(prune_(nn.Linear(32, 16), 0.9, seed=1)).double()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_close(fresh(x.double()), expected.double())


# ---------------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_outputs_match_dense_at_each_batch_size(batch):
    model = wide_mlp(0.9)
    x = torch.randn(batch, 1, 28, 28)
    fast, report = to_sparse_kernels(model, x, **FAST)
    assert report.batch_size == batch and [c.name for c in report.layers] == ["1", "3", "5"]
    assert all(c.dense_time and c.sparse_time for c in report.layers)  # every layer is 90% sparse: all timed
    with torch.inference_mode():
        assert_close(fast(x), model(x))
        other = torch.randn(batch, 1, 28, 28)  # not only the sample it was timed on
        assert_close(fast(other), model(other))
    assert all(isinstance(model[i], nn.Linear) for i in (1, 3, 5))  # the original is untouched


def test_forced_csr_everywhere_matches_dense():
    model = wide_mlp(0.9)
    x = torch.randn(8, 1, 28, 28)
    fast, report = to_sparse_kernels(model, x, force=True, **FAST)
    assert report.converted == ["1", "3", "5"]
    assert all(isinstance(fast[i], SparseLinear) for i in (1, 3, 5))
    with torch.inference_mode():
        assert_close(fast(x), model(x))
        assert_close(fast(x[:1]), model(x[:1]))  # one sample: the matrix-vector kernel


def test_low_sparsity_keeps_every_layer_dense():
    model = wide_mlp(0.3)
    x = torch.randn(8, 1, 28, 28)
    fast, report = to_sparse_kernels(model, x, **FAST)
    assert report.converted == [] and all(c.kernel == "dense" for c in report.layers)
    assert all("below 50%" in c.reason for c in report.layers)
    # Timed too (min_sparsity=0): every layer is timed, and the choice follows the stated rule exactly. (Which
    # way it goes is the machine's business: CSR at 30% is several times slower on a quiet CPU, but a test must
    # not assert a timing, and on a loaded machine a dense timing can spike.)
    fast, report = to_sparse_kernels(model, x, min_sparsity=0.0, margin=0.05, **FAST)
    assert all(c.dense_time is not None and c.sparse_time is not None for c in report.layers)
    for choice in report.layers:
        assert (choice.kernel == "csr") == (choice.sparse_time <= 0.95 * choice.dense_time), choice
    csr = set(report.converted)
    assert all(isinstance(fast[i], nn.Linear) == (str(i) not in csr) for i in (1, 3, 5))


def test_model_without_linear_comes_back_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(2, 1, 12, 12)
    fast, report = to_sparse_kernels(model, x, **FAST)
    assert report.layers == [] and "no nn.Linear" in str(report)
    assert fast is not model
    assert [type(m) for m in fast.modules()] == [type(m) for m in model.modules()]
    for (k, a), (_, b) in zip(model.state_dict().items(), fast.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.inference_mode():
        assert torch.equal(fast(x), model(x))


class Block(nn.Module):
    """A transformer encoder layer (attention + MLP, batch_first=False keeps torch off its fused fast path)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=256, dropout=0.0)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))  # (T, B, C) -> (T, B, 10)


def test_transformer_block_and_classifier_head():
    torch.manual_seed(0)
    model = prune_(Block(), 0.9).eval()
    x = torch.randn(6, 3, 64)
    fast, report = to_sparse_kernels(model, x, force=True, **FAST)
    choices = {c.name: c for c in report.layers}
    assert set(report.converted) == {"encoder.linear1", "encoder.linear2", "head"}
    # MultiheadAttention hands out_proj's weight to a fused kernel and never calls its forward: left alone.
    assert choices["encoder.self_attn.out_proj"].kernel == "dense"
    assert "not called" in choices["encoder.self_attn.out_proj"].reason
    assert isinstance(fast.encoder.linear1, SparseLinear) and isinstance(fast.head, SparseLinear)
    with torch.inference_mode():
        assert_close(fast(x), model(x))


def test_shared_layer_is_replaced_everywhere():
    torch.manual_seed(0)
    shared = prune_(nn.Linear(32, 32), 0.9)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    x = torch.randn(4, 32)
    fast, report = to_sparse_kernels(model, x, force=True, **FAST)
    assert isinstance(fast[0], SparseLinear) and fast[0] is fast[2]
    assert len(report.layers) == 1
    with torch.inference_mode():
        assert_close(fast(x), model(x))


def test_inference_mode_and_threads_are_respected():
    model = wide_mlp(0.9)
    x = torch.randn(1, 1, 28, 28)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            fast, report = to_sparse_kernels(model, x, force=True, **FAST)
            assert_close(fast(x), model(x))
        assert torch.get_num_threads() == 1 and report.threads == 1
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():  # made inside inference_mode, still usable outside it
        assert_close(fast(x), model(x))


def test_ineligible_layers_are_reported_not_converted():
    torch.manual_seed(0)

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = prune_(nn.Sequential(Scaled(16, 16), nn.Linear(16, 16)), 0.9).eval()
    report = to_sparse_kernels(model, torch.randn(2, 16), force=True, **FAST)[1]
    reasons = {c.name: c.reason for c in report.layers}
    # Layer 1 is converted by force; its reason says "faster" when the timing happened to agree (load-dependent).
    assert "own forward" in reasons["0"] and reasons["1"] in ("forced", "faster")
    assert [c.name for c in report.layers if c.kernel == "csr"] == ["1"]

    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Linear(8, 8), prune_(nn.Linear(8, 8), 0.9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    report = to_sparse_kernels(WithSpare(), torch.randn(2, 8), **FAST)[1]
    assert {c.name: c.reason for c in report.layers}["spare"] == "not called through its forward"


def test_bad_arguments():
    with pytest.raises(ValueError, match="margin"):
        to_sparse_kernels(nn.Linear(2, 2), torch.randn(1, 2), margin=1.5)
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse_kernels(nn.Linear(2, 2), torch.randn(1, 2), min_sparsity=2.0)
    with pytest.raises(ValueError, match="2-D"):
        SparseLinear(torch.zeros(2, 2, 2))


def test_report_and_timer():
    report = KernelReport(batch_size=1, threads=2)
    assert "batch 1" in str(report)
    assert time_call(lambda: None, repeats=2, min_time=1e-4) >= 0.0
