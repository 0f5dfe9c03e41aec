"""What a method declares about itself, as typed flags checked when it is registered."""

from __future__ import annotations

import enum


class Capability(enum.Flag):
    """Capability flags a method declares in ``capabilities`` (``Capability.SPARSE | Capability.MASK_UPDATES``).

    ``register()`` refuses a method whose ``capabilities`` is not a ``Capability``, and one whose flags disagree
    with the queries it overrides (see the last three). Each flag, and who reads it:

    SPARSE: the run ends at the target sparsity (the conformance suite checks the final zero count; the trainer
        reports a method without it, and without PRUNE_AFTER_TRAINING, as a dense run).
    MASK_UPDATES: the masks change during training (the suite requires at least one mask update).
    PHASES: alternates dense and sparse phases; pruned weights re-enter (``reentry_keeps_second_moments``).
    GROUP_PHASES: one group of layers is dense at a time, the others sparse; pruned weights re-enter
        (``reentry_keeps_second_moments``; the suite checks exact counts per layer instead of overall).
    DROP_GROW: drops and regrows weights at a constant count; regrown weights start at 0 (the suite does not
        expect the weights' zeros to equal the masks' at lr 0).
    NM: accepts N:M masks (``mask_type='2:4'``; ``Sparsifier.__init__`` refuses N:M without it, and so does the
        trainer's config; the suite checks the N:M groups of every method with it).
    CHANNEL: accepts channel masks (``mask_type='channel'``: whole zero-invariant groups of
        :mod:`sparsetrain.structured` pruned by group norm; ``Sparsifier.__init__`` refuses them without it).
    PRUNE_AFTER_TRAINING: trains a dense model meant to be pruned one-shot afterwards (the trainer prunes it to the
        target with batch-norm re-calibration and reports both models).
    CLOSURE: the method's optimizer steps only with ``optimizer.step(closure)`` (the trainer passes one and
        refuses fp16 gradient scaling; the suite leaves out the GradScaler test). Needs OWN_OPTIMIZER.
    OWN_OPTIMIZER: training needs the optimizer ``wrap_optimizer`` returns and ``attach`` refuses any other
        (declared exactly when the method overrides ``wrap_optimizer``; the suite checks the refusal).
    DENSE_GRADIENTS: some steps read the gradients of masked weights, the steps ``needs_dense_gradients()`` names
        (declared exactly when the method overrides it; communication hooks send those steps densely and the
        trainer charges them dense FLOPs; the suite checks that methods without it never ask).
    REPLICA_PHASES: data-parallel replicas train apart for a while (``synchronize_gradients()`` false; declared
        exactly when the method overrides it).

    A method whose masks must be acted on before the optimizer step (RigL reads that step's gradients) sets the
    class attribute ``needs_attach``: its hooks cannot be replaced by calling ``sparsifier.step()``.
    """

    SPARSE = enum.auto()
    MASK_UPDATES = enum.auto()
    PHASES = enum.auto()
    GROUP_PHASES = enum.auto()
    DROP_GROW = enum.auto()
    NM = enum.auto()
    PRUNE_AFTER_TRAINING = enum.auto()
    CLOSURE = enum.auto()
    OWN_OPTIMIZER = enum.auto()
    DENSE_GRADIENTS = enum.auto()
    REPLICA_PHASES = enum.auto()
    CHANNEL = enum.auto()


# Flags that announce a per-step query: declared exactly when the method overrides that Sparsifier method.
QUERY_FLAGS = {
    Capability.OWN_OPTIMIZER: "wrap_optimizer",
    Capability.DENSE_GRADIENTS: "needs_dense_gradients",
    Capability.REPLICA_PHASES: "synchronize_gradients",
}


def check_capabilities(cls: type) -> None:
    """Raise ValueError if ``cls.capabilities`` is not a :class:`Capability` or disagrees with ``cls``'s overrides."""
    from .sparsifier import Sparsifier

    declared = cls.capabilities
    if not isinstance(declared, Capability):
        raise ValueError(
            f"{cls.__qualname__}.capabilities must be a sparsetrain.core.Capability (flags joined with |, e.g. "
            f"Capability.SPARSE | Capability.MASK_UPDATES), got {declared!r}"
        )
    for flag, query in QUERY_FLAGS.items():
        overridden = getattr(cls, query) is not getattr(Sparsifier, query)
        if overridden != (flag in declared):
            raise ValueError(
                f"{cls.__qualname__}: Capability.{flag.name} is declared exactly when the method overrides "
                f"{query}(); it {'overrides' if overridden else 'does not override'} it and "
                f"{'does not declare' if overridden else 'declares'} the flag"
            )
    if Capability.CLOSURE in declared and Capability.OWN_OPTIMIZER not in declared:
        raise ValueError(
            f"{cls.__qualname__}: Capability.CLOSURE describes the method's own optimizer; declare OWN_OPTIMIZER too"
        )
