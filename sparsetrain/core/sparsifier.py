"""The engine every method stands on: mask store, hard-zero enforcement, explicit time, state_dict.

Contracts (docs/contracts.md):
- masks are boolean tensors keyed by the parameter's qualified name;
- after every real optimizer step masked weights are exactly +0.0 (NaN and inf included), so
  ``model.state_dict()`` *is* the sparse model; before the step their gradients are set to exactly 0, so no
  optimizer buffer ever leaks into them;
- ``count`` counts real optimizer steps (a step that ``GradScaler`` skips never reaches the hooks);
- randomness comes from a local generator seeded by (seed, step), never the global RNG.

A method subclasses :class:`Sparsifier` and overrides ``on_step`` (what happens at a step boundary) and, if
it has a schedule, ``target_sparsity_at`` / ``phase_at`` / ``timeline``; a method that prunes by a score on a
schedule subclasses :class:`~sparsetrain.core.ScheduledPruning` instead, which derives all of them from one
:class:`~sparsetrain.schedules.Schedule`.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import maskops
from ..distributions import check_distribution, layer_sparsities
from ..optim_state import SECOND_MOMENT_KEYS, per_element_buffers, reset_momentum
from ..schedules import UNITS, Phase, resolve_total_steps, timeline_of, to_steps
from ..structured.groups import CONSUMER, NORM, PRODUCER
from .capabilities import Capability
from .packed_masks import PackedMask, PackedMasks, check_mask_storage
from .selection import input_dim, select_parameters
from .sharding import (
    UnsplittableState,
    all_reduce_sum,
    assemble_rows,
    check_sharding,
    local,
    local_rows,
    sharded_topk_masks,
)

# The mask type of whole zero-invariant groups (sparsetrain.structured), as opposed to 'unstructured' and 'N:M'.
CHANNEL = "channel"

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass
class SparsityReport:
    """Sparsity measured on the weights themselves: zeros / elements, overall and per sparsified layer."""

    overall: float
    layers: dict[str, float]
    zeros: int
    total: int


@dataclass
class MemoryReport:
    """Bytes a sparsifier holds beside the model and the optimizer (see :meth:`Sparsifier.memory_bytes`).

    ``masks``: the boolean masks (1 byte per sparsified weight). ``method_state``: every other tensor the method
    keeps between steps (AC/DC's packed previous masks, kept second moments, a method's buffers).
    ``workspace``: scratch reused by the mask enforcement, a constant few MB whatever the model's size.
    ``parameters``: the number of sparsified weights the per-parameter figures divide by.
    """

    masks: int
    method_state: int
    workspace: int
    parameters: int

    @property
    def total(self) -> int:
        return self.masks + self.method_state + self.workspace

    @property
    def bytes_per_parameter(self) -> float:
        """Masks and method state per sparsified weight (the workspace is a constant, left out)."""
        return (self.masks + self.method_state) / max(1, self.parameters)


def _tensors_in(value: Any) -> list[Tensor]:
    """Every tensor in ``value``, looking into dicts, lists and tuples."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []


def derived_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the draws of (seed, step), mixed (splitmix64) so that it never equals a small seed.

    The trainer calls ``torch.manual_seed(seed)`` before building the model: a method generator seeded with plain
    ``seed`` at step 0 would replay the weight init's draws, and a "random" mask would keep the largest weights.
    """
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + step + 0x632BE59BD9B4E019) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 1


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
# Mask elements converted to integers per block by _zero_where_masked: large enough that the per-block Python cost
# vanishes, small enough that the block stays in cache between its conversion and the multiply that reads it.
_BLOCK = 1 << 20


# Per (dtype, device): row b holds the 8 bits of byte value b as 0/1 (bit i in column i, pack_mask's order).
_BYTE_BITS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _byte_bits(dtype: torch.dtype, device: torch.device) -> Tensor:
    table = _BYTE_BITS.get((dtype, device))
    if table is None:
        byte = torch.arange(256, dtype=torch.int32)
        bits = (byte.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1
        table = _BYTE_BITS[(dtype, device)] = bits.to(dtype=dtype, device=device).contiguous()
    return table


def _unpack_block_into(block: Tensor, mask: PackedMask, start: int, workspace: dict[torch.dtype, Tensor]) -> None:
    """Write positions ``start:start + len(block)`` of a packed mask into ``block`` as 0/1.

    One gather from a 256 x 8 table of each byte's bits, written straight into ``block``, faster than shifting
    and masking the bytes and copying the result (``benchmarks/scale.py --kernel`` times the whole pass). The byte
    indices go through a reused uint8 scratch viewed as int32.
    """
    n, skip = block.numel(), start % 8
    bits = mask.bits[start // 8 : (start + n + 7) // 8]
    m = bits.numel()
    scratch = workspace.get(torch.uint8)
    if scratch is None or scratch.device != bits.device or scratch.numel() < 4 * m:
        scratch = workspace[torch.uint8] = torch.empty(4 * max(m, _BLOCK // 8 + 2), dtype=torch.uint8,
                                                       device=bits.device)  # fmt: skip
    index = scratch[: 4 * m].view(torch.int32)
    index.copy_(bits)
    table = _byte_bits(block.dtype, block.device)
    if skip == 0 and n == 8 * m:
        torch.index_select(table, 0, index, out=block.view(m, 8))
    else:  # a block that starts or ends inside a byte (the last block of a tensor)
        block.copy_(torch.index_select(table, 0, index).view(-1)[skip : skip + n])


@torch.no_grad()
def _zero_where_masked(
    tensors: list[Tensor], masks: Sequence[Tensor | PackedMask], workspace: dict[torch.dtype, Tensor]
) -> None:
    """Set ``tensors`` to exactly +0.0 where their boolean ``masks`` are False; kept values stay bit for bit.

    Multiplying the values by a 0/1 mask would keep NaN and inf (NaN * 0 is NaN) and turn negative weights into
    -0.0. Multiplying their *bits*, read as integers of the same width, by the 0/1 mask gives all-zero bits, which
    is +0.0 whatever the value was. The masks stay boolean (1 byte per weight): each block of ``_BLOCK`` mask
    elements is converted into a reused integer ``workspace`` (one block per width, a few MB whatever the model)
    and the bits are multiplied by it with one fused foreach kernel per filled workspace. Measured on CPU (100M
    weights, 2 threads): 13 ms, against 11 ms for integer mask copies kept between steps (4 bytes per weight) and
    56-110 ms for ``masked_fill_``, ``torch.where(out=)`` or a multiply by the bool mask itself (mixed dtypes take
    a slow elementwise path). Tensors of a width with no integer type (complex128) or not contiguous take
    ``masked_fill_``. A :class:`PackedMask` (``mask_storage='packed'``) is unpacked block by block into a uint8
    workspace on the way, so no whole unpacked mask ever exists.
    """
    pending: dict[torch.dtype, tuple[list[Tensor], list[Tensor], int]] = {}

    def flush(dtype: torch.dtype) -> None:
        bits, blocks, _ = pending.pop(dtype)
        torch._foreach_mul_(bits, blocks)

    for tensor, mask in zip(tensors, masks):
        dtype = _SAME_WIDTH_INT.get(tensor.element_size())
        if dtype is None or not tensor.is_contiguous() or tensor.numel() != mask.numel():
            tensor.masked_fill_(~(mask.unpack() if isinstance(mask, PackedMask) else mask), 0)
            continue
        bits = tensor.view(-1).view(dtype)
        flat = None if isinstance(mask, PackedMask) else mask.reshape(-1)
        space = workspace.get(dtype)
        if space is None or space.device != tensor.device:
            space = workspace[dtype] = torch.empty(_BLOCK, dtype=dtype, device=tensor.device)
        for start in range(0, bits.numel(), _BLOCK):
            end = min(bits.numel(), start + _BLOCK)
            views, blocks, used = pending.get(dtype, ([], [], 0))
            if used + end - start > _BLOCK:
                flush(dtype)
                views, blocks, used = [], [], 0
            block = space[used : used + end - start]
            if flat is None:
                _unpack_block_into(block, mask, start, workspace)
            else:
                block.copy_(flat[start:end])
            views.append(bits[start:end])
            blocks.append(block)
            pending[dtype] = (views, blocks, used + end - start)
    for dtype in list(pending):
        flush(dtype)


ENFORCE_MODES = ("auto", "always", "check")


def _finite(*values: Any) -> bool:
    return all(math.isfinite(float(v)) for v in values)


def _sgd_keeps_zeros(group: dict) -> bool:
    # With a gradient of exactly 0, a momentum buffer of 0 and a weight of +0.0: (coupled) decay adds wd * 0, the
    # buffer stays momentum * 0 + 0, and the weight becomes +0.0 - lr * 0 = +0.0 (IEEE: +0 + -0 is +0).
    return _finite(group["lr"], group["momentum"], group["dampening"], group["weight_decay"])


def _adam_keeps_zeros(group: dict) -> bool:
    # exp_avg stays 0 (betas in [0, 1)); the update exp_avg / (sqrt(v_hat) + eps) is 0 / positive only with eps > 0
    # (a second moment kept for re-entry may be 0: 0 / 0 would be NaN). Decoupled decay multiplies the weight by
    # 1 - lr * wd, which keeps +0.0 only while that factor is not negative (a negative one gives -0.0).
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    return (
        _finite(lr, beta1, beta2, eps, wd)
        and 0 <= float(beta1) < 1
        and 0 <= float(beta2) < 1
        and float(eps) > 0
        and (not group.get("decoupled_weight_decay") or float(lr) * float(wd) <= 1)
    )


# The optimizers whose update provably leaves a masked weight at +0.0 when its gradient and first-moment buffers
# are exactly 0, by exact type (a subclass may change the update): a proof per update rule, checked on the
# hyperparameters of every step. Any other optimizer gets the re-zeroing after every step.
_KEEPS_ZEROS: dict[type, Callable[[dict], bool]] = {
    torch.optim.SGD: _sgd_keeps_zeros,
    torch.optim.Adam: _adam_keeps_zeros,
    torch.optim.AdamW: _adam_keeps_zeros,
}


def register_keeps_zeros(optimizer_type: type, like: type) -> None:
    """Declare that ``optimizer_type``'s update keeps zeros under the same conditions as ``like``'s (a type listed
    in ``_KEEPS_ZEROS``), so the post-step re-zeroing may be skipped with it too. For optimizers that apply
    ``like``'s update rule, such as :class:`sparsetrain.optim.MaskedSGD`."""
    _KEEPS_ZEROS[optimizer_type] = _KEEPS_ZEROS[like]


def optimizer_keeps_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s next step leaves weights at +0.0 whose gradient and first moments are exactly 0.

    True for ``torch.optim.SGD`` (momentum, Nesterov, dampening, weight decay), ``Adam`` and ``AdamW`` with
    ``eps > 0``, betas in [0, 1), finite settings, and for AdamW ``lr * weight_decay <= 1``, in each of torch's
    implementations (for-loop, ``foreach``, ``fused``: the same update rule, so the same proof; ``enforce='check'``
    asserts it in tests/test_scale.py); False for every other optimizer. Read at every step, so a learning-rate
    schedule is followed.
    """
    rule = _KEEPS_ZEROS.get(type(optimizer))
    return rule is not None and all(rule(group) for group in optimizer.param_groups)


def _model_reloaded(owner: weakref.ref) -> None:
    sparsifier = owner()
    if sparsifier is not None:
        sparsifier._follow_model_parameters()
        sparsifier._forget_zeros()


def check_nm_parameters(
    params: dict[str, nn.Parameter] | dict[str, Tensor],
    nm: tuple[int, int],
    input_dims: Mapping[str, int] | None = None,
) -> None:
    """Refuse any of ``params`` (by qualified name) that cannot take an N:M mask, naming how to leave it out.

    ``input_dims``: each parameter's input dimension (:func:`~sparsetrain.core.selection.input_dim`; default 1).
    """
    for name, param in params.items():
        maskops.check_nm_shape(
            param.shape,
            *nm,
            what=f"parameter {name!r}",
            remedy=f"exclude it with exclude=[{name!r}]",
            input_dim=1 if input_dims is None else input_dims[name],
        )


class Sparsifier:
    """Base class of every sparse-training method.

    Use: ``s = sparsetrain.create("acdc", model, sparsity=0.9, total_epochs=E, steps_per_epoch=len(loader))``,
    then ``s.attach(optimizer)`` and train as usual; save ``s.state_dict()`` with the checkpoint.
    To resume, build model, optimizer and sparsifier as for a new run, then load all three state dicts: a
    sparsifier applies its step-0 masks to the model it is created on (one-shot pruning of a loaded
    pretrained model relies on that), so create it before loading a checkpoint into the model.

    Common options (every method accepts them):
        sparsity: target fraction of zeros in [0, 1) over the sparsified weights.
        distribution: 'global' (one magnitude ranking across layers), 'uniform' or 'erk'.
        mask_type: 'unstructured', 'N:M' (e.g. '2:4': N kept of every M along the input dimension, which is
            dim 0 of a transposed (in, out) Hugging Face ``Conv1D`` weight: ``selection.input_dim``), or 'channel'
            (methods with ``Capability.CHANNEL``): whole zero-invariant groups (an output channel or unit with its
            bias, batch-norm scale and shift and the input slices that read it; :mod:`sparsetrain.structured`)
            are pruned, ranked by the root-mean-square of the score over the group's parameters; ``sparsity``
            is then the fraction of groups pruned, and ``example_input`` is needed.
        channel_multiple: with ``mask_type='channel'`` and the 'uniform' distribution, each channel set's kept
            count rounded to the nearest multiple of it (:func:`sparsetrain.maskops.channel_keep_count`; a set
            narrower than it is not rounded), so the slim model's widths suit blocked CPU kernels. 1 (default):
            no rounding. ``target_flops`` (oto, variational) accounts for the rounding.
        example_input: an input batch (only its shape matters) for finding the groups of ``mask_type='channel'``.
        include / exclude: glob patterns over parameter names (default: every weight with dim >= 2).
        seed: seeds every random choice the method makes, together with the step.
        total_steps, or total_epochs with steps_per_epoch: the run's length (schedules need it). Both count
            optimizer steps: with gradient accumulation over ``a`` batches, steps_per_epoch is
            ``len(loader) // a``, not ``len(loader)`` (which would stretch every schedule ``a`` times).
        unit: how the method's time options are given: 'fraction' of training, 'epochs' or 'steps'.
        enforce: the re-zeroing of masked weights after each step. 'auto' (default) skips it where the optimizer
            provably cannot move them (:func:`optimizer_keeps_zeros`: their gradients were masked before the step,
            their first moments are 0; checked at every step, redone in full after any mask change or load);
            'always' re-zeroes after every step; 'check' skips as 'auto' and asserts the zeros after every step (a
            RuntimeError names the first nonzero). Write weights outside the optimizer only through
            ``model.load_state_dict`` (or call ``sparsifier.apply_masks()`` after writing them).
        mask_storage: 'bool' (default: 1 byte per sparsified weight) or 'packed' (1 bit per weight, 1/8 byte: the
            per-step enforcement reads the bits block by block; reading ``sparsifier.masks[name]`` unpacks a new
            boolean tensor). Results are bit-identical either way; 'packed' costs some time in each step's
            enforcement (``benchmarks/scale.py`` measures it).
    """

    name: ClassVar[str] = ""
    default_distribution: ClassVar[str] = "global"
    # What the method declares about itself; the flags and who reads them are listed in Capability's docstring.
    capabilities: ClassVar[Capability] = Capability(0)
    # Score kinds ``scores`` computes (a method picks one by name).
    SCORES: ClassVar[tuple[str, ...]] = ("magnitude", "random", "gradient")
    # Methods that act before the optimizer step (RigL reads the step's dense gradients) need attach().
    needs_attach: ClassVar[bool] = False
    # Methods that mask a freshly initialised model from step 0 (static, SET, RigL, GaP) set this from their
    # ``rescale_init`` option before calling ``Sparsifier.__init__``; see ``rescale_kept_weights``.
    rescale_init: bool = False
    # Whether the method runs on FSDP2-sharded parameters (every rank holding its rows). Methods that are their own
    # optimizer (rda, cram), need the full flat gradient (mfac) or train replicas apart (pgap) say False.
    shardable: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        *,
        sparsity: float | None = None,
        distribution: str | None = None,
        mask_type: str = "unstructured",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        seed: int = 0,
        total_steps: int | None = None,
        total_epochs: float | None = None,
        steps_per_epoch: int | None = None,
        unit: str = "fraction",
        enforce: str = "auto",
        mask_storage: str = "bool",
        example_input: Tensor | None = None,
        channel_multiple: int = 1,
    ) -> None:
        self.model = model
        self.channel_multiple = maskops.check_channel_multiple(channel_multiple)
        if channel_multiple != 1 and mask_type != CHANNEL:
            raise ValueError(
                f"channel_multiple rounds the kept channels of mask_type='channel'; got mask_type={mask_type!r} "
                f"with channel_multiple={channel_multiple}"
            )
        if channel_multiple != 1 and distribution not in (None, "uniform"):
            raise ValueError(
                "channel_multiple rounds each channel set's kept count, which the 'uniform' distribution fixes; "
                f"got distribution={distribution!r}"
            )
        self.mask_storage = check_mask_storage(mask_storage)
        self.channel_groups: Any = None  # the structured.Groups of channel masks
        if mask_type == CHANNEL:
            self.params = self._channel_setup(model, example_input, include, exclude, distribution)
        else:
            self.params = select_parameters(model, include, exclude)
        # FSDP2 (fully_shard): parameters are DTensors sharded on dim 0; masks are kept for this rank's rows only.
        self.process_group = check_sharding(self.params)
        self.sharded = self.process_group is not None
        if self.sharded and not self.shardable:
            raise ValueError(
                f"method {self.name!r} does not support FSDP-sharded parameters (fully_shard); methods that do: "
                "acdc, dense, gap, gmp, imp, magnitude, rigl, set, static (or train it with DDP)"
            )
        if self.sharded and mask_type == CHANNEL:
            raise ValueError(
                "mask_type='channel' does not support FSDP-sharded parameters (fully_shard): a channel group spans "
                "several layers' shards; use unstructured or N:M masks, or train it with DDP"
            )
        self.nm = None if mask_type == CHANNEL else maskops.parse_nm(mask_type)
        if self.nm is not None and Capability.NM not in self.capabilities:
            raise ValueError(f"method {self.name!r} does not support N:M masks (mask_type={mask_type!r})")
        # Each weight's input dimension, along which its N:M groups run: 0 for a transposed (in, out) Conv1D.
        self.nm_dims = {n: input_dim(model, n) for n in self.params} if self.nm is not None else {}
        if self.nm is not None:
            sparsity = maskops.nm_sparsity(mask_type, sparsity)
            check_nm_parameters(self.params, self.nm, self.nm_dims)
            across = [n for n, d in self.nm_dims.items() if d == 0]
            if self.sharded and across:
                # FSDP splits dim 0 between ranks, so a group of M along it could span two ranks' shards.
                raise ValueError(
                    f"mask_type {mask_type!r} on FSDP-sharded parameters (fully_shard): parameter {across[0]!r} is "
                    "a transposed (in, out) Conv1D weight whose N:M groups run along dim 0, the dimension FSDP "
                    f"splits between ranks; exclude it with exclude=[{across[0]!r}], or train it with DDP"
                )
        if sparsity is None:
            raise ValueError(f"method {self.name!r} needs sparsity= (a number in [0, 1), e.g. 0.9)")
        self.final_sparsity = maskops.check_sparsity(sparsity)
        # Channel masks rank per layer unless told otherwise: across layers, group magnitudes scale with each
        # layer's init (He init: 1 / sqrt(fan_in)), and a global ranking cuts the widest-fan-in layer to one channel.
        default = "uniform" if mask_type == CHANNEL else self.default_distribution
        self.distribution = check_distribution(distribution or default)
        self.mask_type = mask_type
        self.seed = int(seed)
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = resolve_total_steps(total_steps, total_epochs, steps_per_epoch)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}; got {unit!r}")
        if unit == "epochs" and steps_per_epoch is None:
            raise ValueError(
                f"unit='epochs' needs steps_per_epoch= (for example len(loader)) to place {self.name}'s "
                "warmup/start/end options in steps"
            )
        self.unit = unit
        if enforce not in ENFORCE_MODES:
            raise ValueError(f"enforce must be one of {', '.join(ENFORCE_MODES)}; got {enforce!r}")
        self.enforce = enforce
        if not isinstance(self.rescale_init, bool):
            raise ValueError(f"rescale_init must be true or false, got {self.rescale_init!r}")
        self.init_rescaled = False
        self.count = 0
        self.masks = {n: torch.ones_like(local(p), dtype=torch.bool) for n, p in self.params.items()}
        self.history: list[Event] = []
        self.mask_version = 0
        self._enforced_masks: dict[str, Tensor | PackedMask] = {}
        self._workspace: dict[torch.dtype, Tensor] = {}  # _zero_where_masked's integer blocks, one per width
        # The post-step re-zeroing may be skipped only while masked weights are +0.0 and their first moments 0:
        # known after a step that enforced everything, lost when anything is loaded from outside (model, optimizer
        # or sparsifier state) or attached. _grads_masked_at: the mask version this step's gradients were masked
        # under (None: not masked).
        self._zeros_known = False
        self._grads_masked_at: int | None = None
        self.enforcement = {"rezeroed": 0, "skipped": 0}  # post-step re-zeroings done and proven unnecessary
        # Loading weights into the model may bring values at masked positions, and load_state_dict(assign=True)
        # new Parameter objects (a weak reference: the hook must not keep a replaced sparsifier and its masks alive).
        owner = weakref.ref(self)
        model.register_load_state_dict_post_hook(lambda module, keys: _model_reloaded(owner))
        self._second_moments: dict[str, dict[str, Tensor]] = {}
        self._listeners: list[Callable[[Event], None]] = []
        self._hooks: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        # The attached optimizer that masks gradients in its own update (see before_step), if any.
        self._masks_handed_to: torch.optim.Optimizer | None = None
        self._replaced_under_attached = False  # see _follow_model_parameters
        self._phase: str | None = None
        self.setup()
        self._boundary()

    @property
    def masks(self) -> MutableMapping[str, Tensor]:
        """The boolean mask of each sparsified parameter, by qualified name (True: kept)."""
        return self._masks

    @masks.setter
    def masks(self, masks: Mapping[str, Tensor]) -> None:
        self._masks = PackedMasks(masks) if self.mask_storage == "packed" else masks

    def _channel_setup(
        self,
        model: nn.Module,
        example_input: Tensor | None,
        include: str | Sequence[str] | None,
        exclude: str | Sequence[str] | None,
        distribution: str | None,
    ) -> dict[str, nn.Parameter]:
        """The parameters channel masks cover: every parameter a zero-invariant group slices."""
        if Capability.CHANNEL not in self.capabilities:
            raise ValueError(f"method {self.name!r} does not support channel masks (mask_type='channel')")
        if example_input is None:
            raise ValueError(
                "mask_type='channel' needs example_input= (an input batch, e.g. next(iter(loader))[0][:1]) to find "
                "the model's zero-invariant groups"
            )
        if include is not None or exclude is not None:
            raise ValueError(
                "mask_type='channel' prunes the model's zero-invariant groups; include/exclude do not apply"
            )
        if distribution not in (None, "global", "uniform"):
            raise ValueError(
                f"mask_type='channel' ranks groups 'global' or 'uniform' (per layer); got {distribution!r}"
            )
        from ..structured import groups  # only here: the graph analysis is needed by channel masks alone

        self.channel_groups = groups(model, example_input)
        if not len(self.channel_groups):
            raise ValueError("mask_type='channel': the model has no prunable channel (only its output layer)")
        named = dict(model.named_parameters())
        return {name: named[name] for name in self.channel_groups.param_names()}

    # ----------------------------------------------------------------- hooks a method overrides
    def setup(self) -> None:
        """Resolve the method's schedule (called once by ``__init__``, before the step-0 boundary)."""

    def on_step(self, step: int) -> None:
        """Called at step 0 and after every real optimizer step, with ``step == self.count``."""

    def target_sparsity_at(self, step: int) -> float:
        """The sparsity the schedule asks for while taking step ``step``."""
        return self.final_sparsity

    def phase_at(self, step: int) -> str:
        """'dense' or 'sparse' for step ``step`` (methods with more phases name them: GaP 'grow0', IMP 'round1')."""
        return "sparse" if self.target_sparsity_at(step) > 0 else "dense"

    def timeline(self) -> list[Phase]:
        """The run's phases as step intervals (for plots and logs)."""
        return timeline_of(self.phase_at, self.total_steps or max(self.count, 1))

    def lr_factor(self, step: int, base: Callable[[int], float]) -> float:
        """Learning-rate multiplier at ``step`` given the run's own schedule ``base`` (a function of the step).

        Most methods leave the schedule alone; IMP replaces it inside its retraining rounds.
        """
        return base(step)

    def synchronize_gradients(self) -> bool:
        """Whether data-parallel ranks all-reduce gradients at this step (parallel GaP trains replicas apart)."""
        return True

    def needs_dense_gradients(self) -> bool:
        """Whether the coming step reads the gradients of masked weights (RigL's update steps).

        A communication hook that sends only live coordinates must send everything on such steps, and the trainer
        charges them the dense weight gradient (2 f_S + f_D training FLOPs per sample instead of 3 f_S).
        """
        return False

    def masks_key(self) -> Hashable:
        """Changes whenever the masks do: caches of anything computed from the masks key on it.

        ``mask_version`` counts mask updates; methods whose masks also follow the weights between updates (rda)
        add their own counter.
        """
        return self.mask_version

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer to train with, given the one the user built (most methods: that one, unchanged).

        Methods that are optimizers themselves replace it (``rda`` builds :class:`~sparsetrain.optim.RDA` over
        the same parameters and learning rate) or wrap it (``cram`` wraps it in :class:`~sparsetrain.optim.CrAM`).
        Attach the sparsifier to the optimizer this returns.
        """
        return optimizer

    def extra_state(self) -> dict:
        """Method state beyond masks and count (saved in ``state_dict``)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    @property
    def reentry_keeps_second_moments(self) -> bool:
        """Whether pruned weights get their second moments back when they re-enter (see ``set_masks``).

        True for methods whose pruned weights re-enter training as a rule: alternating phases (AC/DC) and group
        phases (GaP, pgap). RigL and SET zero every slot of a grown weight instead, as RigL's reference does; the
        other methods never let a pruned weight back. Keeping costs one tensor per second-moment buffer of each
        pruned parameter, saved in ``state_dict`` (none with plain or momentum SGD).
        """
        return bool(self.capabilities & (Capability.PHASES | Capability.GROUP_PHASES))

    # ----------------------------------------------------------------- public API
    @property
    def phase(self) -> str:
        """The current phase, 'dense' or 'sparse' (the phase of the next step)."""
        return self.phase_at(self.count)

    @property
    def target_sparsity(self) -> float:
        return self.target_sparsity_at(self.count)

    def attach(self, optimizer: torch.optim.Optimizer) -> Sparsifier:
        """Enforce the masks around every real ``optimizer.step()`` (hooks; nothing is patched)."""
        if self._hooks:
            raise ValueError("this sparsifier is already attached to an optimizer; call detach() first")
        self._follow_model_parameters()
        missing = self._not_held_by(optimizer)
        if missing:
            raise ValueError(f"the optimizer does not hold these sparsified parameters: {', '.join(missing)}")
        self._optimizer = optimizer
        self._replaced_under_attached = False
        self._hooks = [
            optimizer.register_step_pre_hook(self._pre_step_hook),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step(opt)),
            optimizer.register_load_state_dict_post_hook(lambda opt: self._forget_zeros()),
        ]
        self._zero_state_where_masked(optimizer)
        self._forget_zeros()
        self._hand_over_masks()
        return self

    # Methods that read the gradients after masking them in before_step (M-FAC records them) need them masked
    # in .grad itself, so they keep the pass even with an optimizer that masks inside its update.
    reads_masked_gradients: ClassVar[bool] = False

    def _hand_over_masks(self) -> None:
        """Give the attached optimizer the masks to apply inside its update, if it can (``use_masks``).

        Not for packed masks (the optimizer's kernel reads bool masks) or methods that read the masked gradients.
        Called at attach and whenever the enforced masks or the parameters change.
        """
        optimizer = self._optimizer if self._hooks else None
        takes = callable(getattr(optimizer, "use_masks", None))
        if not takes or isinstance(self.masks, PackedMasks) or self.reads_masked_gradients:
            if self._masks_handed_to is not None:
                self._masks_handed_to.use_masks({})
            self._masks_handed_to = None
            return
        optimizer.use_masks({self.params[n]: m for n, m in self._enforced_masks.items()})
        self._masks_handed_to = optimizer

    def _not_held_by(self, optimizer: torch.optim.Optimizer) -> list[str]:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        return [n for n, p in self.params.items() if id(p) not in owned]

    def _follow_model_parameters(self) -> None:
        """Point ``params`` at the model's current Parameter objects.

        ``load_state_dict(assign=True)`` and assignments put new objects into the model: the masks must apply to
        the weights the model computes with. Called when the model loads a state and when an optimizer attaches.
        """
        replaced: dict[str, nn.Parameter] = {}
        for name, param in self.params.items():
            try:
                current = self.model.get_parameter(name)
            except AttributeError:
                raise ValueError(f"the model no longer has the sparsified parameter {name!r}") from None
            if current is param:
                continue
            mask = self.masks[name]
            if local(current).shape != mask.shape:
                raise ValueError(
                    f"the sparsified parameter {name!r} was replaced by one of shape {tuple(local(current).shape)}; "
                    f"its mask has shape {tuple(mask.shape)} (a sparsifier keeps its parameters' shapes)"
                )
            if mask.device != local(current).device:
                self.masks[name] = mask.to(local(current).device)
            replaced[name] = current
        if not replaced:
            return
        self.params.update(replaced)
        self._refresh_enforced_masks()
        self._forget_zeros()
        # An attached optimizer that held the old objects would train tensors the model no longer uses.
        self._replaced_under_attached = bool(self._hooks) and bool(self._not_held_by(self._optimizer))

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> tuple | None:
        if self._replaced_under_attached and self._not_held_by(optimizer):
            raise RuntimeError(
                "the model's sparsified parameters were replaced (load_state_dict(assign=True) or an assignment): "
                f"this optimizer still holds the old {', '.join(self._not_held_by(optimizer))}; create an optimizer "
                "over model.parameters() and attach it: sparsifier.detach(); sparsifier.attach(new_optimizer)"
            )
        # torch passes the bound call's arguments: args[0] is the optimizer itself, a closure comes after it.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.before_step(optimizer)
            return None

        # optimizer.step(closure) computes the gradients after this hook: mask them each time the closure runs
        # (CrAM runs it twice), or momentum would leak into masked weights.
        def masked_closure() -> Any:
            loss = closure()
            self.before_step(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": masked_closure}
        return (args[0], masked_closure, *args[2:]), kwargs

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._hand_over_masks()  # takes them back: a detached optimizer masks nothing

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The attached hooks' work, called by hand right after ``optimizer.step()``: ``sparsifier.step(optimizer)``.

        Gradients were not masked before that step, so the optimizer state is cleaned at masked positions here;
        that needs the optimizer (the last one given is reused when it is left out).
        """
        if self._hooks:
            raise RuntimeError("this sparsifier is attached; its hooks already run at every optimizer.step()")
        if self.needs_attach:
            raise RuntimeError(
                f"method {self.name!r} works before the optimizer step (it reads that step's gradients): "
                "use sparsifier.attach(optimizer) instead of calling step()"
            )
        optimizer = optimizer or self._optimizer
        if optimizer is None:
            # Without it the momentum of masked weights would keep building, to be released when they re-enter.
            raise ValueError(
                "sparsifier.step() needs the optimizer that just stepped, to clear the momentum of masked weights: "
                "call sparsifier.step(optimizer), or attach the sparsifier once with sparsifier.attach(optimizer)"
            )
        self._optimizer = optimizer
        # The step ran on unmasked gradients: _after_step cleans the optimizer state with the masks the step ran
        # under, before a boundary may replace them.
        self._after_step(optimizer)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every event: phase_end (before masks change), phase_start, mask_update."""
        self._listeners.append(listener)

    @torch.no_grad()
    def sparsity(self) -> SparsityReport:
        """Sparsity measured on the weights (zeros counted in the tensors), overall and per layer."""
        names = list(self.params)
        # Sharded: every rank counts its rows, the counts are summed (a collective: every rank must call it).
        counts = self.sum_over_ranks([maskops.count_zeros(local(self.params[n])) for n in names])
        layers = {n: z / self.params[n].numel() for n, z in zip(names, counts)}
        zeros, total = sum(counts), sum(p.numel() for p in self.params.values())
        return SparsityReport(overall=zeros / total, layers=layers, zeros=zeros, total=total)

    def sum_over_ranks(self, values: Sequence[int]) -> list[int]:
        """Integers summed over the ranks the parameters are sharded on (``values`` itself when not sharded)."""
        return all_reduce_sum(values, self.process_group) if self.sharded else list(values)

    def select_top(self, scores: dict[str, Tensor], keeps: dict[str, int]) -> dict[str, Tensor]:
        """Per layer, a mask keeping exactly ``keeps[name]`` of its largest ``scores`` (over all shards if sharded).

        ``keeps`` counts the whole layer; ``scores`` are this rank's rows. Unsharded, ties go by ``torch.topk``'s
        index; sharded, by :func:`~sparsetrain.core.sharding.sharded_topk_masks` (the same on every rank).
        """
        if not self.sharded:
            return {n: maskops.topk_count_mask(s, keeps[n]) for n, s in scores.items()}
        names = list(scores)
        return sharded_topk_masks(scores, [[n] for n in names], [keeps[n] for n in names], self.process_group)

    def memory_bytes(self) -> MemoryReport:
        """Bytes this sparsifier holds: masks, method state and workspace (each storage counted once).

        Everything the sparsifier object keeps between steps is counted, whatever the method: the model's own
        weights and the optimizer's state are not (they exist without sparsification). With SGD, a magnitude,
        GMP or RigL run holds 1 byte per sparsified weight (the boolean masks); AC/DC 1.125 (its previous
        compressed phase's masks packed to a bit each); with ``mask_storage='packed'`` 0.125 and 0.25. Adam-like
        optimizers add the second moments AC/DC and GaP keep for the weights they prune (4 bytes per pruned
        float32 weight and buffer).
        """
        # The weights themselves are never counted, even where a method keeps a reference to them. Sharded: this
        # rank's bytes over this rank's weights.
        seen = {local(p).untyped_storage().data_ptr() for p in self.params.values()}

        def size(tensors: list[Tensor]) -> int:
            total = 0
            for tensor in tensors:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return total

        stored = self.masks.storages() if isinstance(self.masks, PackedMasks) else list(self.masks.values())
        masks = size(stored)
        workspace = size(list(self._workspace.values()))
        ignored = {"model", "params", "_masks", "_workspace", "_optimizer", "_hooks", "_listeners", "history"}
        state = size([t for key, value in vars(self).items() if key not in ignored for t in _tensors_in(value)])
        return MemoryReport(masks=masks, method_state=state, workspace=workspace,
                            parameters=sum(local(p).numel() for p in self.params.values()))  # fmt: skip

    def sparsity_of_masks(self) -> float:
        zeros, total = self.sum_over_ranks(
            [sum(maskops.count_zeros(m) for m in self.masks.values()), sum(m.numel() for m in self.masks.values())]
        )
        return zeros / total

    def state_dict(self) -> dict:
        """Everything a resume needs: time, masks, history, kept second moments and the method's own state.

        Sharded (FSDP2), the masks and per-weight buffers are this rank's rows, and ``rows`` says which rows of
        each parameter they are (first, end, total): :meth:`load_state_dicts` assembles any other split from them.
        """
        state = {
            "method": self.name,
            "count": self.count,
            "masks": {n: m.clone() for n, m in self.masks.items()},
            "history": [dict(e) for e in self.history],
            "phase": self._phase,
            "mask_version": self.mask_version,
            "init_rescaled": self.init_rescaled,
            "second_moments": {n: {k: t.clone() for k, t in kept.items()} for n, kept in self._second_moments.items()},
            "extra": self.extra_state(),
        }
        if self.sharded:
            spans = {n: local_rows(p) for n, p in self.params.items()}
            state["rows"] = {n: [r.start, r.stop, int(self.params[n].shape[0])] for n, r in spans.items()}
        return state

    def _check_state(self, state: Any) -> None:
        """Refuse, with what was given, a state that is not this method's ``state_dict()`` for these parameters."""
        if not isinstance(state, dict):
            raise ValueError(
                f"sparsifier state must be the dict from Sparsifier.state_dict(), got {type(state).__name__}"
            )
        if state.get("method") != self.name:
            raise ValueError(f"sparsifier state is for method {state.get('method')!r}, not {self.name!r}")
        missing = [key for key in ("masks", "count") if key not in state]
        if missing or not isinstance(state["masks"], dict):
            raise ValueError(
                f"sparsifier state for {self.name!r} has no {' or '.join(map(repr, missing)) or 'dict of masks'}: "
                f"expected the dict from Sparsifier.state_dict(), got keys {sorted(map(str, state))}"
            )
        masks = state["masks"]
        if set(masks) != set(self.masks):
            raise ValueError(
                "sparsifier state does not match this model's sparsified parameters: "
                f"saved {sorted(masks)}, model {sorted(self.masks)}"
            )
        for name, mask in masks.items():
            if not isinstance(mask, Tensor):
                raise ValueError(f"mask {name!r} in the sparsifier state is a {type(mask).__name__}, not a tensor")

    def _holds_own_rows(self, state: dict) -> bool:
        """Whether ``state`` holds exactly the rows this sparsifier keeps (saved by this split of the rows). A
        state without ``rows`` (unsharded, or saved before states said their rows) is judged by its shapes."""
        rows = state.get("rows")
        for name, param in self.params.items():
            if state["masks"][name].shape != local(param).shape:
                return False
            if rows is not None:
                span = local_rows(param)
                if not isinstance(rows, dict) or list(rows.get(name, ())) != [span.start, span.stop, param.shape[0]]:
                    return False
        return True

    def load_state_dict(self, state: dict) -> None:
        """Load a :meth:`state_dict`. Sharded, a state saved by another split of the rows (another number of ranks,
        or an unsharded run) is cut to this rank's rows where it holds them (see :meth:`load_state_dicts`)."""
        self._check_state(state)
        if not self._holds_own_rows(state) and (self.sharded or state.get("rows") is not None):
            state = self._resharded([state])
        self._load_checked(state)

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        """Load the states every rank of a sharded (FSDP2) run saved, whatever the number of ranks now.

        ``states``: each saving rank's :meth:`state_dict` (any order; an unsharded run's one state also fits).
        A rank whose rows one state holds loads it as it is; otherwise each rank assembles the masks, kept second
        moments and the method's per-row state of its own rows from the pieces that hold them (only those rows
        are copied), on one process as on many. Refused in one line: pieces saved at different steps, pieces that
        leave some of this rank's rows uncovered (``ValueError``), and method state that cannot be split by rows
        (:class:`~sparsetrain.core.sharding.UnsplittableState`, a ``ValueError``; see :meth:`reshard_extra_state`).
        """
        if not isinstance(states, (list, tuple)) or not states:
            raise ValueError(
                "load_state_dicts takes the list of every rank's Sparsifier.state_dict(), got "
                f"{type(states).__name__ if states else 'nothing'}"
            )
        for state in states:
            self._check_state(state)
        own = [state for state in states if self._holds_own_rows(state)]
        self._load_checked(own[0] if own else self._resharded(states))

    def _saved_rows(self, state: dict) -> dict[str, tuple[int, int]]:
        """The rows of every parameter that ``state`` holds, checked against the parameters' full shapes."""
        saved = state.get("rows")
        spans = {}
        for name, mask in state["masks"].items():
            full = tuple(self.params[name].shape)
            entry = None if saved is None else (saved.get(name) if isinstance(saved, dict) else None)
            if saved is None and mask.dim() >= 1:  # an unsharded run's state: every row
                start, stop, total = 0, mask.shape[0], mask.shape[0]
            elif (isinstance(entry, (list, tuple)) and len(entry) == 3 and all(type(v) is int for v in entry)
                  and mask.dim() >= 1):  # fmt: skip
                start, stop, total = entry
            else:
                raise ValueError(f"sparsifier state: the rows of mask {name!r} are {entry!r}, not [first, end, total]")
            if (total, *mask.shape[1:]) != full or mask.shape[0] != stop - start or not 0 <= start <= stop <= total:
                raise ValueError(
                    f"mask {name!r} of rows {start}-{stop} has shape {tuple(mask.shape)}, parameter has {full}"
                )
            spans[name] = (start, stop)
        return spans

    def local_rows_of(self, name: str, pieces: Sequence[tuple[int, Tensor]]) -> Tensor:
        """This rank's rows of parameter ``name``'s per-row state, from pieces ``(first row, tensor)`` that saved
        ranks held (:func:`~sparsetrain.core.sharding.assemble_rows`); the whole tensor when not sharded."""
        param = self.params[name]
        return assemble_rows(pieces, local_rows(param), int(param.shape[0]), repr(name))

    def _resharded(self, states: Sequence[dict]) -> dict:
        """One state holding this rank's rows, assembled from the pieces ``states`` hold."""
        counts = sorted({int(state["count"]) for state in states})
        if len(counts) > 1:
            raise ValueError(
                f"the sparsifier states to load were saved at different steps ({', '.join(map(str, counts))}); "
                "load the states every rank saved at one step"
            )
        rows = [self._saved_rows(state) for state in states]
        masks = {n: self.local_rows_of(n, [(r[n][0], s["masks"][n].to(torch.bool)) for s, r in zip(states, rows)])
                 for n in self.params}  # fmt: skip
        kept: dict[str, dict[str, Tensor]] = {}
        for name in self.params:
            saved = [s.get("second_moments", {}).get(name, {}) for s in states]
            for key in sorted({k for held in saved for k in held}):
                present = [held[key] for held in saved if key in held]
                dtype = present[0].dtype
                pieces = []
                for held, r, state in zip(saved, rows, states):
                    shape = state["masks"][name].shape
                    # A rank that holds no record of this buffer pruned none of its rows' weights: zeros fit.
                    value = held.get(key, torch.zeros(shape, dtype=dtype))
                    if value.shape != shape:
                        raise ValueError(
                            f"sparsifier state: kept {key} of {name!r} has shape {tuple(value.shape)}, its mask "
                            f"{tuple(shape)}"
                        )
                    pieces.append((r[name][0], value))
                kept.setdefault(name, {})[key] = self.local_rows_of(name, pieces)
        extra = self.reshard_extra_state([s.get("extra", {}) for s in states], rows)
        return {**states[0], "masks": masks, "second_moments": kept, "extra": extra}

    def reshard_extra_state(self, extras: Sequence[dict], rows: Sequence[Mapping[str, tuple[int, int]]]) -> dict:
        """This rank's :meth:`extra_state` from the pieces saved by another split of the rows.

        ``extras[i]`` is the extra state piece ``i`` saved, ``rows[i][name]`` the rows ``(first, end)`` of each
        parameter it held. The default keeps state without tensors that every piece holds alike (counters,
        scales agreed over all ranks) and refuses the rest; a method keeping per-row tensors overrides this and
        assembles them with :meth:`local_rows_of` (AC/DC's previous masks).
        """
        if not all(isinstance(extra, dict) for extra in extras):
            raise ValueError(f"sparsifier state: the method state of {self.name!r} is not a dict in every piece")
        first = extras[0]
        per_rank = sorted({str(k) for e in extras for k, v in e.items() if _tensors_in(v)})
        if not per_rank and all(e == first for e in extras):
            return dict(first)
        differing = per_rank or sorted({str(k) for e in extras for k in e if e.get(k) != first.get(k)})
        raise UnsplittableState(
            f"method {self.name!r} keeps per-rank state ({', '.join(differing)}) that cannot be split over another "
            f"number of ranks: load it on as many ranks as saved it ({len(extras)})"
        )

    def _load_checked(self, state: dict) -> None:
        """Load a state whose masks :meth:`_check_state` accepted and whose shapes are this sparsifier's."""
        masks = state["masks"]
        for name, mask in masks.items():
            if mask.shape != local(self.params[name]).shape:
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(self.masks[name].shape)}"
                )
        self.masks = {
            n: m.to(device=local(self.params[n]).device, dtype=torch.bool).clone(memory_format=torch.contiguous_format)
            for n, m in masks.items()
        }
        self.count = int(state["count"])
        self.history = [dict(e) for e in state.get("history", [])]
        self._phase = state.get("phase")
        self.mask_version = int(state.get("mask_version", 0))
        self.init_rescaled = bool(state.get("init_rescaled", False))
        self._second_moments = {
            n: {k: t.to(local(self.params[n]).device).clone() for k, t in kept.items()}
            for n, kept in state.get("second_moments", {}).items()
            if n in self.params
        }
        self.load_extra_state(state.get("extra", {}))
        self._refresh_enforced_masks()
        self._forget_zeros()

    # ----------------------------------------------------------------- helpers for methods
    def steps(self, value: float | None, what: str, default_fraction: float | None = None) -> int:
        """Convert a method option in ``self.unit`` to steps; a left-out option is ``default_fraction`` of the run."""
        if value is None and default_fraction is not None:
            return to_steps(
                default_fraction,
                "fraction",
                total_steps=self.require_total_steps(),
                steps_per_epoch=self.steps_per_epoch,
                what=what,
            )
        return to_steps(value, self.unit, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, what=what)

    def require_total_steps(self) -> int:
        if self.total_steps is None:
            raise ValueError(
                f"method {self.name!r} follows a schedule: pass total_steps=, or total_epochs= with steps_per_epoch="
            )
        return self.total_steps

    def generator(self, step: int) -> torch.Generator:
        """A local generator seeded by (seed, step): the same draws after a resume and on every rank."""
        return torch.Generator().manual_seed(derived_seed(self.seed, step))

    def magnitude_scores(self) -> dict[str, Tensor]:
        return self.scores("magnitude")

    def scores(self, kind: str, step: int | None = None) -> dict[str, Tensor]:
        """Per-weight scores of the sparsified parameters, higher kept first; ``kind`` is one of ``SCORES``.

        'magnitude': |w| (Han et al. 2015). 'random': uniform draws from the generator of (seed, ``step``; the
        current step when left out), in parameter order: a random mask, the same on every rank and after a resume.
        'gradient': |dL/dw| of the gradient now in ``.grad`` (RigL's growth criterion; 0 where there is none).
        """
        if kind == "magnitude":
            return {n: local(p.detach()).abs() for n, p in self.params.items()}
        if kind == "random":
            # Sharded: the full layer's draws, cut to this rank's rows, so the masks equal an unsharded run's.
            generator = self.generator(self.count if step is None else step)
            return {n: torch.rand(p.shape, generator=generator)[local_rows(p)] for n, p in self.params.items()}
        if kind == "gradient":
            return {
                n: torch.zeros_like(local(p.detach())) if p.grad is None else local(p.grad.detach()).abs()
                for n, p in self.params.items()
            }
        raise ValueError(f"unknown score {kind!r}; scores are: {', '.join(self.SCORES)}")

    def compute_masks(
        self, sparsity: float, scores: dict[str, Tensor], *, among_active: bool = False
    ) -> dict[str, Tensor]:
        """Exact masks at ``sparsity`` from ``scores`` under this sparsifier's distribution and mask type.

        ``among_active``: pruned weights stay pruned (their score drops below every active one).
        """
        if self.channel_groups is not None:
            return self._channel_masks(sparsity, scores, among_active)
        if among_active:
            scores = {
                n: torch.where(self.masks[n], s.float(), torch.full_like(s, -1.0, dtype=torch.float))
                for n, s in scores.items()
            }
        if self.nm is not None:
            # Rows are whole on every rank (groups along dim 0 are refused when sharded).
            return {n: maskops.nm_mask(s, *self.nm, self.nm_dims[n]) for n, s in scores.items()}
        shapes = {n: tuple(self.params[n].shape) for n in scores}  # the full shapes, also when sharded
        per_layer = layer_sparsities(self.distribution, shapes, sparsity)
        if self.sharded:
            names = list(scores)
            if per_layer is None:
                total = sum(self.params[n].numel() for n in names)
                return sharded_topk_masks(scores, [names], [maskops.keep_count(total, sparsity)], self.process_group)
            keeps = {n: maskops.keep_count(self.params[n].numel(), per_layer[n]) for n in names}
            return self.select_top(scores, keeps)
        if per_layer is None:
            return maskops.global_topk_masks(scores, sparsity)
        return {n: maskops.topk_mask(s, per_layer[n]) for n, s in scores.items()}

    @torch.no_grad()
    def group_scores(self, scores: dict[str, Tensor]) -> list[Tensor]:
        """Per channel set, the score of each group: the root-mean-square of ``scores`` over its parameters.

        Why normalised by the group's size: groups of different layers differ in size by orders of magnitude (a
        stem filter against a unit of a wide Linear), and a plain norm would rank a large group above a small one
        for its size alone. The root-mean-square compares them as per-weight magnitude compares single weights.
        """
        out = []
        for channel_set in self.channel_groups.sets:
            rows = channel_set.channel_matrix(scores, (PRODUCER, NORM, CONSUMER))
            squares = sum(row.float().square().sum(dim=1) for row in rows)
            size = sum(row.shape[1] for row in rows)
            out.append((squares / size).sqrt())
        return out

    def _channel_masks(self, sparsity: float, scores: dict[str, Tensor], among_active: bool) -> dict[str, Tensor]:
        """Whole groups pruned: the fraction ``sparsity`` of them with the lowest :meth:`group_scores`.

        'global': one ranking over all groups, each channel set keeping its best group (a set with none left
        would cut the network in two). 'uniform': ``round((1 - sparsity) * width)`` kept per set, at least one,
        rounded to ``channel_multiple`` (:func:`sparsetrain.maskops.channel_keep_count`).
        Chosen by index from ``torch.topk`` (exact counts, ties or no ties). ``among_active``: groups already
        pruned rank below every active one.
        """
        per_set = self.group_scores(scores)
        if among_active:
            active = [self._active_groups(s) for s in self.channel_groups.sets]
            per_set = [torch.where(a, s, torch.full_like(s, -1.0)) for a, s in zip(active, per_set)]
        widths = [s.width for s in self.channel_groups.sets]
        keep = [torch.zeros(w, dtype=torch.bool) for w in widths]
        if self.distribution == "uniform":
            for kept, score in zip(keep, per_set):
                count = maskops.channel_keep_count(score.numel(), sparsity, self.channel_multiple)
                kept[torch.topk(score, count).indices] = True
        else:
            for kept, score in zip(keep, per_set):
                kept[int(torch.argmax(score))] = True  # the first maximum: deterministic
            flat = torch.cat(per_set)
            offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
            forced = torch.cat(keep)
            total = max(int(forced.sum()), maskops.keep_count(flat.numel(), sparsity))
            rest = torch.where(forced, torch.full_like(flat, -float("inf")), flat)
            chosen = torch.topk(rest, total - int(forced.sum())).indices
            forced[chosen] = True
            keep = [forced[offsets[i] : offsets[i + 1]] for i in range(len(widths))]
        masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        for channel_set, kept in zip(self.channel_groups.sets, keep):
            pruned = (~kept).nonzero().squeeze(1)
            if not pruned.numel():
                continue
            for member in channel_set.members:
                if member.buffer:
                    continue
                index = (pruned[:, None] * member.block + torch.arange(member.block)).reshape(-1)
                mask = masks[member.name]
                mask.index_fill_(member.dim, index.to(mask.device), False)
        return masks

    def _active_groups(self, channel_set: Any) -> Tensor:
        """Which groups of ``channel_set`` the current masks leave active (any of their producing slices kept)."""
        rows = channel_set.channel_matrix(self.masks, (PRODUCER,))
        active = torch.zeros(channel_set.width, dtype=torch.bool)
        for row in rows:
            active |= row.any(dim=1).cpu()
        return active

    def group_sparsity(self) -> float:
        """The fraction of zero-invariant groups the masks prune (channel masks only)."""
        if self.channel_groups is None:
            raise ValueError("group_sparsity() is for mask_type='channel'")
        active = sum(int(self._active_groups(s).sum()) for s in self.channel_groups.sets)
        return 1.0 - active / len(self.channel_groups)

    @torch.no_grad()
    def set_masks(self, masks: dict[str, Tensor], reason: str) -> None:
        """Install new masks: zero the pruned weights and their optimizer state, log a mask_update event.

        The optimizer state of pruned weights is zeroed except second moments (``optim_state.SECOND_MOMENT_KEYS``).
        Methods whose pruned weights re-enter (AC/DC, GaP: ``reentry_keeps_second_moments``) also record them at
        the pruning and put them back at re-entry, so a re-entering weight steps on the scale it had, not on a
        3x larger first step, however long it stayed pruned (Adam lets a zero-gradient entry decay by beta2 per step).
        """
        masks = {n: m.to(dtype=torch.bool, device=local(self.params[n]).device).contiguous() for n, m in masks.items()}
        if self.reentry_keeps_second_moments and self._optimizer is not None:
            self._keep_second_moments(self._optimizer, masks)
        self.masks.update(masks)
        self._refresh_enforced_masks()
        self._apply_masks()
        if self._optimizer is not None:
            self._zero_state_where_masked(self._optimizer)
        self.mask_version += 1
        self.emit({"event": "mask_update", "reason": reason, "sparsity": round(self.sparsity_of_masks(), 6)})

    @torch.no_grad()
    def rescale_kept_weights(self) -> None:
        """Multiply every kept weight by ``maskops.sparse_init_scale`` of its mask, once per run.

        Why: a dense init gives each weight variance ~ 1 / fan_in; masking a fraction 1 - d of the inputs leaves a
        unit's pre-activation a factor sqrt(d) smaller, layer after layer, so a deep net masked from step 0 can
        start with vanishing logits and gradients and never leave the chance-level loss (Evci et al., "Gradient
        Flow in Sparse Neural Networks and How Lottery Tickets Win", AAAI 2022). Scaling by
        sqrt(fan_in / active fan-in) per output unit restores the dense init's scale. Masked weights stay 0.

        Runs at the step-0 boundary of methods with ``rescale_init`` on. ``init_rescaled`` is part of the state,
        so a sparsifier that loads a checkpoint's state never scales the loaded weights again.
        """
        if self.init_rescaled:
            return
        for name, mask in self.masks.items():
            param = local(self.params[name])  # sharded: whole rows, so each unit's fan-in is on this rank
            param.mul_(maskops.sparse_init_scale(mask).to(device=param.device, dtype=param.dtype))
        self.init_rescaled = True
        self.emit({"event": "init_rescale"})

    def densify(self, reason: str, reset_optimizer_momentum: str | bool = False) -> None:
        """All masks become ones; pruned weights re-enter at their current value, 0, with their second moments.

        ``reset_optimizer_momentum``: 'all' zeroes the momentum (first-moment) buffers of every parameter the
        optimizer holds, 'sparsified' (or True) those of the sparsified parameters only, False none.
        """
        self.set_masks({n: torch.ones_like(m) for n, m in self.masks.items()}, reason)
        if reset_optimizer_momentum and self._optimizer is not None:
            every = reset_optimizer_momentum == "all"
            reset_momentum(self._optimizer, None if every else list(self.params.values()))

    def emit(self, event: Event) -> None:
        event = {"step": self.count, **event}
        self.history.append(event)
        for listener in self._listeners:
            listener(event)

    # ----------------------------------------------------------------- enforcement
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the gradients of masked weights to exactly 0 (NaN and inf too): no optimizer buffer leaks into them.

        An attached optimizer that masks gradients inside its update (:class:`sparsetrain.optim.MaskedSGD`,
        handed the masks by :meth:`_hand_over_masks`) makes this pass unnecessary: the step applies masked
        gradients all the same.
        """
        if self._masks_handed_to is optimizer:  # an optimizer is never None here
            self._grads_masked_at = self.mask_version
            return
        self.mask_gradients()

    def mask_gradients(self) -> None:
        """Set the gradients of masked weights to exactly 0 now, as the pre-step hook will: the gradient the step
        applies.

        Call it before anything that measures the gradient, such as norm clipping, so that it measures what the
        step applies (idempotent; the hook zeroes them again). Not on a step where :meth:`needs_dense_gradients`
        is true: that step reads the masked weights' gradients.
        """
        if not self._enforced_masks:
            return
        grads, masks = [], []
        for name, mask in self._enforced_masks.items():
            grad = self.params[name].grad
            if grad is not None:
                grads.append(local(grad))
                masks.append(mask)
        _zero_where_masked(grads, masks, self._workspace)
        self._grads_masked_at = self.mask_version

    def apply_masks(self) -> None:
        """Set masked weights to +0.0 now (after writing weights outside the optimizer and ``load_state_dict``)."""
        self._apply_masks()

    def _after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.count += 1
        # The step just taken ran under the current masks: enforce them before a boundary may change them (a
        # decompression must see pruned weights at exactly 0 so they re-enter at 0).
        self._enforce_after_step(optimizer)
        self._boundary()

    @torch.no_grad()
    def _enforce_after_step(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Re-zero the masked weights, unless the step provably left them at +0.0.

        The proof: before the step the masked weights were +0.0 and their first moments 0 (``_zeros_known``), the
        step's gradients were masked under the current masks, and the optimizer's update keeps such weights at
        +0.0 (``optimizer_keeps_zeros``). Then the step wrote +0.0 there again and the buffers stayed 0, so the
        pass over every weight is skipped. Anything else re-zeroes, and also zeroes the first moments when the
        gradients were not masked (``step()`` by hand, a step reading dense gradients) or after a load.
        """
        grads_masked = self._grads_masked_at == self.mask_version
        self._grads_masked_at = None
        if not self._enforced_masks:
            return
        if (
            self.enforce != "always"
            and self._zeros_known
            and grads_masked
            and optimizer is not None
            and optimizer_keeps_zeros(optimizer)
        ):
            self.enforcement["skipped"] += 1
            if self.enforce == "check":
                self._assert_masked_zero()
            return
        if optimizer is not None and not (grads_masked and self._zeros_known):
            self._zero_state_where_masked(optimizer)
        self._apply_masks()
        self.enforcement["rezeroed"] += 1
        self._zeros_known = optimizer is not None

    def _forget_zeros(self) -> None:
        self._zeros_known = False

    @torch.no_grad()
    def _assert_masked_zero(self) -> None:
        for name in self._enforced_masks:
            values = local(self.params[name].detach())[~self.masks[name]]
            bad = (values != 0) | torch.signbit(values)
            if bool(bad.any()):
                raise RuntimeError(
                    f"enforce='check': after step {self.count}, {int(bad.sum())} masked weights of {name!r} are not "
                    f"+0.0 (first: {float(values[bad][0])}); the optimizer moved them although "
                    "optimizer_keeps_zeros() held, or the weights were written outside the optimizer"
                )

    def _boundary(self) -> None:
        step = self.count
        phase = self.phase_at(step)
        changed = phase != self._phase
        if changed and self._phase is not None:
            self.emit({"event": "phase_end", "phase": self._phase})
        self.on_step(step)
        if step == 0 and self.rescale_init:
            self.rescale_kept_weights()  # the weights are the fresh init only now, under the first masks
        if changed:
            self._phase = phase
            self.emit({"event": "phase_start", "phase": phase})

    @torch.no_grad()
    def _apply_masks(self) -> None:
        if self._enforced_masks:
            names = list(self._enforced_masks)
            _zero_where_masked(
                [local(self.params[n].data) for n in names], [self._enforced_masks[n] for n in names], self._workspace
            )

    def _refresh_enforced_masks(self) -> None:
        # Only masks with zeros need work each step. The boolean masks themselves, no copies: _zero_where_masked
        # converts them block by block into its small workspace.
        masks = self.masks
        if isinstance(masks, PackedMasks):
            self._enforced_masks = {n: masks.packed(n) for n, m in masks.items() if not bool(m.all())}
        else:
            self._enforced_masks = {n: m for n, m in masks.items() if not bool(m.all())}
        self._hand_over_masks()

    @torch.no_grad()
    def _keep_second_moments(self, optimizer: torch.optim.Optimizer, masks: dict[str, Tensor]) -> None:
        """Record the second moments of weights ``masks`` prunes; restore those of weights it lets back in."""
        for name, new in masks.items():
            old = self.masks[name]
            pruned, reentering = old & ~new, new & ~old
            if not (pruned.any() or reentering.any()):
                continue
            kept = self._second_moments.setdefault(name, {})
            for key, buffer in per_element_buffers(optimizer, self.params[name]).items():
                buffer = local(buffer)
                if key not in SECOND_MOMENT_KEYS:
                    continue
                if key in kept and reentering.any():
                    buffer.copy_(torch.where(reentering, kept[key].to(buffer.device, buffer.dtype), buffer))
                if pruned.any():
                    record = kept.setdefault(key, torch.zeros_like(buffer))
                    record.copy_(torch.where(pruned, buffer, record))
            if bool(new.all()) or not kept:
                self._second_moments.pop(name, None)  # everything is back: nothing left to hold

    @torch.no_grad()
    def _zero_state_where_masked(self, optimizer: torch.optim.Optimizer) -> None:
        """Set the per-element optimizer buffers of masked weights to +0.0, second moments kept (as
        ``optim_state.zero_state_where``), by the bit multiply of the enforcement: one fused pass, masks unpacked
        block by block when packed."""
        buffers, masks = [], []
        for name, mask in self._enforced_masks.items():
            for key, buffer in per_element_buffers(optimizer, self.params[name]).items():
                if key not in SECOND_MOMENT_KEYS:
                    buffers.append(local(buffer))  # an FSDP2 buffer is a DTensor: the mask covers this rank's rows
                    masks.append(mask)
        _zero_where_masked(buffers, masks, self._workspace)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.final_sparsity}, distribution={self.distribution!r}, "
            f"mask_type={self.mask_type!r}, params={len(self.params)}, count={self.count})"
        )
