"""Per-layer sparsity allocation from a database of layer errors: a dynamic program over layers.

OBC (Frantar & Alistarh, NeurIPS 2022, arXiv 2208.11580) and SPDY (Frantar & Alistarh, ICML 2022, arXiv
2201.13096) pick one compression level per layer so that the sum of the layer-wise errors is least under a global
budget. Here the budget is the total number of zeros: ``sum_l zeros[l][level_l] >= target``. The DP runs over the
layers with the zeros counted in units of ``ceil(target / buckets)``; each level's zeros are rounded *down* to whole
units, so every solution the DP accepts meets the real target. Exactness: with ``target <= buckets`` a unit is one
zero and the result is the exact optimum; with coarser units the DP may miss a solution whose zeros only reach the
target through the rounded-off remainders (its error is then at most that of the best solution that reaches the
target on rounded counts).

``allocate_under_budget`` is SPDY's form: a cost per level (a measured time) and an upper bound on the total,
``sum_l costs[l][level_l] <= budget``. Costs are rounded *up* to units of ``budget / buckets``, so again every
accepted solution meets the real budget, and the result is the exact optimum when every cost is a whole number of
units (e.g. integer costs with ``buckets == budget``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["allocate_levels", "allocate_under_budget"]


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


def allocate_under_budget(
    errors: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    *,
    buckets: int = 1000,
) -> list[int]:
    """One level per layer minimising ``sum errors[l][level]`` subject to ``sum costs[l][level] <= budget``.

    The dynamic program of SPDY (Frantar & Alistarh, ICML 2022, arXiv 2201.13096, section 3.2) with the costs
    being each layer's measured time at each level: the budget is split into ``buckets`` units, each cost is
    rounded up to whole units, and the DP keeps, per number of units used, the least error of the layers so far.

    Args:
        errors: per layer, the (weighted) error of each of its levels (finite).
        costs: per layer, the cost of each level (finite, >= 0; same lengths as ``errors``).
        budget: the largest total cost allowed (> 0).
        buckets: resolution of the budget (see the module docstring for when the result is exact).

    Returns:
        The chosen level index of each layer; its total cost is at most ``budget``.

    Raises:
        ValueError: mismatched lengths, a layer with no level, a negative or non-finite cost, ``buckets`` < 1, or
            a budget below the cheapest choice of every layer (the message names that least total).
    """
    if len(errors) != len(costs):
        raise ValueError(f"errors and costs must describe the same layers, got {len(errors)} and {len(costs)}")
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"buckets must be a positive integer, got {buckets!r}")
    for layer, (e, c) in enumerate(zip(errors, costs)):
        if not len(e) or len(e) != len(c):
            raise ValueError(f"layer {layer}: {len(e)} errors and {len(c)} costs (need equal, >= 1)")
        if not all(math.isfinite(float(x)) and float(x) >= 0 for x in c):
            raise ValueError(f"layer {layer}: costs must be finite and >= 0, got {list(c)!r}")
    least = sum(min(float(x) for x in c) for c in costs)
    if not (math.isfinite(float(budget)) and budget > 0) or least > budget:
        raise ValueError(f"a total cost of at most {budget!r} is out of reach: the cheapest levels cost {least!r}")
    if not errors:
        return []
    unit = float(budget) / buckets
    inf = math.inf
    best = torch.full((buckets + 1,), inf, dtype=torch.float64)
    best[0] = 0.0  # best[b]: least error of the layers so far using exactly b units
    choices = []
    for e, c in zip(errors, costs):
        new = torch.full_like(best, inf)
        level_of = torch.full((buckets + 1,), -1, dtype=torch.long)
        for level, (err, cost) in enumerate(zip(e, c)):
            k = math.ceil(float(cost) / unit)
            if k > buckets:
                continue
            candidate = best[: buckets + 1 - k] + float(err)
            better = candidate < new[k:]
            new[k:] = torch.where(better, candidate, new[k:])
            level_of[k:] = torch.where(better, torch.tensor(level), level_of[k:])
        best = new
        choices.append((level_of, [math.ceil(float(cost) / unit) for cost in c]))
    if not torch.isfinite(best).any():
        # Only the rounding up lost it: the cheapest level of every layer fits the real budget.
        return [min(range(len(c)), key=lambda i, c=c: float(c[i])) for c in costs]
    b = int(torch.argmin(best))
    levels = []
    for level_of, units in reversed(choices):
        level = int(level_of[b])
        levels.append(level)
        b -= units[level]
    return levels[::-1]
