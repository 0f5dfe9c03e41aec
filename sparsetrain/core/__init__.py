"""The engine: mask store, hard-zero enforcement, time, state_dict, and the method registry."""

from .capabilities import Capability
from .registry import common_options, create, get_method, list_methods, method_options, method_summary, register
from .scheduled import ScheduledPruning
from .selection import select_parameters
from .sparsifier import MemoryReport, Sparsifier, SparsityReport

__all__ = [
    "Capability",
    "ScheduledPruning",
    "common_options",
    "MemoryReport",
    "Sparsifier",
    "SparsityReport",
    "create",
    "get_method",
    "list_methods",
    "method_options",
    "method_summary",
    "register",
    "select_parameters",
]
