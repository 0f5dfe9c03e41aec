"""CPU inference on sparse weights: per ``nn.Linear``, a CSR int32 kernel where it is measured faster, dense elsewhere.

:func:`to_sparse_kernels` copies a model and swaps each eligible ``nn.Linear`` for a :class:`SparseLinear` that
multiplies by its weight held as a ``torch.sparse_csr_tensor`` with int32 indices, but only when timing that layer,
on this machine, on the input it really receives for the sample, shows the sparse kernel faster. The choice is per
layer and per batch size, because neither sparsity nor size alone predicts it (measured on 2 cores, torch 2.13 CPU):

- int32 indices reach MKL's sparse BLAS directly; int64 indices are 1.5-3x slower. A single sample (a 1-D input,
  or a batch of one) goes through the matrix-vector kernel.
- A 90% sparse 1024x1024 layer is about 3.4x faster than dense at batch 1 and 5x at batch 8, but only 1.5x at batch
  256; small layers rarely win, and below 55-65% sparsity (70-85% at batch 64 and more) dense always wins.
- No torch CPU kernel exploits unstructured sparsity in convolutions (unfold + sparse matmul is 2-8x slower than
  dense), so convolutions are left as they are: a sparse convolutional model gains a small file, not speed.

The rule, stated so a test can rely on it: a layer runs on CSR only if its median sparse time is at most
``1 - margin`` (default 0.95) of its median dense time. Timing noise smaller than the margin can therefore only
keep a layer dense, never make it slower than dense; a layer below ``min_sparsity`` (default 50%, well below
every break-even measured) is kept dense without being timed.

References: torch.sparse CSR (pytorch.org/docs/stable/sparse.html); Intel oneMKL sparse BLAS (``mkl_sparse_s_mm``,
``mkl_sparse_s_mv``), which torch's CPU CSR kernels call; Gale, Elsen & Hooker 2019, "The State of Sparsity in Deep
Neural Networks", arXiv 1902.09574, and Elsen et al. 2020, "Fast Sparse ConvNets", arXiv 1911.09723, on where
unstructured sparsity pays off on CPUs.
"""

from __future__ import annotations

import copy
import functools
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["KernelReport", "LayerChoice", "SparseLinear", "time_call", "time_paired", "to_sparse_kernels"]

log = logging.getLogger(__name__)


def _csr_int32(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(crow, col, values) of a dense 2-D weight, indices as int32 (what MKL's LP64 sparse BLAS takes as is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        csr = weight.detach().to_sparse_csr()
    return csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32), csr.values().clone()


class SparseLinear(nn.Module):
    """Inference-only stand-in for ``nn.Linear``: ``y = x W^T + b`` with ``W`` in CSR form with int32 indices.

    Computed as ``(W x^T)^T`` so the sparse operand is on the left, where torch has CPU kernels: ``addmv`` for one
    sample, ``addmm`` (bias fused into the product) for a batch. Leading dimensions are flattened (``(B, T, C)``
    inputs of transformer blocks work). The result of a batched call is a transposed view; the next layer reads it
    without a copy (``x^T`` is then contiguous). No gradient reaches the weight: the parts are buffers.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        crow, col, values = _csr_int32(weight)
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._reset_cache()

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> SparseLinear:
        return cls(layer.weight, layer.bias)

    # The CSR tensor and the bias column are views of the buffers, cached outside them: a CSR tensor cannot be
    # a buffer (it has no storage to deep-copy), and rebuilding it per call costs microseconds that matter at batch
    # 1. In-place changes to the buffers (load_state_dict copies into them) show through the views; anything that
    # replaces a buffer (.to(), .double(), load_state_dict(assign=True)) goes through _apply or
    # _load_from_state_dict, which drop the cache.
    def _reset_cache(self) -> None:
        self._csr: Tensor | None = None
        self._bias_column: Tensor | None = None

    def _build_cache(self) -> Tensor:
        # Invariants held when the buffers were made from a dense weight; checking again would cost a pass.
        self._csr = torch.sparse_csr_tensor(
            self.crow_indices,
            self.col_indices,
            self.values,
            (self.out_features, self.in_features),
            check_invariants=False,
        )
        self._bias_column = None if self.bias is None else self.bias.unsqueeze(1)
        return self._csr

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> SparseLinear:
        result = super()._apply(fn, *args, **kwargs)
        self._reset_cache()
        return result

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._reset_cache()

    @property
    def weight(self) -> Tensor:
        """The weight as a CSR tensor with int32 indices (a view of the buffers)."""
        return self._csr if self._csr is not None else self._build_cache()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.values.numel() / max(1, self.out_features * self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        weight = self._csr if self._csr is not None else self._build_cache()
        bias = self.bias
        if x.dim() == 2:
            if x.shape[0] == 1:
                # One sample: the matrix-vector kernel is faster than a one-column matrix product.
                y = torch.mv(weight, x[0]) if bias is None else torch.addmv(bias, weight, x[0])
                return y.unsqueeze(0)
            # (W x^T)^T, bias fused into the product as the initial value of the output.
            y = torch.mm(weight, x.t()) if bias is None else torch.addmm(self._bias_column, weight, x.t())
            return y.t()
        if x.dim() == 1:
            return torch.mv(weight, x) if bias is None else torch.addmv(bias, weight, x)
        lead = x.shape[:-1]
        return self.forward(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)

    def __getstate__(self) -> dict[str, Any]:
        # Deep copies and pickles carry the buffers only; the views are rebuilt on first use.
        state = self.__dict__.copy()
        state["_csr"] = state["_bias_column"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity={self.sparsity:.3f}, csr int32"
        )


# ---------------------------------------------------------------------------------------------------- timing
def time_call(fn: Callable[[], Any], *, repeats: int = 7, min_time: float = 2e-3, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of a loop long enough to last ``min_time``."""
    return time_paired([fn], repeats=repeats, min_time=min_time, warmup=warmup)[0]


def time_paired(
    fns: Sequence[Callable[[], Any]],
    *,
    repeats: int = 7,
    min_time: float = 2e-3,
    warmup: int = 3,
    settled: Callable[[list[list[float]]], bool] | None = None,
) -> list[float]:
    """Median seconds per call of each of ``fns``, their repeats interleaved so that drift hits them all alike.

    Each function first runs ``warmup`` times, then its loop count is calibrated so that one timed loop lasts at
    least ``min_time``; the calibration's last loop is the first of its ``repeats`` samples. ``settled``, if given,
    sees the samples so far (one list per function) after each further round and ends the timing early when it
    returns True (a caller whose decision can no longer change need not pay for more rounds)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    loops = []
    samples: list[list[float]] = [[] for _ in fns]
    for fn, out in zip(fns, samples):
        # Calibrate a loop count per function so that perf_counter's resolution and the loop cost vanish.
        n = 1
        while True:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time or n >= 1 << 16:
                break
            n = max(2 * n, int(n * min_time / max(elapsed, 1e-9)) + 1)
        loops.append(n)
        out.append(elapsed / n)
    for _ in range(repeats - 1):
        if settled is not None and settled(samples):
            break
        for fn, n, out in zip(fns, loops, samples):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - start) / n)
    return [statistics.median(s) for s in samples]


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class LayerChoice:
    """The decision for one ``nn.Linear``: its measured times (None when not timed) and the kernel chosen."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    dense_time: float | None
    sparse_time: float | None
    kernel: str  # "csr" or "dense"
    reason: str

    @property
    def speedup(self) -> float | None:
        if self.dense_time is None or self.sparse_time is None:
            return None
        return self.dense_time / self.sparse_time


@dataclass
class KernelReport:
    """What :func:`to_sparse_kernels` found and chose, per layer, at the sample's batch size."""

    batch_size: int | None
    threads: int
    layers: list[LayerChoice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        """Names of the layers now running on CSR kernels."""
        return [layer.name for layer in self.layers if layer.kernel == "csr"]

    def __str__(self) -> str:
        head = f"per-layer kernels at batch {self.batch_size} ({self.threads} threads):"
        lines = [head]
        if self.layers:
            rows = [("layer", "shape", "sparsity", "dense us", "csr us", "speedup", "kernel")]
            for c in self.layers:
                rows.append(
                    (
                        c.name,
                        "x".join(str(s) for s in c.shape),
                        f"{c.sparsity:.3f}",
                        "-" if c.dense_time is None else f"{c.dense_time * 1e6:.1f}",
                        "-" if c.sparse_time is None else f"{c.sparse_time * 1e6:.1f}",
                        "-" if c.speedup is None else f"{c.speedup:.2f}x",
                        c.kernel if c.kernel == "csr" else f"dense ({c.reason})",
                    )
                )
            widths = [max(len(r[i]) for r in rows) for i in range(6)]
            for r in rows:
                cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 6)] + [r[6]]
                lines.append("  " + "  ".join(cells))
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- conversion
def _is_plain_linear(module: nn.Module) -> bool:
    # A subclass with its own forward (LoRA, quantised layers) computes something else: leave it alone.
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _capture_inputs(
    model: nn.Module, args: tuple, modules: Sequence[nn.Module] | None = None
) -> dict[nn.Module, Tensor]:
    """Run the sample once; record the first input each Linear (or each of ``modules``) really receives through its
    forward.

    Layers whose weight is used without calling their forward (``nn.MultiheadAttention.out_proj`` passes its
    weight to a functional kernel) record nothing and are left alone.
    """
    seen: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple) -> None:
        if module not in seen and inputs and isinstance(inputs[0], Tensor):
            seen[module] = inputs[0].detach().clone()  # a later in-place op must not change it

    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with torch.inference_mode():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _ineligible(module: nn.Linear, captured: Tensor | None, min_sparsity: float, sparsity: float) -> str | None:
    if not _is_plain_linear(module):
        return f"{type(module).__name__} has its own forward"
    if captured is None:
        return "not called through its forward"
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "parametrized"
    if module.weight.device.type != "cpu":
        return "not on CPU"
    if module.weight.dtype not in (torch.float32, torch.float64):
        return f"{module.weight.dtype} weights (CSR kernels are fp32/fp64)"
    if captured.dtype != module.weight.dtype:
        return f"input dtype {captured.dtype} differs from the weight's"
    if sparsity < min_sparsity:
        return f"sparsity below {min_sparsity:.0%}"
    return None


def _batch_size(args: tuple) -> int | None:
    first = args[0] if args and isinstance(args[0], Tensor) else None
    if first is None:
        return None
    return 1 if first.dim() <= 1 else int(first.shape[0])


def to_sparse_kernels(
    model: nn.Module,
    sample_input: Tensor | tuple,
    *,
    margin: float = 0.05,
    min_sparsity: float = 0.5,
    repeats: int = 7,
    min_time: float = 2e-3,
    force: bool = False,
) -> tuple[nn.Module, KernelReport]:
    """Copy ``model`` and run each eligible ``nn.Linear`` on CSR int32 weights where that is measured faster.

    Each plain ``nn.Linear`` reached through its forward, anywhere in the module tree, is timed on the very input it
    receives when ``model(sample_input)`` runs: dense (``nn.Linear``) against :class:`SparseLinear`, median of
    ``repeats`` interleaved runs after warm-up, under ``torch.inference_mode()``. Choose the sample's batch size as
    the one you will serve: the best kernel depends on it.

    Rule: a layer is switched to CSR only if ``sparse_time <= (1 - margin) * dense_time`` and its output matches the
    dense one (``allclose``); layers below ``min_sparsity`` are kept dense untimed. So with the default 5% margin a
    layer at 30% sparsity keeps the dense kernel (CSR is several times slower there), and no layer becomes slower
    than dense beyond timing noise.

    Args:
        model: any module; left untouched (the result is a deep copy). Put it in eval mode first, as for inference.
        sample_input: a tensor, or a tuple of positional arguments, shaped like what will be served.
        margin: the fraction by which CSR must beat dense to be chosen.
        min_sparsity: layers sparser than this are timed; the others keep the dense kernel.
        repeats: timing repeats per kernel (the median is used).
        min_time: seconds each timing repeat lasts at least (a loop of calls).
        force: put every eligible layer on CSR whatever the timing says (to test or inspect the kernel; the times
            are still measured and reported).

    Returns:
        ``(model copy, KernelReport)``. The copy is for inference: its CSR layers hold buffers, not parameters.
        The number of torch threads is read, never changed.
    """
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    args = sample_input if isinstance(sample_input, tuple) else (sample_input,)
    report = KernelReport(batch_size=_batch_size(args), threads=torch.get_num_threads())
    converted = copy.deepcopy(model)
    linears = [(name, m) for name, m in converted.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        report.notes.append(
            "no nn.Linear layer: the model is unchanged (convolutions have no faster sparse CPU kernel)"
        )
        return converted, report

    captured = _capture_inputs(converted, args)
    replacements: dict[nn.Module, SparseLinear] = {}
    with torch.inference_mode():
        for name, layer in linears:
            weight = layer.weight.detach()
            sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(1, weight.numel())
            shape = (int(weight.shape[0]), int(weight.shape[1]))
            why_not = _ineligible(layer, captured.get(layer), min_sparsity, sparsity)
            if why_not is not None:
                report.layers.append(LayerChoice(name, shape, sparsity, None, None, "dense", why_not))
                continue
            x = captured[layer]
            sparse = SparseLinear.from_linear(layer)
            dense_time, sparse_time = time_paired(
                [functools.partial(layer, x), functools.partial(sparse, x)], repeats=repeats, min_time=min_time
            )
            if sparse_time > (1.0 - margin) * dense_time and not force:
                reason = "slower" if sparse_time >= dense_time else f"faster by less than {margin:.0%}"
                report.layers.append(LayerChoice(name, shape, sparsity, dense_time, sparse_time, "dense", reason))
                continue
            expected, got = layer(x), sparse(x)
            if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5 * float(expected.abs().max().clamp(min=1))):
                log.warning("layer %s: the CSR kernel's output differs from dense; keeping dense", name)
                report.layers.append(LayerChoice(name, shape, sparsity, dense_time, sparse_time, "dense", "mismatch"))
                continue
            replacements[layer] = sparse
            reason = "faster" if sparse_time <= (1.0 - margin) * dense_time else "forced"
            report.layers.append(LayerChoice(name, shape, sparsity, dense_time, sparse_time, "csr", reason))

    # Swap in place wherever the layer is registered (a shared layer may sit under several parents).
    for parent in converted.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and child in replacements:
                parent._modules[child_name] = replacements[child]
    if not replacements:
        report.notes.append("every nn.Linear keeps the dense kernel: the model runs as before")
    return converted, report
