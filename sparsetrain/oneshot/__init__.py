"""Post-training compression of a trained model: one-shot pruning and batch-norm re-calibration.

- ``prune_oneshot``: magnitude pruning (``magnitude.py``), the default of ``sparsetrain prune``.
- ``prune_obc``: OBC / ExactOBS (Frantar & Alistarh, NeurIPS 2022, arXiv 2208.11580), each layer solved with
  greedy Optimal Brain Surgeon on its calibration inputs (``obc.py``, ``calibration.py``); layers too wide for it
  are solved by ``sparsegpt`` (Frantar & Alistarh, ICML 2023, arXiv 2301.00774; ``sparsegpt.py``).
- ``build_database`` / ``allocate_levels``: the OBC database of every layer at a grid of sparsities and the
  dynamic program that picks each layer's level from it (``database.py``, ``allocation.py``).
- ``prune_spdy``: SPDY (Frantar & Alistarh, ICML 2022, arXiv 2201.13096), per-layer sparsities from the database
  that meet a measured speed-up target at the least calibration loss (``spdy.py``).
- ``prune_mfac``: one-shot M-FAC (Frantar, Kurtic & Alistarh, NeurIPS 2021, arXiv 2107.03356), OBS saliency and
  the exact block-wise OBS correction from the damped empirical Fisher of calibration gradients (``mfac.py``).
- ``recalibrate_batchnorm``: re-estimates the batch-norm statistics of the pruned model (``batchnorm.py``).
"""

from .allocation import allocate_levels, allocate_under_budget
from .batchnorm import norm_modules, recalibrate_batchnorm
from .calibration import layer_hessian
from .database import DEFAULT_GRID, ObcDatabase, build_database, prune_obc_database
from .magnitude import prune_oneshot
from .mfac import prune_mfac
from .obc import exact_obs, prune_obc
from .sparsegpt import sparsegpt
from .spdy import SpdyTimings, calibrate_to_measured, measure_speedup, measure_timings, prune_spdy, search_profile

__all__ = ["prune_oneshot", "recalibrate_batchnorm", "norm_modules", "prune_obc", "exact_obs", "sparsegpt",
           "layer_hessian", "allocate_levels", "build_database", "prune_obc_database", "ObcDatabase", "DEFAULT_GRID",
           "allocate_under_budget", "prune_spdy", "search_profile", "measure_timings", "SpdyTimings",
           "measure_speedup", "calibrate_to_measured", "prune_mfac"]
