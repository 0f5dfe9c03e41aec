"""Slim training: a channel-pruned model trains (and evaluates) as the narrower network its masks leave.

A method that masks whole channels (``mask_type="channel"`` for magnitude, GMP and AC/DC; ``oto``;
``variational``) leaves the model its full shape: removed channels compute zeros, so the training FLOPs fall but
the wall time does not. :class:`SlimTraining` runs the model's forward on a *slim structure* instead: a copy of
the module tree cut to the kept channels with :func:`~sparsetrain.structured.apply_keep` (shapes only, on the
meta device), called on the full parameters and buffers index-selected to the kept channels (what
:func:`torch.func.functional_call` does, without its per-call checks). Autograd through ``index_select`` writes
the gradients into the full parameters' ``.grad`` (zero at removed channels), so the optimizer, the sparsifier's
masks, ``state_dict``, checkpoints and resume are those of the full model: its parameters are always the full
ones, only the arithmetic is narrower.

Which channels go, decided from the masks alone (never from weight values: an unmasked channel that happens to
be zero still receives gradient and must stay): channel ``c`` of a channel set is removed iff the sparsifier's
masks remove every zero-invariant slice of it (the producing layers' rows and biases, the batch norms' scales and
shifts). The masked model computes exactly zero there, so the slim forward computes the same outputs (up to
float rounding of sums over fewer terms) and the same gradients at every kept position; at removed positions the
gradients are zero, as the sparsifier masks them anyway. A set whose channels are all removed keeps its first
(zero) channel, as :func:`~sparsetrain.structured.slim` does. The plan is rebuilt lazily at the first forward
after ``sparsifier.masks_key()`` changes (or the masks object is replaced, as a checkpoint load does).

Batch norms: the slim forward updates gathered copies of the running statistics of cut batch norms; they are
written back into the full buffers after each training forward, and the statistics of removed channels decay as
the full model's do (their input is exactly zero there: ``running = (1 - momentum) * running``), so the
full buffers equal the masked model's at every channel. ``num_batches_tracked`` is shared as is.

Forward hooks: a hook on a cut module sees narrower tensors. Hooks marked with the attribute
:data:`WIDTH_AWARE` (``hook.slim_width_aware = True``) handle that (``variational``'s gates do: a gate vector
wider than its module's output is indexed by the kept channels, which SlimTraining hands to any sparsifier with a
``slim_kept`` dict attribute: channel set name -> kept indices, for the cut sets). A channel set touched by a
module carrying any other hook (forward, forward pre- or backward hook) is not cut; a hook on a module that owns
no channel set's tensor (an activation, a pooling, a container) or a global module hook stops all cutting (which
channels it sees is not known): the plain forward runs, as it does whenever nothing is removed. Dropout on a cut
tensor draws its masks for the narrower shape: the same distribution, not the same numbers as the full model.

Not supported (refused with a ``ConfigError``): a model wrapped in DistributedDataParallel/DataParallel or
sharded with FSDP, a sharded sparsifier. A model the group analysis cannot follow is left alone (its plain
forward; logged once).

References: Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467 (the zero-invariant groups and the
slim network they leave); Guenter & Sideris, "Robust Learning of Parsimonious Deep Neural Networks",
arXiv 2205.04650 (later training iterations run on the smaller network).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, first_line
from .groups import STATS, ZERO_INVARIANT_ROLES, Groups, UnsupportedModel, groups
from .slim import apply_keep

__all__ = ["WIDTH_AWARE", "SlimTraining"]

log = logging.getLogger(__name__)

# The attribute that marks a forward hook as able to handle a module output narrowed by SlimTraining.
WIDTH_AWARE = "slim_width_aware"

# The hook dictionaries of nn.Module: the slim structure's modules share the original modules' dictionaries, so
# hooks registered or removed later on the original apply to the slim forward too.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_CALL_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _unknown_hooks(module: nn.Module) -> bool:
    """Whether ``module`` carries a hook SlimTraining does not know to handle narrower tensors."""
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    return any(not getattr(hook, WIDTH_AWARE, False) for hook in module._forward_hooks.values())


@dataclass
class _Norm:
    """A cut batch norm's running statistics: the full buffers, where the kept and removed channels sit."""

    module: nn.Module
    buffers: list[tuple[str, Tensor]]  # (qualified name, full buffer)
    kept: Tensor
    removed: Tensor


@dataclass
class _Plan:
    """The slim structure for one set of masks: what to gather per tensor, and the batch norms to write back."""

    structure: nn.Module
    pairs: list[tuple[nn.Module, nn.Module]]  # (original, slim) submodules: training flags are synced per call
    full: dict[str, Tensor]  # every parameter and buffer of the model, by name
    cuts: dict[str, list[tuple[int, Tensor]]]  # name -> [(dim, kept index)], in apply_keep's order
    norms: list[_Norm]
    # (the structure's module's _parameters or _buffers, attribute, qualified name) per tensor, and the meta
    # tensors the structure holds between calls.
    slots: list[tuple[dict, str, str]] = field(default_factory=list)
    placeholders: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in self.full:
            module_name, _, attr = name.rpartition(".")
            module = self.structure.get_submodule(module_name)
            slots = module._parameters if attr in module._parameters else module._buffers
            self.slots.append((slots, attr, name))
            self.placeholders[name] = slots[attr]

    def tensors(self) -> dict[str, Tensor]:
        out = dict(self.full)
        for name, cuts in self.cuts.items():
            tensor = out[name]
            for dim, index in cuts:
                tensor = tensor.index_select(dim, index)
            out[name] = tensor
        return out

    @torch.no_grad()
    def write_back(self, tensors: dict[str, Tensor]) -> None:
        """Running statistics updated by a training forward: kept channels from the slim copies; removed
        channels decay as the full model's do on their exactly-zero input."""
        for norm in self.norms:
            module = norm.module
            if not module.training or not module.track_running_stats:
                continue
            if module.momentum is None:  # cumulative average: the factor torch uses, after its increment
                factor = 1.0 / float(module.num_batches_tracked)
            else:
                factor = float(module.momentum)
            for name, full in norm.buffers:
                if norm.removed.numel():
                    full.mul_(1.0 - factor)  # what the removed channels' zero input does; kept ones overwritten
                full.index_copy_(0, norm.kept, tensors[name])


class _SlimForward:
    """The ``forward`` SlimTraining installs on the model (an instance attribute; the class's stays)."""

    def __init__(self, owner: SlimTraining) -> None:
        # A strong reference: the patched model keeps its SlimTraining alive (a user may drop the object it
        # returned, ``SlimTraining(sparsifier, x)`` alone), until remove() gives the model its own forward back.
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner._forward(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        # A copy of the model (an evaluated twin, a saved copy) gets its class's plain forward.
        copied = memo.get(id(self.owner.model))
        return _PlainForward(copied) if copied is not None else None

    def __reduce__(self) -> Any:
        raise TypeError("a model under SlimTraining cannot be pickled whole; save its state_dict()")


class _PlainForward:
    """A copy's forward: its class's. It holds the copy itself (not a weak reference), so that copying the copy
    maps it, through deepcopy's memo, to the new copy: the second copy computes with its own weights."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.module).forward(self.module, *args, **kwargs)


def _check_not_distributed(model: nn.Module, sparsifier: Any) -> None:
    wrapped = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(model, wrapped):
        raise ConfigError(
            f"slim training does not support a model wrapped in {type(model).__name__}: it runs single-process "
            "only; use slim_training=off"
        )
    if getattr(sparsifier, "sharded", False):
        raise ConfigError("slim training does not support sharded sparsifiers (FSDP); use slim_training=off")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch builds without distributed
        return
    legacy: tuple[type, ...] = ()
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        legacy = (FullyShardedDataParallel,)
    except ImportError:  # pragma: no cover
        pass
    for name, module in model.named_modules():
        if isinstance(module, (FSDPModule, *legacy)):
            raise ConfigError(
                f"slim training does not support FSDP-sharded models (module {name or 'the model'!r} is "
                "sharded); use slim_training=off"
            )


class SlimTraining:
    """Train and evaluate a channel-masked model as the narrower network its masks leave (see the module doc).

    Use after creating (and attaching) the sparsifier::

        slim = SlimTraining(sparsifier, example_input)
        ...train as usual: the same model, parameters, optimizer and checkpoints...
        print(slim.summary())   # rebuilds, the channel widths in force
        slim.remove()           # back to the model's own forward

    Args:
        sparsifier: the run's sparsifier; its masks decide which channels are removed. Methods with channel
            masks carry their zero-invariant groups (``sparsifier.channel_groups``), which are reused.
        sample: an input batch for the group analysis when the sparsifier has no groups (only its shape matters).

    Raises:
        ConfigError: a DDP/DataParallel-wrapped or FSDP-sharded model, a sharded sparsifier, or a model whose
            ``forward`` is already replaced.
        ValueError: no groups and no ``sample``.

    Reference: Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467.
    """

    def __init__(self, sparsifier: Any, sample: Tensor | None = None) -> None:
        model = sparsifier.model
        _check_not_distributed(model, sparsifier)
        if isinstance(model.__dict__.get("forward"), _SlimForward):
            raise ConfigError("the model already trains under a SlimTraining; remove() it first")
        self.sparsifier = sparsifier
        self.model = model
        self.unsupported: str | None = None  # why the model is left alone (group analysis failed)
        self.rebuilds = 0  # slim structures built (a mask change to kept channels seen before reuses one)
        self.mask_changes = 0  # mask (or hook) changes that made the channels be decided again
        self.forwards = {"slim": 0, "plain": 0}
        self.eval_forwards = {"slim": 0, "plain": 0}
        self._plans: dict[Hashable, _Plan | None] = {}  # by kept channels: alternating masks reuse structures
        self._plan: _Plan | None = None
        self._key: Any = None
        self._masks_object: Any = None
        self._noted: set[str] = set()
        self.zigs: Groups | None = getattr(sparsifier, "channel_groups", None)
        self.widths: dict[str, tuple[int, int]] = {}  # channel set -> (kept, width) at the last forward
        self.skipped: dict[str, str] = {}  # channel set -> why the last forward did not cut it
        if self.zigs is None:
            if sample is None:
                raise ValueError("SlimTraining needs sample= (an input batch) for a sparsifier without channel groups")
            try:
                self.zigs = groups(model, sample)
            except UnsupportedModel as error:
                self.unsupported = first_line(error)
                log.info("slim training: the model is left alone: %s", self.unsupported)
                return
        if torch.nn.utils.parametrize.is_parametrized(model) or any(
            torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules()
        ):
            self.unsupported = "parametrized modules"
            log.info("slim training: the model is left alone: %s", self.unsupported)
            return
        if "forward" in model.__dict__ and not isinstance(model.__dict__["forward"], _PlainForward):
            raise ConfigError("slim training: the model's forward is already replaced (by another wrapper)")
        self.widths = {s.name: (s.width, s.width) for s in self.zigs.sets}
        self._modules = [(n, m) for n, m in model.named_modules() if n]
        self._owners: dict[str, set[str]] = {}  # module name -> the channel sets whose tensors it owns
        for channel_set in self.zigs.sets:
            for member in channel_set.members:
                self._owners.setdefault(member.module, set()).add(channel_set.name)
        model.forward = _SlimForward(self)  # instance attribute: the class's forward stays

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        """Whether the model's forward is SlimTraining's (the model's groups are supported)."""
        return isinstance(self.model.__dict__.get("forward"), _SlimForward)

    def remove(self) -> None:
        """Give the model its own forward back and drop the slim structures."""
        if isinstance(self.model.__dict__.get("forward"), _SlimForward):
            del self.model.forward
        self._plans, self._plan, self._key = {}, None, None
        self._share_kept({})

    # ------------------------------------------------------------------ per forward
    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = self._current()
        counts = self.forwards if torch.is_grad_enabled() else self.eval_forwards
        model = self.model
        if plan is None:
            counts["plain"] += 1
            return type(model).forward(model, *args, **kwargs)
        counts["slim"] += 1
        for original, slim in plan.pairs:
            slim.training = original.training
        tensors = plan.tensors()
        # What torch.func.functional_call(plan.structure, tensors, args, kwargs) does, without its per-call
        # checks (they cost ~1 ms per forward on ResNet-20, more than the gathers): the structure's parameters and
        # buffers are the gathered tensors for the call, and its meta placeholders again after it.
        for slots, attr, name in plan.slots:
            slots[attr] = tensors[name]
        try:
            out = plan.structure(*args, **kwargs)
        finally:
            for slots, attr, name in plan.slots:
                slots[attr] = plan.placeholders[name]
        if plan.norms:
            plan.write_back(tensors)
        return out

    def _hooks_signature(self) -> tuple:
        hooked = []
        for name, module in self._modules:
            if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                    or module._backward_pre_hooks):  # fmt: skip
                hooked.append((name, *(tuple(getattr(module, d)) for d in _CALL_HOOKS)))
        module_hooks = torch.nn.modules.module
        global_hooks = (
            tuple(module_hooks._global_forward_hooks),
            tuple(module_hooks._global_forward_pre_hooks),
            tuple(module_hooks._global_backward_hooks),
            tuple(module_hooks._global_backward_pre_hooks),
        )
        return tuple(hooked), global_hooks

    def _current(self) -> _Plan | None:
        masks = self.sparsifier.masks
        # The parameters' and buffers' identities and the parameters' device too: model.to() replaces buffers (and
        # moves parameters in place), load_state_dict(assign=True) or an assignment replaces parameters, and the
        # plan holds the tensors it gathers from and indices on their device.
        params = tuple(self.model.parameters())
        tensors = (tuple(map(id, params)), tuple(map(id, self.model.buffers())), params[0].device)
        key = (self.sparsifier.masks_key(), self._hooks_signature(), tensors)
        if key != self._key or masks is not self._masks_object:
            if self._key is not None and self._key[2] != tensors:
                self._plans = {}  # structures built on the tensors before model.to()
            self._key, self._masks_object = key, masks
            self.mask_changes += 1
            # Normal tensors even when this forward runs under torch.inference_mode(): the plan's indices and
            # placeholders serve the training forwards after it, and autograd refuses inference tensors.
            with torch.inference_mode(False):
                self._plan = self._build(key[1])
        return self._plan

    # ------------------------------------------------------------------ the plan
    def _removed(self, channel_set: Any) -> Tensor | None:
        """Channels whose zero-invariant parameter slices the masks remove entirely (None: some slice unmasked)."""
        masks = self.sparsifier.masks
        removed = torch.ones(channel_set.width, dtype=torch.bool)
        for member in channel_set.members:
            if member.role not in ZERO_INVARIANT_ROLES or member.buffer:
                continue
            if member.name not in masks:
                return None  # a producing tensor the sparsifier does not mask: its channels may be nonzero
            rows = masks[member.name].movedim(member.dim, 0).reshape(channel_set.width, -1)
            removed &= ~rows.any(dim=1).cpu()
        return removed

    def _build(self, hooks: tuple) -> _Plan | None:
        assert self.zigs is not None
        hooked, global_hooks = hooks
        modules = dict(self._modules)
        if any(global_hooks):
            self._note("global", "global module hooks are registered: every channel kept")
            return self._finish({}, None)
        blocked: dict[str, str] = {}
        for entry in hooked:
            name = entry[0]
            if not _unknown_hooks(modules[name]):
                continue
            sets = self._owners.get(name)
            if sets is None:
                self._note(name, f"module {name!r} carries hooks and owns no channel set: every channel kept")
                return self._finish({}, None)
            for set_name in sets:
                blocked.setdefault(set_name, f"module {name!r} carries hooks slim training does not know")
        keep: dict[str, list[int]] = {}
        widths: dict[str, tuple[int, int]] = {}
        for channel_set in self.zigs.sets:
            removed = self._removed(channel_set)
            kept = list(range(channel_set.width)) if removed is None else (~removed).nonzero().squeeze(1).tolist()
            kept = kept or [0]  # a set with every channel removed keeps a zero channel, as slim() does
            if len(kept) < channel_set.width and channel_set.name in blocked:
                self._note(channel_set.name, f"channel set {channel_set.name!r} not cut: {blocked[channel_set.name]}")
                kept = list(range(channel_set.width))
            widths[channel_set.name] = (len(kept), channel_set.width)
            if len(kept) < channel_set.width:
                keep[channel_set.name] = kept
        return self._finish(keep, widths, {k: v for k, v in blocked.items()})

    def _finish(
        self, keep: dict[str, list[int]], widths: dict[str, tuple[int, int]] | None, skipped: dict | None = None
    ) -> _Plan | None:
        assert self.zigs is not None
        if widths is None:
            widths = {s.name: (s.width, s.width) for s in self.zigs.sets}
        self.widths = widths
        self.skipped = dict(skipped or {})
        if not keep:
            self._share_kept({})
            return None  # nothing removed: the plain forward, no overhead
        signature = tuple(sorted((k, tuple(v)) for k, v in keep.items()))
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = self._structure(keep)
            self.rebuilds += 1
            if len(self._plans) > 8:  # alternating phases reuse a few; older ones go
                self._plans.pop(next(iter(self._plans)))
        self._share_kept(keep)
        return plan

    def _share_kept(self, keep: dict[str, list[int]]) -> None:
        """Hand the kept indices of the cut sets to a sparsifier that asks for them (``slim_kept``: variational)."""
        shared = getattr(self.sparsifier, "slim_kept", None)
        if isinstance(shared, dict):
            shared.clear()
            device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
            shared.update({k: torch.tensor(v, dtype=torch.long, device=device) for k, v in keep.items()})

    def _structure(self, keep: dict[str, list[int]]) -> _Plan:
        """A copy of the module tree cut to ``keep`` on the meta device, and per tensor the gathers that feed it."""
        assert self.zigs is not None
        model = self.model
        memo: dict[int, Any] = {}
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
        for name, module in model.named_modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if isinstance(hooks, dict):
                    # Shared with the original (its later registrations apply); the root's own hooks run around
                    # the patched forward already, so the structure's root has none.
                    memo[id(hooks)] = OrderedDict() if not name else hooks
        memo[id(model.__dict__["forward"])] = None
        structure = copy.deepcopy(model, memo)
        structure.__dict__.pop("forward", None)
        apply_keep(structure, self.zigs, keep)
        full = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        cuts: dict[str, list[tuple[int, Tensor]]] = {}
        for channel_set in self.zigs.sets:
            kept = keep.get(channel_set.name)
            if kept is None:
                continue
            index = torch.tensor(kept, dtype=torch.long)
            for member in channel_set.members:
                expanded = (index[:, None] * member.block + torch.arange(member.block)).reshape(-1)
                cuts.setdefault(member.name, []).append((member.dim, expanded.to(full[member.name].device)))
        norms: list[_Norm] = []
        for channel_set in self.zigs.sets:
            kept = keep.get(channel_set.name)
            if kept is None:
                continue
            stats: dict[str, list[tuple[str, Tensor]]] = {}
            for member in channel_set.members:
                if member.role == STATS:
                    stats.setdefault(member.module, []).append((member.name, full[member.name]))
            for module_name, buffers in stats.items():
                device = buffers[0][1].device
                kept_index = torch.tensor(kept, dtype=torch.long, device=device)
                removed = torch.ones(channel_set.width, dtype=torch.bool)
                removed[kept] = False
                removed_index = removed.nonzero().squeeze(1).to(device)
                norms.append(_Norm(model.get_submodule(module_name), buffers, kept_index, removed_index))
        slim_modules = dict(structure.named_modules())
        pairs = [(m, slim_modules[n]) for n, m in model.named_modules()]
        return _Plan(structure, pairs, full, cuts, norms)

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            log.info("slim training: %s", message)

    # ------------------------------------------------------------------ report
    def kept(self) -> dict[str, int]:
        """Per channel set, the channels the forward computed at its last call (the full width where uncut)."""
        return {name: kept for name, (kept, _) in self.widths.items()}

    def summary(self) -> dict[str, Any]:
        """What slim training did, as plain data (for a run's summary.json): structures built, the widths in force
        at the last forward (kept / full per channel set), forward counts, sets left uncut and why."""
        return {
            "active": self.active,
            "unsupported": self.unsupported,
            "rebuilds": self.rebuilds,
            "mask_changes": self.mask_changes,
            "widths": {name: f"{kept}/{width}" for name, (kept, width) in self.widths.items()},
            "forwards_slim": self.forwards["slim"],
            "forwards_plain": self.forwards["plain"],
            "eval_forwards_slim": self.eval_forwards["slim"],
            "eval_forwards_plain": self.eval_forwards["plain"],
            "skipped": dict(self.skipped),
        }
