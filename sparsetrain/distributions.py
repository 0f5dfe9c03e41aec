"""Pure layer-sparsity distributions: how a target sparsity is shared out among layers.

- ``uniform``: every layer at the target sparsity.
- ``erk``: Erdos-Renyi-Kernel (Evci et al. 2020, arXiv 1911.11134): layer density proportional to
  sum(dims) / prod(dims), scaled so the total matches the target; layers that would exceed density 1 are
  made dense and the scale is solved again for the rest.
- ``global``: one magnitude ranking over all layers. It depends on the weights, not only the shapes, so it
  has no per-layer table here: ``maskops.global_topk_masks`` implements it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

DISTRIBUTIONS = ("global", "uniform", "erk")

__all__ = ["DISTRIBUTIONS", "check_distribution", "uniform", "erk", "layer_sparsities"]


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}")
    return distribution


def uniform(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Every layer at ``sparsity``."""
    return {name: float(sparsity) for name in shapes}


def erk(shapes: Mapping[str, Sequence[int]], sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer sparsities whose weighted total density is ``1 - sparsity``.

    ``power`` scales the raw ERK probability (1.0 is the paper's ERK).
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: (sum(shape) / math.prod(shape)) ** power for name, shape in shapes.items()}
    target_kept = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        sparse_names = [n for n in shapes if n not in dense]
        budget = target_kept - sum(numel[n] for n in dense)
        weight = sum(raw[n] * numel[n] for n in sparse_names)
        if not sparse_names or weight == 0:
            break
        scale = budget / weight
        # The layer with the largest raw density overflows first; make it dense and re-solve.
        overflowing = [n for n in sparse_names if scale * raw[n] > 1.0]
        if not overflowing:
            break
        dense.add(max(overflowing, key=lambda n: raw[n]))
    out = {}
    for name in shapes:
        density = 1.0 if name in dense else min(1.0, scale * raw[name])
        out[name] = max(0.0, 1.0 - density)
    return out


def layer_sparsities(
    distribution: str, shapes: Mapping[str, Sequence[int]], sparsity: float
) -> dict[str, float] | None:
    """Per-layer sparsities for ``distribution``; None for ``global``, which ranks weights across layers."""
    check_distribution(distribution)
    if distribution == "uniform":
        return uniform(shapes, sparsity)
    if distribution == "erk":
        return erk(shapes, sparsity)
    return None
