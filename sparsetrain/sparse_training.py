"""Sparse kernels in training: each masked ``nn.Linear`` runs forward and backward on CSR weights where timed faster.

While a mask stays fixed (AC/DC's compressed phases, GMP after its ramp, static, RigL/SET between updates, fine-tuning
a pruned model) a layer at sparsity s needs only a fraction 1 - s of the dense multiply-adds in all three products of
a training step. :class:`SparseKernels` runs them on torch's CSR kernels (MKL sparse BLAS on CPU), per layer:

- forward ``Y = X W^T + b``: ``W`` held as CSR with int32 indices (int64 indices are 1.5-3x slower in MKL);
- input gradient ``dX = dY W``: on a CSR copy of ``W^T`` (same nonzeros, transposed order);
- weight gradient: only at the mask's kept positions, a sampled dense-dense product
  (``torch.sparse.sampled_addmm``: per kept (i, j), the dot product of column i of dY and column j of X). It is
  written into ``weight.grad`` as a *dense* tensor, zero elsewhere, so every torch optimizer, the masks contract,
  ``GradScaler``, gradient clipping and DDP see the gradient they always see (the dense path's, masked).

The ``nn.Linear`` modules and their parameters stay where they are (``state_dict`` unchanged): only the module's
``forward`` is replaced by an instance attribute, and :meth:`SparseKernels.remove` puts the class's back. The CSR
values are gathered from the dense weight by the stored indices whenever the weight changed since the last gather
(its version counter moved, or the sparsifier counted an optimizer step: fused optimizers do not move the version
counter), i.e. once after each optimizer step.

Which layers use it (the rule, per layer, stated so a test can rely on it):

- the step reads dense gradients (``sparsifier.needs_dense_gradients()``: RigL/SET update steps, RDA): dense;
- autocast on, a non-CPU or non-float32/64 weight, a layer below ``min_sparsity`` (default 50%): dense, untimed;
- grad disabled (evaluation): the same choice made separately, by timing the forward alone (no backward) at the
  evaluation's batch size, CSR values gathered once per weight change. On ``mlp-wide`` at 95%, batch 1000, one
  thread: the 2048x2048 layer's forward 19.5 ms on CSR against 76 ms dense, the 10x2048 output layer slower on CSR
  (it stays dense);
- otherwise the first training forward after a mask change times the layer's forward + backward, dense against
  sparse, on tensors shaped like the input it receives (the run's batch size), median of interleaved repeats (at
  most ``repeats``; after 3 the timing stops once the fastest dense sample against the slowest CSR one and the
  reverse pairing give the same choice, which halves the cost of clear-cut layers). CSR
  is chosen only if its time is at most ``1 - margin`` (default 0.95) of dense *and* it saves at least ``min_gain``
  (default 0.1 ms) per forward + backward. Below that the saving is under this machine's timing noise, and the
  layout change around the layer can eat it: a CSR layer's output is column-major, and an elementwise op between
  it and a dense layer then runs its backward on mixed layouts (on LeNet-5 a ReLU's backward took 0.28 ms more per
  step, against a 0.03-0.07 ms gain of its 120x400 layer on CSR). Decisions are kept per layer for
  (batch size, density to within a factor 1.2, training or evaluation), so alternating phases and drop-and-grow
  updates (same density) reuse them instead of timing again. A new density is not timed when an earlier timing
  of the layer already decides it (CSR chosen at a higher density, or not chosen at a lower one): CSR's work
  grows with the kept weights, dense's does not.

Measured on the 2-core CPU this was written on (torch 2.13, 1 thread, 2048x2048, batch 128): forward 8.1 ms
against 19 ms dense at 90%, input gradient 8.2 against 22.7 ms, sampled weight gradient 8.5 against 22.6 ms; a
gather-and-sum weight gradient per nonzero was 25-30x slower than dense, so it is not offered. With 2 threads under
heavy load MKL's CSR kernels were erratic (up to 20x slower than at 1 thread on some calls): timing catches that
and keeps such layers dense.

References: Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", arXiv 1911.11134 (sparse training
whose cost scales with the density); Gale, Elsen & Hooker 2019, arXiv 1902.09574, and Elsen et al. 2020, "Fast
Sparse ConvNets", arXiv 1911.09723, on where unstructured sparsity pays off on CPUs; torch.sparse CSR and
``torch.sparse.sampled_addmm`` (pytorch.org/docs/stable/sparse.html).
"""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .core.sharding import local
from .inference import KernelReport, LayerChoice, time_paired

__all__ = ["SparseKernels", "sparse_linear"]

log = logging.getLogger(__name__)

# Density buckets: decisions are reused while a layer's density stays within a factor of this.
_DENSITY_STEP = 1.2
# Rows of an evaluation batch timed to choose its kernel (see SparseKernels._time_forward).
_EVAL_TIMING_ROWS = 256


class _Structure:
    """One layer's mask as CSR structure: the indices of ``W`` and of ``W^T``, and where their values sit in ``W``."""

    def __init__(self, mask: Tensor) -> None:
        out_features, in_features = mask.shape
        self.shape = (int(out_features), int(in_features))
        flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major order: the CSR order of W
        rows, cols = flat // in_features, flat % in_features
        self.nnz = int(flat.numel())
        self.flat = flat
        self.crow = _crow(rows, out_features)
        self.col = cols.to(torch.int32)
        # W^T in CSR order: sorted by column of W, then row (a stable sort keeps rows ascending within a column).
        order = torch.sort(cols, stable=True).indices
        self.flat_t = flat[order]
        self.crow_t = _crow(cols[order], in_features)
        self.col_t = rows[order].to(torch.int32)
        self.density = self.nnz / max(1, out_features * in_features)
        self._template: Tensor | None = None

    def template(self, dtype: torch.dtype) -> Tensor:
        """A CSR tensor with the structure of ``W`` and zero values: the sampling pattern of the weight gradient."""
        if self._template is None or self._template.dtype != dtype:
            values = torch.zeros(self.nnz, dtype=dtype)
            self._template = _csr(self.crow, self.col, values, self.shape)
        return self._template


def _crow(rows: Tensor, n: int) -> Tensor:
    counts = torch.bincount(rows, minlength=n)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32)


_quiet = False


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    # The structure comes from a mask: valid by construction, so the invariant check (a pass) is skipped. torch
    # warns once per process that CSR is in beta: silence that once, not at every step (catch_warnings costs).
    global _quiet
    if not _quiet:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            csr = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
        _quiet = True
        return csr
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _Layer:
    """The CSR copies of one layer's weight, re-gathered when the weight changes.

    A change is seen from the weight's version counter (every in-place op bumps it) and from ``clock``, the
    sparsifier's count of optimizer steps: torch's fused optimizer kernels (``fused=True``) write the weights without
    bumping the version counter, so the version alone would keep serving the values from before the step.
    """

    def __init__(
        self, name: str, weight: Tensor, structure: _Structure, clock: Callable[[], int] | None = None
    ) -> None:
        self.name = name
        self.structure = structure
        self.weight = weight
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._csr: Tensor | None = None
        self._stamp_t: tuple[int, int] | None = None
        self._csr_t: Tensor | None = None

    def _now(self) -> tuple[int, int]:
        return self.weight._version, (0 if self.clock is None else self.clock())

    def csr(self) -> Tensor:
        now = self._now()
        if self._csr is None or self._stamp != now:
            s = self.structure
            # A new values tensor per gather: a backward still holding the previous CSR keeps its values.
            self._csr = _csr(s.crow, s.col, self.weight.detach().reshape(-1)[s.flat], s.shape)
            self._stamp = now
        return self._csr

    def csr_t(self) -> Tensor:
        now = self._now()
        if self._csr_t is None or self._stamp_t != now:
            s = self.structure
            values = self.weight.detach().reshape(-1)[s.flat_t]
            self._csr_t = _csr(s.crow_t, s.col_t, values, (s.shape[1], s.shape[0]))
            self._stamp_t = now
        return self._csr_t


class _SparseLinearFunction(torch.autograd.Function):
    """``Y = X W^T + b`` on CSR ``W``; backward: ``dX = dY W`` on CSR, ``dW`` only at the kept positions (dense)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, layer: _Layer) -> Tensor:
        csr = layer.csr()
        # (W X^T)^T, written into a column-major (batch, out) tensor: the next layer's X^T is then contiguous (a
        # chain of CSR layers ran 12-20% faster per step than with a row-major copy), and the output is no view
        # (autograd refuses an in-place ReLU on a custom Function's view output).
        y = torch.empty_strided((x.shape[0], csr.shape[0]), (1, x.shape[0]), dtype=x.dtype)
        if bias is None:
            torch.mm(csr, x.t(), out=y.t())
        else:
            torch.addmm(bias.unsqueeze(1), csr, x.t(), out=y.t())
        ctx.save_for_backward(x)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        layer: _Layer = ctx.layer
        s = layer.structure
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(layer.csr_t(), grad_out.t()).t()
        if ctx.needs_input_grad[1]:
            sampled = torch.sparse.sampled_addmm(s.template(grad_out.dtype), grad_out.t(), x, beta=0.0)
            grad_w = torch.zeros(s.shape, dtype=grad_out.dtype)
            grad_w.view(-1).index_copy_(0, s.flat, sampled.values())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


def sparse_linear(x: Tensor, module: nn.Linear, mask: Tensor) -> Tensor:
    """``module(x)`` computed on CSR kernels under ``mask`` (the weight gradient only where ``mask`` is True).

    A one-off functional form of the path :class:`SparseKernels` installs (that class caches the structure and the
    CSR copies between steps; this builds them on every call). ``module.weight`` must be zero where ``mask`` is
    False for the output to equal ``module(x)``.
    """
    return _apply(x, module, _Layer("", module.weight, _Structure(mask.to(torch.bool))))


def _apply(x: Tensor, module: nn.Linear, layer: _Layer) -> Tensor:
    lead = x.shape[:-1]
    flat = x.reshape(-1, module.in_features)
    y = _SparseLinearFunction.apply(flat, module.weight, module.bias, layer)
    return y if x.dim() == 2 else y.reshape(*lead, module.out_features)


class _Forward:
    """The ``forward`` a converted ``nn.Linear`` holds as an instance attribute: asks its owner which path to take.

    Holds weak references only (the module holds this object). A deep copy of the module (an evaluated twin, a
    saved copy) gets the plain dense forward of its own copy, never a path into this run's kernels.
    """

    def __init__(self, owner: SparseKernels, module: nn.Linear, name: str) -> None:
        self.owner = weakref.ref(owner)
        self.module = weakref.ref(module)
        self.name = name

    def __call__(self, x: Tensor) -> Tensor:
        owner, module = self.owner(), self.module()
        assert module is not None
        if owner is None:
            return nn.Linear.forward(module, x)
        return owner._forward(self.name, module, x)

    def __deepcopy__(self, memo: dict) -> Any:
        copied = memo.get(id(self.module()))
        return _DenseForward(copied) if copied is not None else self

    def __reduce__(self) -> Any:
        raise TypeError("a model with sparse training kernels cannot be pickled whole; save its state_dict()")


class _DenseForward:
    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __call__(self, x: Tensor) -> Tensor:
        return nn.Linear.forward(self.module(), x)

    def __deepcopy__(self, memo: dict) -> Any:
        # deepcopy keeps weak references as they are: a copy of a copy must point at its own module.
        copied = memo.get(id(self.module()))
        return _DenseForward(copied) if copied is not None else self


@dataclass
class _Decision:
    kernel: str
    dense_time: float | None
    sparse_time: float | None
    reason: str
    density: float


class SparseKernels:
    """Run the masked ``nn.Linear`` layers of a sparsifier's model on CSR kernels where timed faster, in training.

    Use in your own loop, after creating (and attaching) the sparsifier::

        kernels = sparsetrain.SparseKernels(sparsifier)
        ...train as usual...
        print(kernels.report())     # the per-layer choice at the last mask change
        kernels.remove()            # back to the plain nn.Linear forward

    Everything else is unchanged: the same parameters, gradients written densely into ``.grad`` (zero at masked
    positions), the same ``state_dict``. Layers are chosen as the module docstring states; a layer whose weight is
    not sparsified, a subclass of ``nn.Linear`` with its own forward, or a layer with forward hooks or
    parametrizations is left alone.

    Args:
        sparsifier: the run's sparsifier (its masks, its events and ``needs_dense_gradients``).
        margin: CSR must be at least this fraction faster than dense (forward + backward) to be chosen.
        min_gain: and save at least this many seconds per forward + backward of the layer.
        min_sparsity: layers less sparse than this stay dense without being timed.
        repeats: timing repeats per kernel at most (the median is used); the timing stops after 3 when more
            could not change the choice.
        force: every eligible layer takes CSR whenever the step does not need dense gradients, whatever the
            timing or the sparsity (to test or inspect the kernels; times are still measured when ``time`` is on).
        time_layers: with ``force``, whether to time layers at all (tests switch it off).
    """

    def __init__(
        self,
        sparsifier: Any,
        *,
        margin: float = 0.05,
        min_gain: float = 1e-4,
        min_sparsity: float = 0.5,
        repeats: int = 5,
        force: bool = False,
        time_layers: bool = True,
    ) -> None:
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        if not 0.0 <= min_sparsity <= 1.0:
            raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
        if getattr(sparsifier, "sharded", False):
            raise ValueError("sparse training kernels do not support FSDP-sharded parameters; use sparse_kernels=off")
        self.sparsifier = sparsifier
        if min_gain < 0:
            raise ValueError(f"min_gain must be >= 0 seconds, got {min_gain}")
        self.margin, self.min_gain, self.min_sparsity, self.repeats = margin, min_gain, min_sparsity, repeats
        self.force, self.time_layers = force, time_layers
        self.layers: dict[str, nn.Linear] = {}  # parameter name of the weight -> module
        self.skipped: dict[str, str] = {}  # module name -> why it is left alone
        self._structures: dict[str, _Layer] = {}
        self._masks_key: Hashable = None
        self._decisions: dict[tuple, _Decision] = {}  # (name, batch, density bucket) -> decision
        self._current: dict[str, tuple] = {}  # name -> the key of the training decision in force
        self._current_eval: dict[str, tuple] = {}  # name -> the key of the evaluation decision in force
        self._batch_size: int | None = None
        self.mask_changes = 0
        # Forwards per layer on each kernel: training (dense-gradient steps count as dense) and evaluation.
        self.forwards: dict[str, dict[str, int]] = {}
        self.eval_forwards: dict[str, dict[str, int]] = {}
        by_param = {id(p): n for n, p in sparsifier.params.items()}
        for module_name, module in sparsifier.model.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = by_param.get(id(module.weight))
            why = self._ineligible(module, name)
            if why is not None:
                self.skipped[module_name or type(module).__name__] = why
                continue
            assert name is not None
            if name in self.layers:
                continue  # a module registered twice is converted once
            self.layers[name] = module
            self.forwards[name] = {"csr": 0, "dense": 0}
            self.eval_forwards[name] = {"csr": 0, "dense": 0}
            module.forward = _Forward(self, module, name)  # instance attribute: the class's forward stays
        sparsifier.subscribe(self._on_event)

    @staticmethod
    def _ineligible(module: nn.Linear, name: str | None) -> str | None:
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} has its own forward"
        if name is None:
            return "weight not sparsified"
        if "forward" in module.__dict__:
            return "forward already replaced"
        if module._forward_hooks or module._forward_pre_hooks:
            return "has forward hooks"
        if torch.nn.utils.parametrize.is_parametrized(module):
            return "parametrized"
        if module.weight.device.type != "cpu":
            return "not on CPU (the CSR training kernels are timed on CPU only)"
        if module.weight.dtype not in (torch.float32, torch.float64):
            return f"{module.weight.dtype} weights (CSR kernels are fp32/fp64)"
        return None

    def remove(self) -> None:
        """Give every converted layer its plain ``nn.Linear`` forward back."""
        for module in self.layers.values():
            if isinstance(module.__dict__.get("forward"), _Forward):
                del module.forward
        self.layers = {}
        self._structures = {}

    # ------------------------------------------------------------------ per forward
    def _on_event(self, event: dict[str, Any]) -> None:
        if event.get("event") == "mask_update":
            self.mask_changes += 1

    def _refresh(self) -> None:
        key = self.sparsifier.masks_key()
        if key != self._masks_key:
            # The masks changed: new structures, built lazily per layer; decisions are looked up again.
            self._masks_key = key
            self._structures = {}
            self._current = {}
            self._current_eval = {}

    def _steps_taken(self) -> int:
        return self.sparsifier.count

    def _layer(self, name: str, module: nn.Linear) -> _Layer:
        layer = self._structures.get(name)
        if layer is None:
            structure = _Structure(local(self.sparsifier.masks[name]))
            layer = self._structures[name] = _Layer(name, module.weight, structure, self._steps_taken)
        elif layer.weight is not module.weight:  # replaced (load_state_dict(assign=True)): gather from the new one
            layer = self._structures[name] = _Layer(name, module.weight, layer.structure, self._steps_taken)
        return layer

    def _forward(self, name: str, module: nn.Linear, x: Tensor) -> Tensor:
        dense = nn.Linear.forward
        training = torch.is_grad_enabled()
        counts = (self.forwards if training else self.eval_forwards)[name]
        if (
            torch.is_autocast_enabled("cpu")
            or x.dtype != module.weight.dtype
            or x.device.type != "cpu"
            or x.dim() < 1
            or (training and self.sparsifier.needs_dense_gradients())
        ):
            counts["dense"] += 1
            return dense(module, x)
        self._refresh()
        layer = self._layer(name, module)
        batch = int(x.numel() // max(1, module.in_features))
        if training:
            self._batch_size = batch
        decision = self._decide(name, module, layer, x, batch, training)
        if decision.kernel != "csr":
            counts["dense"] += 1
            return dense(module, x)
        counts["csr"] += 1
        return _apply(x, module, layer)  # with grad disabled the Function runs its forward alone

    # ------------------------------------------------------------------ the choice
    def _decide(
        self, name: str, module: nn.Linear, layer: _Layer, x: Tensor, batch: int, training: bool = True
    ) -> _Decision:
        density = layer.structure.density
        bucket = round(math.log(max(density, 1e-9)) / math.log(_DENSITY_STEP))
        key = (name, batch, bucket, training)
        in_force = self._current if training else self._current_eval
        current = in_force.get(name)
        if current == key:
            return self._decisions[key]
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._inferred(name, batch, density, training)
            if decision is None:
                decision = self._measure(module, layer, x, density, training)
            self._decisions[key] = decision
        in_force[name] = key
        if current is None or self._decisions[current].kernel != decision.kernel:
            log.info("sparse kernels: %s at density %.3f, batch %d (%s): %s", name, density, batch,
                     "training" if training else "evaluation", decision.kernel)  # fmt: skip
        return decision

    def _inferred(self, name: str, batch: int, density: float, training: bool) -> _Decision | None:
        """The choice at ``density`` that a timing at another density of the same layer already implies, if any.

        CSR's work grows with the kept weights and dense's does not: CSR that met the rule at a higher density meets
        it at this lower one, CSR that failed it at a lower density fails it at this higher one. GMP's updates only
        lower the density, so a layer that took CSR is not timed again at its later updates.
        """
        if self.force or 1.0 - density < self.min_sparsity:
            return None
        for (other, other_batch, _, other_training), known in self._decisions.items():
            if (other, other_batch, other_training) != (name, batch, training) or known.sparse_time is None:
                continue
            if known.kernel == "csr" and known.density >= density:
                return _Decision("csr", None, None, f"chosen at density {known.density:.3f}", density)
            if known.kernel == "dense" and known.density <= density:
                return _Decision("dense", None, None, f"not chosen at density {known.density:.3f}", density)
        return None

    def _measure(
        self, module: nn.Linear, layer: _Layer, x: Tensor, density: float, training: bool = True
    ) -> _Decision:
        sparsity = 1.0 - density
        if sparsity < self.min_sparsity and not self.force:
            return _Decision("dense", None, None, f"sparsity below {self.min_sparsity:.0%}", density)
        if self.force and not self.time_layers:
            return _Decision("csr", None, None, "forced", density)
        dense_time, sparse_time = self._time(module, layer, x) if training else self._time_forward(module, layer, x)
        if self.force:
            return _Decision("csr", dense_time, sparse_time, "forced", density)
        kernel, reason = self.rule(dense_time, sparse_time)
        return _Decision(kernel, dense_time, sparse_time, reason, density)

    def rule(self, dense_time: float, sparse_time: float) -> tuple[str, str]:
        """The kernel for a layer timed at ``dense_time`` and ``sparse_time`` seconds, and why."""
        if sparse_time <= (1.0 - self.margin) * dense_time and dense_time - sparse_time >= self.min_gain:
            return "csr", "faster"
        if sparse_time >= dense_time:
            return "dense", "slower"
        if sparse_time > (1.0 - self.margin) * dense_time:
            return "dense", f"faster by less than {self.margin:.0%}"
        return "dense", f"saves less than {self.min_gain * 1e3:g} ms"

    def _time(self, module: nn.Linear, layer: _Layer, x: Tensor) -> tuple[float, float]:
        """Median seconds of one forward + backward of the layer, dense and CSR, on a copy of its input's shape."""
        inputs = x.detach().reshape(-1, module.in_features).clone().requires_grad_(x.requires_grad)
        weight = module.weight.detach().clone().requires_grad_(True)
        bias = None if module.bias is None else module.bias.detach().clone().requires_grad_(True)
        timed = _Layer(layer.name, weight, layer.structure)
        # A local generator: timing must not draw from the global RNG (dropout, a resumed run's draws).
        generator = torch.Generator().manual_seed(0)
        grad = torch.randn(inputs.shape[0], module.out_features, dtype=weight.dtype, generator=generator)

        def dense() -> None:
            torch.nn.functional.linear(inputs, weight, bias).backward(grad)

        def sparse() -> None:
            # In training the weight changes at every step: the values are gathered again each time, and so here.
            timed._csr = timed._csr_t = None
            _SparseLinearFunction.apply(inputs, weight, bias, timed).backward(grad)

        with torch.enable_grad():
            dense_time, sparse_time = time_paired(
                [dense, sparse], repeats=self.repeats, min_time=2e-3, warmup=1, settled=self._settled
            )
        return dense_time, sparse_time

    def _settled(self, samples: list[list[float]]) -> bool:
        """Whether more timing rounds cannot change the kernel: with at least 3 samples each, the choice is the
        same for the fastest dense sample against the slowest CSR one and for the reverse pairing. Most layers are
        decided that early (CSR 2x faster or 2x slower); only close calls pay for every repeat."""
        dense, sparse = samples
        if self.force or len(dense) < 3:
            return False
        return self.rule(min(dense), max(sparse))[0] == self.rule(max(dense), min(sparse))[0]

    def _time_forward(self, module: nn.Linear, layer: _Layer, x: Tensor) -> tuple[float, float]:
        """Median seconds of one evaluation forward of the layer (no gradient), dense and CSR, on ``x``'s shape.

        At most ``_EVAL_TIMING_ROWS`` rows are timed: a forward's cost grows linearly with the batch from there,
        and an evaluation batch (1000 in the trainer) timed whole would cost more than the choice saves in a
        short run."""
        inputs = x.detach().reshape(-1, module.in_features)[:_EVAL_TIMING_ROWS].clone()
        weight = module.weight.detach()
        bias = None if module.bias is None else module.bias.detach()
        # The weights do not change during an evaluation: the CSR values are gathered once, as in the real pass.
        timed = _Layer(layer.name, weight, layer.structure)

        def dense() -> None:
            torch.nn.functional.linear(inputs, weight, bias)

        def sparse() -> None:
            _apply(inputs, module, timed)

        with torch.no_grad():
            dense_time, sparse_time = time_paired(
                [dense, sparse], repeats=self.repeats, min_time=2e-3, warmup=1, settled=self._settled
            )
        return dense_time, sparse_time

    # ------------------------------------------------------------------ report
    def choices(self) -> dict[str, str]:
        """The kernel each converted layer runs on now: 'csr' or 'dense' (before any training step: 'dense')."""
        out = {}
        for name in self.layers:
            key = self._current.get(name)
            out[name] = self._decisions[key].kernel if key is not None else "dense"
        return out

    def report(self) -> KernelReport:
        """The per-layer choice in force (times of forward + backward), in ``sparsetrain bench``'s table."""
        report = KernelReport(batch_size=self._batch_size, threads=torch.get_num_threads())
        for name, module in self.layers.items():
            key = self._current.get(name)
            shape = (module.out_features, module.in_features)
            if key is None:
                mask = self.sparsifier.masks[name]
                sparsity = 1.0 - int(mask.sum()) / max(1, mask.numel())
                report.layers.append(LayerChoice(name, shape, sparsity, None, None, "dense", "not run yet"))
                continue
            d = self._decisions[key]
            report.layers.append(LayerChoice(name, shape, 1.0 - d.density, d.dense_time, d.sparse_time,
                                             d.kernel, d.reason))  # fmt: skip
        for name, why in self.skipped.items():
            report.notes.append(f"{name}: dense ({why})")
        report.notes.append("times: one forward + backward of the layer at the run's batch size")
        used = [f"{name} {c['csr']}/{c['csr'] + c['dense']}" for name, c in self.forwards.items() if c["csr"]]
        if used:
            report.notes.append("training forwards on CSR: " + ", ".join(used))
        used = [f"{name} {c['csr']}/{c['csr'] + c['dense']}" for name, c in self.eval_forwards.items() if c["csr"]]
        if used:
            report.notes.append("evaluation forwards on CSR: " + ", ".join(used))
        return report

    def summary(self) -> dict[str, Any]:
        """The report as plain data (for a run's summary.json): per layer the choice in force and the counts."""
        report = self.report()
        layers = {
            c.name: {
                "kernel": c.kernel,
                "reason": c.reason,
                "sparsity": round(c.sparsity, 6),
                "dense_us": None if c.dense_time is None else round(c.dense_time * 1e6, 1),
                "csr_us": None if c.sparse_time is None else round(c.sparse_time * 1e6, 1),
                "forwards_csr": self.forwards[c.name]["csr"],
                "forwards_dense": self.forwards[c.name]["dense"],
                "eval_forwards_csr": self.eval_forwards[c.name]["csr"],
                "eval_forwards_dense": self.eval_forwards[c.name]["dense"],
            }
            for c in report.layers
        }
        return {"batch_size": report.batch_size, "threads": report.threads, "layers": layers,
                "skipped": dict(self.skipped), "report": str(report)}  # fmt: skip
