"""Structured sparsity: zero-invariant groups found from the model graph, and the slim network they leave.

``groups(model, sample)`` lists the groups (:mod:`sparsetrain.structured.groups`); ``slim(model, sample)`` builds
the physically smaller dense network once whole groups are zero (:mod:`sparsetrain.structured.slim`);
``SlimTraining(sparsifier, sample)`` trains a channel-masked model as that narrower network
(:mod:`sparsetrain.structured.slim_training`).
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
from .slim_training import WIDTH_AWARE, SlimTraining

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
    "WIDTH_AWARE",
    "SlimTraining",
    "apply_keep",
    "build_from_spec",
    "groups",
    "kept_channels",
    "slim",
    "slim_spec",
]
