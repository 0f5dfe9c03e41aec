"""sparsetrain: train sparse yet accurate neural networks in PyTorch.

Three lines in any training loop::

    sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_epochs=100, steps_per_epoch=len(loader))
    sparsifier.attach(optimizer)
    checkpoint["sparsifier"] = sparsifier.state_dict()
"""

# methods registers every method; oneshot and optim are public modules (prune_oneshot, RDA, CrAM).
from . import methods, oneshot, optim  # noqa: F401
from .core import (
    Capability,
    MemoryReport,
    ScheduledPruning,
    Sparsifier,
    SparsityReport,
    create,
    get_method,
    list_methods,
    method_options,
    method_summary,
    register,
)
from .schedules import Phase
from .sparse_training import SparseKernels

__version__ = "0.1.0"

__all__ = [
    "Capability",
    "Phase",
    "ScheduledPruning",
    "MemoryReport",
    "Sparsifier",
    "SparseKernels",
    "SparsityReport",
    "create",
    "get_method",
    "list_methods",
    "method_options",
    "method_summary",
    "register",
    "__version__",
]
