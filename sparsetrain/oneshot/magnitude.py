"""One-shot magnitude pruning of a trained model (Han et al. 2015, arXiv 1506.02626), the default of ``prune``.

The recipe after CrAM (Peste et al., ICLR 2023) and for any trained dense model: prune once by magnitude to the
target sparsity (or an N:M pattern), then re-calibrate the batch-norm statistics (``batchnorm.py``). No gradient
step is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..core import create
from ..maskops import parse_nm

__all__ = ["prune_oneshot"]


def prune_oneshot(
    model: nn.Module,
    sparsity: float | None,
    *,
    mask_type: str = "unstructured",
    distribution: str = "global",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Prune ``model`` **in place** by magnitude and return the masks (parameter name -> bool, True = kept).

    In place, because the pruned model is what the caller evaluates, re-calibrates and saves; copy the model (or
    its ``state_dict``) first to keep the dense one. The masks come from the same machinery as every method
    (the ``magnitude`` sparsifier at step 0): exact counts; exact ties at the threshold are shared among
    layers in proportion to how many each holds.

    Args:
        model: the model; by default every weight with dim >= 2 is pruned.
        sparsity: fraction of zeros in [0, 1); for N:M leave it None (or give 1 - N/M).
        mask_type: 'unstructured' or 'N:M' such as '2:4' (N kept of every M along the input dimension).
        distribution: 'global' (one ranking over all pruned weights), 'uniform' or 'erk'.
        include / exclude: glob patterns over parameter names.

    Raises:
        ValueError: a bad sparsity, mask type, distribution or pattern (the message says what is allowed).
    """
    if sparsity is None and parse_nm(mask_type) is None:
        raise ValueError("prune_oneshot needs sparsity= (a number in [0, 1), e.g. 0.9) for unstructured pruning")
    sparsifier = create(
        "magnitude",
        model,
        sparsity=sparsity,
        mask_type=mask_type,
        distribution=distribution,
        include=include,
        exclude=exclude,
    )
    return {name: mask.clone() for name, mask in sparsifier.masks.items()}
