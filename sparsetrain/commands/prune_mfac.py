"""``sparsetrain prune --method mfac``: the options of one-shot M-FAC pruning, their checks, and the pruning call.

M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv 2107.03356): OBS saliency and the exact block-wise OBS
correction from the damped empirical Fisher of m calibration gradients (``sparsetrain.oneshot.prune_mfac``).
Kept apart from ``prune.py`` so that the command's pipeline (loading, evaluation, re-calibration, saving, the
table) stays the one every method shares.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import ConfigError

OPTIONS = ("gradients", "block", "damp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--gradients``, ``--block`` and ``--damp`` (used by ``--method mfac`` only)."""
    from ..oneshot.mfac import DEFAULT_BLOCK, DEFAULT_GRADIENTS, DEFAULT_RELATIVE_DAMP

    parser.add_argument(
        "--gradients",
        type=int,
        default=None,
        metavar="M",
        help=f"--method mfac: m, the calibration gradients in the empirical Fisher (default: {DEFAULT_GRADIENTS}); "
        "cost O(m^2 d) time and m x d float64 memory for d pruned weights",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        metavar="B",
        help="--method mfac: weights per block of the block-diagonal Fisher, 1 <= B <= the number of pruned "
        f"weights (default: {DEFAULT_BLOCK or 'one block of all weights'})",
    )
    parser.add_argument(
        "--damp",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="--method mfac: dampening lambda > 0 added to the Fisher's diagonal (default: "
        f"{DEFAULT_RELATIVE_DAMP:g} x the mean diagonal of the Fisher of the gradients)",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``prune_mfac`` keyword arguments from the command line; ``ConfigError`` for a bad value.

    Options of ``--method mfac`` given with another method are refused, as OBC's are.
    """
    from ..oneshot.mfac import DEFAULT_BLOCK, DEFAULT_GRADIENTS

    given = [f"--{name}" for name in OPTIONS if getattr(args, name) is not None]
    if args.method != "mfac":
        if given:
            raise ConfigError(f"{', '.join(given)} configure(s) M-FAC pruning; it needs --method mfac "
                              f"(got --method {args.method})")
        return {}
    m = DEFAULT_GRADIENTS if args.gradients is None else args.gradients
    if m < 1:
        raise ConfigError(f"--gradients must be a number of gradients >= 1, got {m}")
    if args.block is not None and args.block < 1:
        raise ConfigError(f"--block must be a number of weights >= 1 per block, got {args.block}")
    if args.damp is not None and not (math.isfinite(args.damp) and args.damp > 0):
        raise ConfigError(f"--damp must be a finite number > 0 (the Fisher's dampening), got {args.damp:g}")
    samples = m if args.calibration is None else args.calibration
    if samples < m:
        raise ConfigError(f"--calibration must be at least --gradients: {m} gradients need >= {m} training "
                          f"samples, got {samples}")
    block = DEFAULT_BLOCK if args.block is None else args.block
    return {"num_gradients": m, "num_samples": samples, "block_size": block, "damp": args.damp}


def check_block(mfac_options: dict[str, Any], pruned_weights: int) -> None:
    """Refuse a block larger than the model: ``ConfigError`` naming the number of weights it prunes."""
    block = mfac_options.get("block_size")
    if block is not None and block > pruned_weights:
        raise ConfigError(f"--block {block} is larger than the model: it prunes {pruned_weights} weights in all "
                          f"(choose 1 <= B <= {pruned_weights}, or leave --block out for one block)")


def describe(mfac_options: dict[str, Any]) -> str:
    """The ``method:`` line of the command's output."""
    m, samples = mfac_options["num_gradients"], mfac_options["num_samples"]
    per = samples // m
    block = mfac_options["block_size"]
    damp = mfac_options["damp"]
    return (f"method: M-FAC, OBS with the empirical Fisher of {m} gradients of {per} training sample"
            f"{'s' if per != 1 else ''} each, {'one block' if block is None else f'blocks of {block} weights'}, "
            f"damp {'1% of the mean Fisher diagonal' if damp is None else f'{damp:g}'}")


def prune(model: Any, sparsity: float | None, batches: Any, mfac_options: dict[str, Any],
          prune_options: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """``prune_mfac`` with the command's options; a ValueError (a bad pattern, too few samples) is a usage error."""
    from ..oneshot.mfac import prune_mfac
    from ..train.evaluation import batch_loss

    try:
        # The training loss of the run: a language model's (batch, tokens, vocabulary) logits are scored per token.
        return prune_mfac(model, sparsity, batches, report=report, loss_fn=batch_loss, **mfac_options,
                          **prune_options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
