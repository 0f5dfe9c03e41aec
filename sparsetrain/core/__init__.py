"""The engine: mask store, hard-zero enforcement, time, state_dict, and the method registry."""

from .registry import create, get_method, list_methods, method_options, method_summary, register
from .selection import select_parameters
from .sparsifier import Sparsifier, SparsityReport

__all__ = [
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
