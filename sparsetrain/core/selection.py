"""Which parameters a sparsifier owns: every weight with dim >= 2 unless ``include``/``exclude`` say otherwise, or
the model declares some of its weights dense by default (``keep_dense``: a transformer's embeddings)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from torch import nn

log = logging.getLogger(__name__)


def _as_patterns(patterns: str | Sequence[str] | None, what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{what} must be a glob pattern or a list of them, got {patterns!r}")
    return list(patterns)


def _declared_dense(model: nn.Module) -> list[str]:
    """The ``keep_dense`` patterns of every module, prefixed with the module's name, so that a declaring model
    nested inside another (a wrapper, a ``DistributedDataParallel``) keeps its default."""
    patterns: list[str] = []
    for prefix, module in model.named_modules():
        own = getattr(module, "keep_dense", ())
        patterns += [f"{prefix}.{pattern}" if prefix else pattern for pattern in _as_patterns(own, "keep_dense")]
    return patterns


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Parameters to sparsify, by qualified name, in the model's parameter order.

    Default: every parameter with ``dim() >= 2`` (Linear, Conv, Embedding weights), not biases or norms, except
    those a module of the model declares dense by default: a module's ``keep_dense`` attribute is a tuple of glob
    patterns over its own parameter names (the zoo's GPT and ViT keep their token, patch and position embeddings
    dense this way). ``include`` replaces that default with glob patterns over names (``"features.*.weight"``);
    ``exclude`` removes matches from the selection (keep the first conv and the classifier dense, for example).
    A parameter shared by several modules (tied weights: an embedding and an output layer) is one parameter with
    several names: the patterns match any of them, and it is keyed by the first (``model.named_parameters()``'s).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    named = dict(model.named_parameters())
    # Every name of every parameter: named_parameters() reports a tied parameter under its first name only, so
    # exclude=["lm_head.weight"] on a head tied to the embedding would match nothing and sparsify it anyway.
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    all_names = [n for names in aliases.values() for n in names]

    def matches(param: nn.Parameter, patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, pat) for n in aliases[id(param)] for pat in patterns)

    if include_patterns:
        for pattern in include_patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
                raise ValueError(
                    f"include pattern {pattern!r} matches no parameter; parameter names are: "
                    f"{', '.join(all_names) or '(none)'}"
                )
        chosen = {n: p for n, p in named.items() if matches(p, include_patterns)}
    else:
        dense = _declared_dense(model)
        chosen = {n: p for n, p in named.items() if p.dim() >= 2 and not matches(p, dense)}
    for pattern in exclude_patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            # A recipe may be shared across models; a miss is worth a warning, not an error.
            log.warning("exclude pattern %r matches no parameter", pattern)
    chosen = {n: p for n, p in chosen.items() if not matches(p, exclude_patterns)}
    if not chosen:
        raise ValueError(
            "nothing to sparsify: no parameter with dim >= 2 is selected "
            f"(include={include_patterns or 'default'}, exclude={exclude_patterns or 'none'}); "
            f"parameters are: {', '.join(f'{n} {tuple(p.shape)}' for n, p in named.items()) or '(none)'}"
        )
    return chosen


def input_dim(model: nn.Module, name: str) -> int:
    """The dimension of parameter ``name`` (a qualified name in ``model``) that runs over its layer's inputs.

    N:M masks group M consecutive weights along it, the layout N:M kernels need. 1 for ``nn.Linear`` (out, in),
    convolutions (out, in, k...) and every other weight; 0 for the weight of Hugging Face transformers' ``Conv1D``
    (GPT-2's attention and MLP layers), which is stored transposed, (in, out), and computes ``x @ weight + bias``.
    That module is recognised by its class name (a class or base class named ``Conv1D``, with a 2-D weight of
    shape (nx, nf)), so transformers is not imported; ``torch.nn.Conv1d`` (lower-case d) is an ordinary conv.
    """
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    weight = getattr(module, attr, None)
    if (
        attr == "weight"
        and any(cls.__name__ == "Conv1D" for cls in type(module).__mro__)  # FSDP wraps it in a subclass
        and weight is not None
        and weight.dim() == 2
        and getattr(module, "nf", weight.shape[1]) == weight.shape[1]
    ):
        return 0
    return 1
