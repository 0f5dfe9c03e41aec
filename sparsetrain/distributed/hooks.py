"""Communication hooks for ``DistributedDataParallel.register_comm_hook``, each counting the bytes it sends.

- ``allreduce``: what DDP does by default (divide by the world size, all-reduce); the reference.
- ``fp16``: all-reduce in float16 (half the bytes).
- ``qsgd``: QSGD codes exchanged by all-gather: values quantized with per-rank scales cannot be summed by an
  all-reduce, so every rank receives every other rank's payload, decodes and averages. What a rank sends is its
  own payload; what it receives grows with the number of workers.
- ``natural``: natural compression (sign + exponent, 9 bits per value), all-gathered likewise.
- ``masked``: while masks are fixed, all-reduce only the live (unmasked) coordinates; a dense all-reduce on steps
  where the method needs dense gradients (RigL's update steps).

Every state has ``stats``: bytes this rank put on the wire and coordinates it covered, so ``bits_per_coordinate``
is measured, not assumed.

Each hook is registered by name (:func:`register_comm_hook`, :func:`list_comm_hooks`) with the state class it
runs with; the state class declares the hook's options and checks them.
"""

# No `from __future__ import annotations` here: DDP checks the hooks' annotations as real objects.

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .._registry import Registry
from .compression import (
    NaturalPayload,
    QSGDPayload,
    natural_decode,
    natural_encode,
    qsgd_decode,
    qsgd_encode,
)

QSGD_NORMS = ("l2", "max")


@dataclass
class WireStats:
    bytes_sent: int = 0
    coordinates: int = 0
    calls: int = 0

    def add(self, nbytes: int, coordinates: int) -> None:
        self.bytes_sent += int(nbytes)
        self.coordinates += int(coordinates)
        self.calls += 1

    @property
    def bits_per_coordinate(self) -> float:
        return 8 * self.bytes_sent / self.coordinates if self.coordinates else 0.0


@dataclass
class HookState:
    """What every hook carries: the process group, its byte counts, and the step (for seeded randomness)."""

    # The hook's options, each with the trainer's config key that sets it (``sparsetrain train --set KEY=...``).
    OPTIONS: ClassVar[dict[str, str]] = {}

    process_group: Any = None
    stats: WireStats = field(default_factory=WireStats)
    step: int = 0
    seed: int = 0

    def world(self) -> int:
        return dist.get_world_size(self.process_group)

    def rank(self) -> int:
        return dist.get_rank(self.process_group)


@dataclass
class QSGDState(HookState):
    OPTIONS: ClassVar[dict[str, str]] = {"levels": "qsgd_levels", "bucket_size": "qsgd_bucket", "norm": "qsgd_norm"}

    levels: int = 7
    bucket_size: int = 512
    norm: str = "l2"

    def __post_init__(self) -> None:
        if not 1 <= self.levels <= 127:
            raise ValueError(f"qsgd levels must be in [1, 127] (7 gives 4-bit codes, 127 8-bit), got {self.levels}")
        if self.bucket_size < 1:
            raise ValueError(f"qsgd bucket size must be a positive integer, got {self.bucket_size}")
        if self.norm not in QSGD_NORMS:
            raise ValueError(f"qsgd norm must be {' or '.join(map(repr, QSGD_NORMS))}, got {self.norm!r}")


@dataclass
class MaskedState(HookState):
    sparsifier: Any = None
    _index_cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CommHook:
    """A registered hook: the function DDP calls per gradient bucket (None: DDP's own all-reduce) and its state."""

    hook: Callable[..., Any] | None
    state: type[HookState] = HookState


HOOK_REGISTRY: Registry[CommHook] = Registry("comm hook")
HOOK_REGISTRY.register("none", help="DDP's built-in all-reduce (no hook)")(CommHook(None))


def register_comm_hook(name: str, *, state: type[HookState] = HookState, help: str | None = None) -> Callable:
    """Decorator: register a DDP communication hook ``hook(state, bucket) -> Future`` under ``name``.

    ``state`` is the dataclass it runs with (a :class:`HookState`); its ``OPTIONS`` name the options it takes.
    """

    def decorate(hook: Callable[..., Any]) -> Callable[..., Any]:
        HOOK_REGISTRY.register(name, help=help)(CommHook(hook, state))
        return hook

    return decorate


def list_comm_hooks(pattern: str = "*") -> list[str]:
    """Registered comm hook names matching the glob ``pattern``, in registration order."""
    return HOOK_REGISTRY.names(pattern)


def _done(tensor: Tensor) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future


def _generator(state: HookState, bucket_index: int, device: torch.device) -> torch.Generator:
    # Stochastic rounding differs per rank (independent noise averages out) and is a function of
    # (seed, rank, step, bucket): a resumed run draws the same bits.
    seed = ((state.seed * 1_000_003 + state.rank()) * 1_000_003 + state.step) * 1009 + bucket_index
    return torch.Generator(device=device).manual_seed(seed % (2**63))


@register_comm_hook("allreduce", help="divide by the world size and all-reduce: what DDP does, counted")
def allreduce_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    buffer.div_(state.world())
    state.stats.add(buffer.numel() * buffer.element_size(), buffer.numel())
    work = dist.all_reduce(buffer, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@register_comm_hook("fp16", help="all-reduce in float16 (half the bytes)")
def fp16_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    half = buffer.div(state.world()).to(torch.float16)
    state.stats.add(half.numel() * 2, half.numel())
    dist.all_reduce(half, group=state.process_group)
    buffer.copy_(half)
    return _done(buffer)


def _all_gather_bytes(tensor: Tensor, state: HookState) -> list[Tensor]:
    out = [torch.empty_like(tensor) for _ in range(state.world())]
    dist.all_gather(out, tensor.contiguous(), group=state.process_group)
    return out


@register_comm_hook("qsgd", state=QSGDState, help="QSGD codes (Alistarh et al. 2017), all-gathered")
def qsgd_hook(state: QSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    generator = _generator(state, bucket.index(), buffer.device)
    payload = qsgd_encode(buffer, levels=state.levels, bucket_size=state.bucket_size, norm=state.norm,
                          generator=generator)  # fmt: skip
    codes = _all_gather_bytes(payload.codes, state)
    norms = _all_gather_bytes(payload.norms, state)
    state.stats.add(payload.nbytes, buffer.numel())
    total = torch.zeros_like(buffer, dtype=torch.float32)
    for c, n in zip(codes, norms):
        total += qsgd_decode(QSGDPayload(c, n, buffer.numel()), levels=state.levels, bucket_size=state.bucket_size)
    buffer.copy_(total / state.world())
    return _done(buffer)


@register_comm_hook("natural", help="natural compression (Horvath et al. 2019): sign and exponent, 9 bits a value")
def natural_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buffer = bucket.buffer()
    payload = natural_encode(buffer, generator=_generator(state, bucket.index(), buffer.device))
    exponents = _all_gather_bytes(payload.exponents, state)
    signs = _all_gather_bytes(payload.signs, state)
    state.stats.add(payload.nbytes, buffer.numel())
    total = torch.zeros_like(buffer, dtype=torch.float32)
    for e, s in zip(exponents, signs):
        total += natural_decode(NaturalPayload(e, s, buffer.numel()))
    buffer.copy_(total / state.world())
    return _done(buffer)


@register_comm_hook("masked", state=MaskedState, help="all-reduce only the live coordinates while masks are fixed")
def masked_hook(state: MaskedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    sparsifier = state.sparsifier
    if sparsifier.needs_dense_gradients():
        return allreduce_hook(state, bucket)
    buffer = bucket.buffer()
    names = {id(p): n for n, p in sparsifier.params.items()}
    # DDP rebuilds its buckets after the first iteration: the key names the bucket's parameters, not its index.
    key = (tuple(id(p) for p in bucket.parameters()), sparsifier.masks_key())
    live = state._index_cache.get(key)
    if live is None:
        # Flat positions of the live coordinates in this bucket's buffer (its parameters laid end to end).
        pieces, offset = [], 0
        for param in bucket.parameters():
            name = names.get(id(param))
            if name is None:
                pieces.append(torch.arange(offset, offset + param.numel(), device=buffer.device))
            else:
                pieces.append(sparsifier.masks[name].reshape(-1).nonzero().squeeze(1) + offset)
            offset += param.numel()
        live = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=buffer.device)
        state._index_cache = {k: v for k, v in state._index_cache.items() if k[1] == sparsifier.masks_key()}
        state._index_cache[key] = live
    compact = buffer[live].div_(state.world())
    state.stats.add(compact.numel() * compact.element_size(), buffer.numel())
    dist.all_reduce(compact, group=state.process_group)
    buffer.zero_()  # masked coordinates' gradients are discarded by the sparsifier anyway
    buffer[live] = compact
    return _done(buffer)


def check_hook(name: str, sparsifier: Any = None, options: Mapping[str, Any] | None = None) -> None:
    """Validate a hook choice before any process starts: the name and its options.

    ``sparsifier`` (a sparsifier, a method's class or None) is accepted for compatibility: every hook fits every
    method, since the masked hook sends a step densely whenever the method reads dense gradients on it.
    """
    spec = HOOK_REGISTRY.entry(name).obj  # ValueError naming the choices for an unknown name
    options = dict(options or {})
    if options and not spec.state.OPTIONS:
        raise ValueError(f"comm hook {name!r} takes no options, got {sorted(options)}")
    unknown = sorted(set(options) - set(spec.state.OPTIONS))
    if unknown:
        raise ValueError(f"comm hook {name!r} has no option {', '.join(unknown)}; its options: "
                         f"{', '.join(spec.state.OPTIONS)}")  # fmt: skip
    spec.state(**options)  # the state checks its options (QSGD's levels, bucket size, norm)


def hook_options(name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of hook ``name`` read from a trainer config (``qsgd_levels`` -> ``levels``, ...)."""
    return {option: config[key] for option, key in HOOK_REGISTRY.get(name).state.OPTIONS.items()}


def register_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, name: str, *, sparsifier=None,
                  seed: int = 0, **options: Any) -> HookState | None:  # fmt: skip
    """Register the named hook on ``ddp_model``; returns its state (``state.stats`` holds the wire counts).

    'none' registers nothing (DDP's built-in all-reduce) and returns None.
    """
    check_hook(name, sparsifier, options)
    spec = HOOK_REGISTRY.get(name)
    if spec.hook is None:
        return None
    extra = {"sparsifier": sparsifier} if "sparsifier" in {f.name for f in fields(spec.state)} else {}
    state = spec.state(seed=seed, **extra, **options)
    ddp_model.register_comm_hook(state, spec.hook)
    return state


# The built-in names, in order (``list_comm_hooks()`` is the live view).
HOOKS: tuple[str, ...] = tuple(list_comm_hooks())
