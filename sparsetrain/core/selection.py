"""Which parameters a sparsifier owns: every weight with dim >= 2 unless ``include``/``exclude`` say otherwise."""

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


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Parameters to sparsify, by qualified name, in the model's parameter order.

    Default: every parameter with ``dim() >= 2`` (Linear, Conv, Embedding weights), not biases or norms.
    ``include`` replaces that default with glob patterns over names (``"features.*.weight"``); ``exclude``
    removes matches from the selection (keep the first conv and the classifier dense, for example).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include_patterns = _as_patterns(include, "include")
    exclude_patterns = _as_patterns(exclude, "exclude")
    named = dict(model.named_parameters())
    if include_patterns:
        for pattern in include_patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
                raise ValueError(
                    f"include pattern {pattern!r} matches no parameter; parameter names are: "
                    f"{', '.join(named) or '(none)'}"
                )
        chosen = {n: p for n, p in named.items() if any(fnmatch.fnmatchcase(n, pat) for pat in include_patterns)}
    else:
        chosen = {n: p for n, p in named.items() if p.dim() >= 2}
    for pattern in exclude_patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
            # A recipe may be shared across models; a miss is worth a warning, not an error.
            log.warning("exclude pattern %r matches no parameter", pattern)
    chosen = {n: p for n, p in chosen.items() if not any(fnmatch.fnmatchcase(n, pat) for pat in exclude_patterns)}
    if not chosen:
        raise ValueError(
            "nothing to sparsify: no parameter with dim >= 2 is selected "
            f"(include={include_patterns or 'default'}, exclude={exclude_patterns or 'none'}); "
            f"parameters are: {', '.join(f'{n} {tuple(p.shape)}' for n, p in named.items()) or '(none)'}"
        )
    return chosen
