"""Structured sparsity: zero-invariant groups found from the model graph, and the slim network they leave.

``groups(model, sample)`` lists the groups (:mod:`sparsetrain.structured.groups`); ``slim(model, sample)`` builds
the physically smaller dense network once whole groups are zero (:mod:`sparsetrain.structured.slim`).
"""

from .groups import (
    CONSUMER,
    NORM,
    PRODUCER,
    STATS,
    ChannelSet,
    Group,
    Groups,
    Member,
    Slice,
    UnsupportedModel,
    groups,
)
from .slim import SLIM_KEY, apply_keep, build_from_spec, kept_channels, slim, slim_spec

__all__ = [
    "CONSUMER",
    "NORM",
    "PRODUCER",
    "STATS",
    "ChannelSet",
    "Group",
    "Groups",
    "Member",
    "Slice",
    "UnsupportedModel",
    "SLIM_KEY",
    "apply_keep",
    "build_from_spec",
    "groups",
    "kept_channels",
    "slim",
    "slim_spec",
]
