"""The slim network: a physically smaller dense model with the channels of all-zero groups removed.

Once every producing slice of a zero-invariant group (weight rows, biases, batch-norm scale and shift) is zero,
its channel is exactly zero wherever it goes, so removing it, with the input slices of every layer that reads it
and its batch-norm statistics, leaves the outputs unchanged (up to float rounding of sums over fewer terms). The
slim model keeps the module tree and the forward of the original (only layer widths change), so it is saved and
rebuilt from a *spec*: the original model's spec plus, per channel set, the channels kept
(:func:`slim_spec`, :func:`build_from_spec`).

Reference: Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467 (constructing the subnetwork from the
zero groups, with no fine-tuning).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .groups import ZERO_INVARIANT_ROLES, Groups, UnsupportedModel, groups

__all__ = ["SLIM_KEY", "apply_keep", "build_from_spec", "kept_channels", "slim", "slim_spec"]

# The key of a model spec under which a slim model's kept channels are recorded.
SLIM_KEY = "slim"


@torch.no_grad()
def kept_channels(model: nn.Module, zigs: Groups) -> dict[str, list[int]]:
    """Per channel set, the channels to keep: those whose zero-invariant slices are not all exactly zero.

    A set whose channels are all zero keeps its first channel (a zero channel: harmless, and it spares every
    layer a width of 0, which torch's layers do not all accept).
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    keep = {}
    for channel_set in zigs.sets:
        rows = channel_set.channel_matrix(state, ZERO_INVARIANT_ROLES)
        alive = torch.zeros(channel_set.width, dtype=torch.bool)
        for row in rows:
            alive |= (row != 0).any(dim=1).cpu()
        kept = alive.nonzero().squeeze(1).tolist() or [0]
        keep[channel_set.name] = kept
    return keep


def _check_keep(zigs: Groups, keep: Mapping[str, Any]) -> dict[str, list[int]]:
    """``keep`` validated against the channel sets: known names, strictly increasing indices in range, non-empty."""
    if not isinstance(keep, Mapping):
        raise ValueError(f"kept channels must be a mapping of channel set -> indices, got {type(keep).__name__}")
    widths = {s.name: s.width for s in zigs.sets}
    unknown = [k for k in keep if k not in widths]
    if unknown:
        raise ValueError(
            f"kept channels name unknown channel sets {unknown[:5]}; the model's sets are: {', '.join(widths)}"
        )
    out = {}
    for name, indices in keep.items():
        width = widths[name]
        valid = (
            isinstance(indices, list)
            and 0 < len(indices) <= width
            and all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            and all(0 <= a < b < width for a, b in zip(indices, indices[1:]))
            and 0 <= indices[0]
            and indices[-1] < width
        )
        if not valid:
            raise ValueError(
                f"kept channels of {name!r} must be a non-empty, strictly increasing list of indices in "
                f"[0, {width}); got {str(indices)[:80]}"
            )
        out[name] = list(indices)
    return out


@torch.no_grad()
def apply_keep(model: nn.Module, zigs: Groups, keep: Mapping[str, Any]) -> nn.Module:
    """Cut ``model`` in place to the channels ``keep`` names (channel set -> kept indices; sets left out keep all).

    Every member tensor of a set is index-selected along its channel axis (blocks after a flatten), and the layer
    attributes that describe widths (``out_channels``, ``in_features``, ``num_features``, a depthwise
    convolution's ``groups``) follow. Works on the meta device (shapes only). Returns ``model``.
    """
    keep = _check_keep(zigs, keep)
    cuts: dict[str, list[tuple[int, Tensor]]] = {}
    for channel_set in zigs.sets:
        kept = keep.get(channel_set.name)
        if kept is None or len(kept) == channel_set.width:
            continue
        index = torch.tensor(kept, dtype=torch.long)
        for member in channel_set.members:
            expanded = (index[:, None] * member.block + torch.arange(member.block)).reshape(-1)
            cuts.setdefault(member.name, []).append((member.dim, expanded))
    touched: set[str] = set()
    for name, dims in cuts.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        new = old.detach()
        for dim, index in dims:
            new = new.index_select(dim, index.to(new.device))
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new.contiguous()
        touched.add(module_name)
    for module_name in touched:
        _fix_widths(model.get_submodule(module_name))
    return model


def _fix_widths(module: nn.Module) -> None:
    """Make a layer's width attributes agree with its (cut) tensors."""
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.in_channels = module.groups = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]


def slim(
    model: nn.Module,
    sample: Tensor,
    *,
    keep: Mapping[str, list[int]] | None = None,
    zigs: Groups | None = None,
) -> nn.Module:
    """A physically smaller copy of ``model`` without the channels whose zero-invariant group is all zero.

    Args:
        model: the (group-sparse) network; not modified.
        sample: an input batch for the group analysis (only its shape matters).
        keep: the channels to keep per channel set (default: :func:`kept_channels`, the nonzero groups).
        zigs: the groups, if already computed for this model and sample.

    Returns:
        A deep copy of ``model`` with narrower layers (same module names and forward), in the mode ``model`` was.
        Its outputs equal ``model``'s, up to float rounding, when the removed groups are zero.

    Reference: Chen et al., "Only Train Once", NeurIPS 2021, arXiv 2107.07467.
    """
    zigs = zigs if zigs is not None else groups(model, sample)
    keep = kept_channels(model, zigs) if keep is None else keep
    return apply_keep(copy.deepcopy(model), zigs, keep)


def slim_spec(model_spec: Mapping[str, Any], keep: Mapping[str, list[int]]) -> dict[str, Any]:
    """The spec of a slim model: the dense model's spec plus its kept channels (``spec["slim"]["keep"]``)."""
    return {**dict(model_spec), SLIM_KEY: {"keep": {k: [int(i) for i in v] for k, v in keep.items()}}}


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Build the model a spec names: ``build_model`` of its name, shape and classes, cut to its ``slim`` channels.

    Build it under ``torch.device("meta")`` to get shapes only (what :func:`sparsetrain.export.load` does with
    a spec from a file before allocating anything). The kept channels are validated (known channel sets,
    indices in range), so a spec from a file can only describe a model narrower than the one its name builds.

    Raises:
        ValueError: an unknown model, or invalid kept channels; UnsupportedModel if the model has no groups.
    """
    from ..models import build_model

    model = build_model(spec["name"], input_shape=spec["input_shape"], num_classes=spec["num_classes"])
    extra = spec.get(SLIM_KEY)
    if extra is None:
        return model
    if not isinstance(extra, Mapping) or set(extra) != {"keep"}:
        raise ValueError(f"a slim spec's {SLIM_KEY!r} entry must be {{'keep': {{...}}}}, got {str(extra)[:80]}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sample = torch.zeros(2, *spec["input_shape"], device=device)
    try:
        zigs = groups(model, sample)
    except UnsupportedModel as error:
        raise ValueError(f"model {spec['name']!r} cannot be slimmed: {error}") from None
    return apply_keep(model, zigs, extra["keep"])
