"""Optimizers that are sparse-training methods themselves.

- :class:`RDA`: generalized regularized dual averaging with an adaptively weighted l1 penalty (Siegel et al.,
  arXiv 2008.09661); sparsity is an outcome of its penalty strength.
- :class:`CrAM`: the compression-aware minimizer (Peste et al., ICLR 2023), a two-pass step around any base
  optimizer that trains a dense model robust to one-shot pruning.
- :class:`HSPG`: the half-space stochastic projected gradient of "Only Train Once" (Chen et al., NeurIPS 2021):
  group-lasso steps over zero-invariant groups, then half-space projections that zero whole groups.
- :class:`MaskedSGD`, :class:`MaskedAdamW`: ``torch.optim.SGD`` and ``AdamW`` that apply an attached sparsifier's
  masks inside their update (one pass over the weights instead of two), for large models where the separate
  gradient-masking pass shows in the step.
- :class:`MFAC`: steps along the inverse empirical Fisher of a sliding window of gradients (Frantar, Kurtic &
  Alistarh, NeurIPS 2021), a dense optimizer that any sparse method can be attached to.
"""

from .cram import CrAM
from .groups import weight_decay_groups
from .hspg import HSPG, zig_members
from .masked import MaskedAdamW, MaskedSGD
from .mfac import MFAC
from .rda import RDA, RDA_MODES, rda_a_schedule

__all__ = [
    "CrAM",
    "HSPG",
    "MaskedAdamW",
    "MaskedSGD",
    "MFAC",
    "RDA",
    "RDA_MODES",
    "rda_a_schedule",
    "weight_decay_groups",
    "zig_members",
]
