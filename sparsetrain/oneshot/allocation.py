"""Per-layer sparsity allocation from a database of layer errors: a dynamic program over layers.

OBC (Frantar & Alistarh, NeurIPS 2022, arXiv 2208.11580) and SPDY (Frantar & Alistarh, ICML 2022, arXiv
2201.13096) pick one compression level per layer so that the sum of the layer-wise errors is least under a global
budget. Here the budget is the total number of zeros: ``sum_l zeros[l][level_l] >= target``. The DP runs over the
layers with the zeros counted in units of ``ceil(target / buckets)``; each level's zeros are rounded *down* to whole
units, so every solution the DP accepts meets the real target. Exactness: with ``target <= buckets`` a unit is one
zero and the result is the exact optimum; with coarser units the DP may miss a solution whose zeros only reach the
target through the rounded-off remainders (its error is then at most that of the best solution that reaches the
target on rounded counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["allocate_levels"]


def allocate_levels(
    errors: Sequence[Sequence[float]],
    zeros: Sequence[Sequence[int]],
    target: int,
    *,
    buckets: int = 1000,
) -> list[int]:
    """One level per layer minimising ``sum errors[l][level]`` subject to ``sum zeros[l][level] >= target``.

    Args:
        errors: per layer, the error of each of its levels (finite, any sign).
        zeros: per layer, the zero count of each level (same lengths as ``errors``).
        target: the least total number of zeros.
        buckets: resolution of the zero budget (see the module docstring for when the result is exact).

    Returns:
        The chosen level index of each layer.

    Raises:
        ValueError: mismatched lengths, a layer with no level, ``buckets`` < 1, or a target that even the levels
            with the most zeros cannot reach.
    """
    if len(errors) != len(zeros):
        raise ValueError(f"errors and zeros must describe the same layers, got {len(errors)} and {len(zeros)}")
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets!r}")
    for layer, (e, z) in enumerate(zip(errors, zeros)):
        if not len(e) or len(e) != len(z):
            raise ValueError(f"layer {layer}: {len(e)} errors and {len(z)} zero counts (need equal, >= 1)")
    most = sum(max(z) for z in zeros)
    if target > most:
        raise ValueError(f"a total of {target} zeros is out of reach: the levels give at most {most}")
    if not errors:
        return []
    target = max(int(target), 0)
    unit = max(1, math.ceil(target / buckets))
    need = math.ceil(target / unit)  # states are min(units reached, need)
    inf = math.inf
    # best[b]: least error of the layers so far with min(units, need) == b; choice[l][b]: the level taken.
    best = [0.0] + [inf] * need
    choices: list[list[tuple[int, int]]] = []
    for e, z in zip(errors, zeros):
        new = [inf] * (need + 1)
        choice = [(-1, -1)] * (need + 1)
        for b, so_far in enumerate(best):
            if so_far == inf:
                continue
            for level, (err, count) in enumerate(zip(e, z)):
                nb = min(need, b + int(count) // unit)
                value = so_far + float(err)
                if value < new[nb]:
                    new[nb], choice[nb] = value, (level, b)
        best = new
        choices.append(choice)
    if best[need] == inf:
        # Only the rounding lost it: every layer at its level with the most zeros reaches the target.
        return [int(torch.tensor([float(c) for c in z]).argmax()) for z in zeros]
    levels = []
    b = need
    for choice in reversed(choices):
        level, b = choice[b]
        levels.append(level)
    return levels[::-1]
