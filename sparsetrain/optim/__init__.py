"""Optimizers that are sparse-training methods themselves.

- :class:`RDA`: generalized regularized dual averaging with an adaptively weighted l1 penalty (Siegel et al.,
  arXiv 2008.09661); sparsity is an outcome of its penalty strength.
- :class:`CrAM`: the compression-aware minimizer (Peste et al., ICLR 2023), a two-pass step around any base
  optimizer that trains a dense model robust to one-shot pruning.
"""

from .cram import CrAM
from .groups import weight_decay_groups
from .rda import RDA, RDA_MODES, rda_a_schedule

__all__ = ["CrAM", "RDA", "RDA_MODES", "rda_a_schedule", "weight_decay_groups"]
