"""Fully sparse training with a variance-reduced policy gradient (Zhou et al., NeurIPS 2021, arXiv 2111.05685)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import maskops
from ..core import Capability, Sparsifier, register
from ..core.sparsifier import _zero_where_masked
from ..optim_state import per_element_buffers
from ..schedules import half_cosine

__all__ = ["VRPG", "VRPGOptimizer", "budget_shift", "project_scores", "vrpg_gradient"]

# Where two sampled masks differ, 0 < s < 1 holds by construction (u < s never differs for s in {0, 1}); the floor
# only keeps a score rounded to within 1e-30 of 0 or 1 from dividing by zero.
_TINY = 1e-30


def budget_shift(scores: Sequence[Tensor], budget: float, tol: float = 1e-9, start: float | None = None) -> float:
    """The shift v >= 0 of the projection onto {0 <= s <= 1, sum(s) <= budget}: s -> clamp(s - v, 0, 1).

    The Euclidean projection of s onto that set is clamp(s - v, 0, 1) with v = 0 when the clamped scores already
    fit the budget, else the v > 0 with sum(clamp(s - v, 0, 1)) = budget (KKT: one multiplier for the budget, the
    box handled by the clamp). The sum decreases in v, so v is found by bisection on [0, max(s)] (the paper's
    method), in float64, to ``tol``; the returned v is the upper end of the last bracket, so the projected scores
    never exceed the budget. Pure: ``scores`` (any number of tensors, one budget over all) are not modified.

    The answer is that bisection's, bit for bit, but most of its ~30 passes over all scores are skipped: a
    safeguarded Newton iteration on the piecewise-linear sum (over the scores above 0 only: the others never
    count) finds the root first, from ``start`` when given (the previous step's shift: it moves little), and two
    evaluations just around it decide every bisection midpoint outside them. The computed float64 sum is monotone
    in v (rounding is), so a midpoint below a point whose sum exceeds the budget exceeds it too, and one above a
    point that fits fits too; only a midpoint between the two is evaluated. ``start`` changes the cost, never the
    answer.
    """
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    if not any(s.numel() for s in scores):
        return 0.0
    wide = [s.detach().double() for s in scores]  # converted once; each sum below is the same reduction as before

    def total(v: float) -> float:
        return sum(float((d - v).clamp_(0, 1).sum()) for d in wide)

    if total(0.0) <= budget:
        return 0.0
    hi = max(float(s.max()) for s in scores if s.numel())
    known_over, known_fits = 0.0, hi  # the sum exceeds the budget at known_over and fits it at known_fits

    def over(v: float) -> bool:
        nonlocal known_over, known_fits
        if v <= known_over:
            return True
        if v >= known_fits:
            return False
        if total(v) > budget:
            known_over = v
            return True
        known_fits = v
        return False

    root = _newton_root(scores, budget, hi, start)
    if root is not None:
        delta = max(tol * 1e-3, abs(root) * 1e-12)
        over(root - delta)
        over(root + delta)
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if over(mid):
            lo = mid
        else:
            hi = mid
    return hi


def _newton_root(scores: Sequence[Tensor], budget: float, hi: float, start: float | None) -> float | None:
    """An estimate of the v in (0, hi) with sum(clamp(s - v, 0, 1)) = budget, or None (a hint only: see above).

    Newton's method on the piecewise-linear sum (slope: minus the count of scores with 0 < s - v < 1), kept inside
    a bracket, bisecting when a step would leave it; scores <= 0 never count for v >= 0 and are dropped first.
    """
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    active = flat[flat > 0].double()
    lo, v = 0.0, 0.0 if start is None or not 0 < start < hi else float(start)
    for _ in range(64):
        x = active - v
        value = float(x.clamp(0, 1).sum()) - budget
        slope = int(((x > 0) & (x < 1)).sum())
        if value == 0:
            return v
        if value > 0:
            lo = v
        else:
            hi = v
        step = v + value / slope if slope else (lo + hi) / 2
        if not lo < step < hi:
            step = (lo + hi) / 2
        if abs(step - v) <= 1e-15 * max(1.0, abs(v)) or hi - lo <= 1e-15:
            return step
        v = step
    return None


def project_scores(
    scores: Sequence[Tensor], budget: float, tol: float = 1e-9, start: float | None = None
) -> list[Tensor]:
    """The projection of ``scores`` onto {0 <= s <= 1, sum(s) <= budget} (new tensors; see :func:`budget_shift`,
    ``start`` a hint for the shift that changes only the cost)."""
    v = budget_shift(scores, budget, tol, start)
    return [(s - v).clamp(0, 1) for s in scores]


def vrpg_gradient(loss1: float, loss2: float, mask1: Tensor, mask2: Tensor, scores: Tensor) -> Tensor:
    """The variance-reduced policy-gradient estimate of d E_m[L(w * m)] / d s from two independent masks.

    With K = 2 samples m1, m2 ~ Bernoulli(s) and the leave-one-out baseline (each sample's loss compared with the
    other's), (1 / (K - 1)) sum_k (L_k - mean L) grad_s log p(m_k | s) becomes
    (L1 - L2) / 2 * (grad log p(m1) - grad log p(m2)), and with grad_s log p(m | s) = (m - s) / (s (1 - s)),
    ``(L1 - L2) / 2 * (m1 - m2) / (s (1 - s))``: unbiased (E[grad log p] = 0 and the masks are independent), and
    zero wherever the two masks agree, so it needs the two losses and nothing from a backward pass.
    """
    diff = mask1.to(scores.dtype) - mask2.to(scores.dtype)
    return (float(loss1) - float(loss2)) / 2 * diff / (scores * (1 - scores)).clamp_min(_TINY)


@register("vrpg")
class VRPG(Sparsifier):
    """Fully sparse training: Bernoulli masks m ~ s learned by a two-pass variance-reduced policy gradient.

    Every sparsified weight w_i has a keep probability s_i in [0, 1] under one global budget sum(s) <= k,
    k = round((1 - sparsity) * n); training minimises E_{m ~ Bernoulli(s)} L(w * m) over w and s. Each step
    (:class:`VRPGOptimizer`, which ``wrap_optimizer`` puts around the run's optimizer) draws two independent masks
    m1, m2 from the generator of (seed, step) and evaluates the batch twice through the closure, at w * m1 and at
    w * m2. The weights take the average of the two passes' gradients, each multiplied by its mask (the sparse
    chain rule: a weight left out of a pass gets nothing from it, and the pass needs only the sparse weight). The
    scores take a projected step s <- P(s - ``score_lr`` * d) with the estimate g of :func:`vrpg_gradient`
    ((L1 - L2) / 2 * (m1 - m2) / (s (1 - s)): the two losses, no backward pass; d is g scaled by Adam's moments,
    or g itself with ``score_optimizer='sgd'``), where P is the projection onto
    {0 <= s <= 1, sum(s) <= k} by a scalar shift found by bisection (:func:`budget_shift`).

    Between steps the model holds w * top-k(s): ``masks`` are the exact global top-k of the scores, so evaluation,
    checkpoints and exports always see a model at exactly the target sparsity with hard zeros. The other weights
    (and their per-element optimizer buffers) are kept by the sparsifier and put back for the next step, so each
    step trains the latent weights as the paper does. From ``end`` (a fraction of the run by default: 0.8) the
    mask is fixed to the top-k of s, the kept latent weights are dropped and training continues with one pass per
    step on that mask (the released code's fine-tuning stage), so the run ends at exactly the target sparsity.

    Options: ``score_lr`` (step size of the scores, default 0.1), ``score_optimizer`` ('adam', default: the estimate
    scaled by Adam's moments, betas 0.9 and 0.999, the optimizer of the released code's configuration; 'sgd': the
    plain projected step above), ``score_schedule`` ('constant', default; 'cosine': ``score_lr`` decayed by the
    cosine to 0 at ``end``, as the released code decays it), ``score_init`` (initial keep probability before the
    first projection; None: 1 - sparsity, which the budget admits as it is), ``end``, ``rescale_init`` (default on:
    the initial weights are multiplied by 1 / sqrt(1 - sparsity), so a pass that keeps about that fraction starts at
    the dense init's signal scale), ``granularity`` ('weight', default: one score and one Bernoulli draw per weight,
    unstructured; 'channel': one per output unit or filter, the first dimension of each sparsified weight, as the
    released code learns them: the budget is counted in channels, k = round((1 - sparsity) * number of channels),
    and a channel's mask covers its whole row or filter, so ``sparsity`` is the fraction of channels removed,
    structured, and the masks' weight-level sparsity follows from which layers lose them; only the rows are masked,
    as there: biases and the next layer's weights that read a removed unit stay (``mask_type='channel'`` of other
    methods prunes whole zero-invariant groups); the released code keeps the classifier out of the budget,
    ``exclude`` does that here). ``distribution`` is 'global' only (the paper's one budget).

    What is sparse: each pass runs on w * m (an expected k of n weights), its weight gradient is used only at m,
    and the score update reads two loss values; on dense kernels (the default path) the products are still dense
    matrix products with zeros in them. The sampled masks change at every step, so the per-layer CSR kernels of
    :mod:`sparsetrain.sparse_training` can only serve the fixed-mask stage after ``end``. Until then
    ``needs_dense_gradients()`` is true (the step trains weights outside ``masks``): gradient clipping,
    communication hooks and the CSR kernels leave the gradient whole, and the trainer charges the dense weight
    gradient in its training FLOPs.

    Needs ``optimizer.step(closure)`` (the closure zeroes the gradients, computes the loss, calls backward and
    returns it; it runs twice per step). Batch-norm statistics see both passes. Data-parallel ranks draw the same
    masks and average the two losses over the ranks (one all-reduce of two numbers per step), so they keep the same
    scores. Memory: the scores (4 bytes per sparsified weight, or per channel; 12 with Adam's moments), the latent
    weights outside the top-k and their optimizer buffers (dense tensors) until ``end``.

    Reference: X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network Training via Forward and
    Backward Propagation Sparsification", NeurIPS 2021, arXiv 2111.05685. Differences from the paper's released code
    (which learns channel masks only): masks are per weight (unstructured) by default (``granularity='channel'`` is
    the released code's); its estimator divides m - s by sqrt(s (1 - s)), here by s (1 - s), the exact gradient of
    log p(m | s) under Bernoulli(s), which keeps the estimate unbiased; it clips the gradient norm of weights and
    scores together at 3, here nothing is clipped unless the run clips the weights; it fixes the mask by sampling
    from s (the best of 10 samples on training batches) after all its sampled epochs and then fine-tunes 40 more
    epochs at lr 0.001, here the top-k of s is fixed at ``end``, inside the run's epochs; evaluation during training
    uses the top-k of s (the released code samples a mask); the weight gradient averages the two passes, as there;
    the initial rescaling is ours. ``score_init`` None (1 - sparsity) is the released configuration's (its initial
    score equals its keep rate). ``score_lr`` 0.1 (constant) was chosen on the validation split of 5-epoch
    LeNet-300-100 runs at 90% (0.01, 0.05, 0.1, 0.2 gave 72.4, 84.5, 85.0, 85.3: 0.2 within noise; 'cosine' gave
    85.43 against 85.29 over 3 seeds, within noise, so the default stays 'constant'); with ``granularity='channel'``
    (classifier excluded) the same validation chose ``score_lr`` 0.2 with ``score_schedule='cosine'`` (86.28; 0.05:
    85.12, 0.1: 85.89, 0.5: 86.08, 1.0: 86.36, within noise of 0.2; constant 0.1 / 0.2: 85.74 / 86.04).
    """

    capabilities = (
        Capability.SPARSE
        | Capability.MASK_UPDATES
        | Capability.OWN_OPTIMIZER
        | Capability.CLOSURE
        | Capability.DENSE_GRADIENTS
    )
    needs_attach = True  # each pass's gradient is masked by that pass's mask in the pre-step hook's closure
    shardable = False  # one global projection and top-k over full tensors

    def __init__(
        self,
        model: nn.Module,
        *,
        score_lr: float = 0.1,
        score_optimizer: str = "adam",
        score_init: float | None = None,
        end: float | None = None,
        rescale_init: bool = True,
        granularity: str = "weight",
        score_schedule: str = "constant",
        **common: Any,
    ) -> None:
        distribution = common.get("distribution")
        if distribution not in (None, "global"):
            raise ValueError(
                f"vrpg learns its masks under one global budget sum(s) <= k; distribution={distribution!r} is not "
                "supported (leave it out or use 'global')"
            )
        for name, value, allowed in (("score_lr", score_lr, "a finite number >= 0"),
                                     ("score_init", score_init, "None or a number in (0, 1]")):  # fmt: skip
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if value is None and name == "score_init":
                continue
            ok = number and (value >= 0 if name == "score_lr" else 0 < value <= 1)
            if not ok:
                raise ValueError(f"vrpg: {name} must be {allowed}, got {value!r}")
        if score_optimizer not in ("adam", "sgd"):
            raise ValueError(f"vrpg: score_optimizer must be 'adam' or 'sgd', got {score_optimizer!r}")
        if granularity not in ("weight", "channel"):
            raise ValueError(f"vrpg: granularity must be 'weight' or 'channel', got {granularity!r}")
        self.granularity = granularity
        if score_schedule not in ("constant", "cosine"):
            raise ValueError(f"vrpg: score_schedule must be 'constant' or 'cosine', got {score_schedule!r}")
        self.score_schedule = score_schedule
        self.score_lr, self.score_init, self.end = float(score_lr), score_init, end
        self.score_optimizer = score_optimizer
        self.score_steps = 0
        self.score_moments: dict[str, tuple[Tensor, Tensor]] = {}
        self.rescale_init = rescale_init
        self._pass_mask: dict[str, Tensor] | None = None
        self._shift: float | None = None  # the last positive projection shift (a search hint)
        super().__init__(model, **common)

    # ------------------------------------------------------------------ schedule
    def setup(self) -> None:
        self.require_total_steps()
        self.end_step = self.steps(self.end, "end", default_fraction=0.8)
        if not 0 <= self.end_step <= self.total_steps:
            raise ValueError(
                f"vrpg needs 0 <= end <= total; got end={self.end!r} ({self.end_step} of {self.total_steps} steps, "
                f"unit={self.unit!r})"
            )
        n = sum(math.prod(self.score_shape(name)) for name in self.params)
        self.budget = maskops.keep_count(n, self.final_sparsity)
        init = 1.0 - self.final_sparsity if self.score_init is None else float(self.score_init)
        start = [torch.full(self.score_shape(name), init, dtype=torch.float32, device=p.device)
                 for name, p in self.params.items()]  # fmt: skip
        self.s = dict(zip(self.params, project_scores(start, self.budget)))
        self.hidden: dict[str, Tensor] | None = {n: torch.zeros_like(p.detach()) for n, p in self.params.items()}
        self.hidden_state: dict[str, dict[str, Tensor]] = {}

    def score_shape(self, name: str) -> tuple[int, ...]:
        """The shape of parameter ``name``'s scores: the weight's ('weight'), or one per output unit or filter
        ('channel': the first dimension, the others 1, so the scores broadcast over the weight)."""
        shape = tuple(self.params[name].shape)
        return shape if self.granularity == "weight" else shape[:1] + (1,) * (len(shape) - 1)

    def weight_masks(self, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Score-shaped masks as weight-shaped ones (a channel's mask over all its weights; 'weight': unchanged)."""
        if self.granularity == "weight":
            return masks
        return {n: m.expand(self.params[n].shape).contiguous() for n, m in masks.items()}

    def score_lr_at(self, step: int) -> float:
        """The scores' step size at step ``step``: ``score_lr`` ('constant'), or ``score_lr`` times
        (1 + cos(pi * step / end)) / 2 ('cosine': from ``score_lr`` at step 0 towards 0 at ``end``, where the
        mask is fixed; the released code decays its score learning rate by the cosine over its sampled epochs)."""
        if self.score_schedule == "constant" or self.end_step == 0:
            return self.score_lr
        return self.score_lr * half_cosine(min(step, self.end_step), self.end_step)

    def sampling_at(self, step: int) -> bool:
        """Whether step ``step`` samples masks and learns the scores (before ``end``); after it the mask is fixed."""
        return step < self.end_step and self.final_sparsity > 0

    def phase_at(self, step: int) -> str:
        if self.final_sparsity == 0:
            return "dense"
        return "sampled" if self.sampling_at(step) else "sparse"

    def on_step(self, step: int) -> None:
        if step == 0:
            if self.rescale_init and not self.init_rescaled and self.final_sparsity > 0:
                self._rescale_latent()
            self.stash_latent(None)  # the initial weights outside the first top-k are kept, not dropped
        if not self.sampling_at(step) and self.hidden is not None:
            self.hidden, self.hidden_state = None, {}  # the mask is fixed from here: the latent weights go
            self.emit({"event": "mask_fixed", "reason": "vrpg end: top-k of s fixed"})

    # ------------------------------------------------------------------ masks
    def top_k(self) -> dict[str, Tensor]:
        """The exact global top-k of the scores (k = the budget; ties shared as ``maskops.global_topk_masks``).

        The same masks as ``maskops.global_topk_masks``, found faster in the usual case. Once the scores polarise,
        most are exactly 0 and the k-th largest is positive: it is the k-th largest of the positive scores alone
        (about k of them), a selection over a tenth of the scores. Every score above it is kept and the scores
        equal to it fill the places left, shared among the tensors and spread over each one's tied positions
        exactly as the general routine shares them. With fewer than k positive scores the general routine decides.
        """
        names = list(self.s)
        flats = [self.s[n].reshape(-1) for n in names]
        flat = torch.cat(flats)
        keep = maskops.keep_count(flat.numel(), self.final_sparsity)
        positive = flat[flat > 0] if 0 < keep < flat.numel() else flat[:0]
        if positive.numel() < keep or keep == 0:
            return maskops.global_topk_masks(self.s, self.final_sparsity)
        threshold = float(torch.kthvalue(positive, positive.numel() - keep + 1).values)
        kept = [f >= threshold for f in flats]
        if sum(int(m.sum()) for m in kept) != keep:  # scores tied with the k-th: share the places left
            ties = [f == threshold for f in flats]
            kept = [m ^ t for m, t in zip(kept, ties)]  # strictly above
            counts = [int(t.sum()) for t in ties]
            left = keep - sum(int(m.sum()) for m in kept)
            for mask, tie, count, share in zip(kept, ties, counts, maskops._proportional_shares(left, counts)):
                if share == count:
                    mask |= tie
                elif share:
                    positions = tie.nonzero().squeeze(1)
                    mask[positions[torch.arange(share, device=positions.device) * count // share]] = True
        return {n: m.view(self.s[n].shape) for n, m in zip(names, kept)}

    def sample(self, step: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The two independent masks m ~ Bernoulli(s) of step ``step``, from the generator of (seed, step)."""
        generator = self.generator(step)
        draws = [{n: torch.rand(s.shape, generator=generator).to(s.device) < s for n, s in self.s.items()}
                 for _ in range(2)]  # fmt: skip
        return draws[0], draws[1]

    def latent_weights(self) -> dict[str, Tensor]:
        """The latent weights w: the model's (top-k) weights with the kept ones outside the top-k put back."""
        out = {}
        for name, p in self.params.items():
            w = p.detach()
            out[name] = w.clone() if self.hidden is None else torch.where(self.masks[name], w, self.hidden[name])
        return out

    @torch.no_grad()
    def _install(self, masks: dict[str, Tensor], reason: str) -> None:
        """New top-k masks without an event per step: zero outside them (weights and optimizer buffers)."""
        changed = any(not torch.equal(masks[n], self.masks[n]) for n in masks)
        self.masks.update({n: m.to(self.params[n].device).contiguous() for n, m in masks.items()})
        self._refresh_enforced_masks()
        self._apply_masks()
        if self._optimizer is not None:
            self._zero_state_where_masked(self._optimizer)
        if changed:
            self.mask_version += 1
        if self.count == 0:
            self.emit({"event": "mask_update", "reason": reason, "sparsity": round(self.sparsity_of_masks(), 6)})

    @torch.no_grad()
    def _rescale_latent(self) -> None:
        """Multiply every initial weight by 1 / sqrt(1 - sparsity): a pass keeps each weight with probability s,
        1 - sparsity on average, and without this a unit's pre-activation shrinks by its square root layer after
        layer, so a deep net starts at chance (the reason for ``rescale_init`` of the methods that mask at step 0)."""
        factor = 1.0 / math.sqrt(1.0 - self.final_sparsity)
        for p in self.params.values():
            p.mul_(factor)
        self.init_rescaled = True
        self.emit({"event": "init_rescale"})

    @torch.no_grad()
    def restore_latent(self, optimizer: torch.optim.Optimizer) -> None:
        """Put the kept weights outside the top-k, and their optimizer buffers, back (the start of a step)."""
        if self.hidden is None:
            return
        for name, p in self.params.items():
            outside = ~self.masks[name]
            p.copy_(torch.where(outside, self.hidden[name], p))
            buffers = per_element_buffers(optimizer, p)
            for key, kept in self.hidden_state.get(name, {}).items():
                if key in buffers:
                    buffers[key].copy_(torch.where(outside, kept, buffers[key]))

    @torch.no_grad()
    def stash_latent(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Keep the weights outside the new top-k and their buffers, then zero them in the model (end of a step)."""
        masks = self.weight_masks(self.top_k())
        self.hidden_state = {}
        kept, outsides = [], []
        for name, p in self.params.items():
            outside = ~masks[name]
            self.hidden[name] = p.detach().clone()
            buffers = {} if optimizer is None else per_element_buffers(optimizer, p)
            self.hidden_state[name] = {k: b.clone() for k, b in buffers.items()}
            kept += [self.hidden[name], *self.hidden_state[name].values()]
            outsides += [outside] * (1 + len(buffers))
        # torch.where(outside, value, 0) bit for bit (+0.0 inside), by the integer-bit multiply: 4-5x cheaper.
        _zero_where_masked(kept, outsides, self._workspace)
        self._install(masks, reason="vrpg top-k of s")

    @torch.no_grad()
    def update_scores(self, loss1: float, loss2: float, mask1: dict[str, Tensor], mask2: dict[str, Tensor]) -> None:
        """One projected step of the scores with the variance-reduced estimate of the two passes.

        'sgd': s - lr * g. 'adam': s - lr * m_hat / (sqrt(v_hat) + 1e-8) with Adam's moments of g
        (betas 0.9, 0.999; bias-corrected), as the released code steps its scores; lr is ``score_lr_at(count)``.
        Then the projection.
        """
        self.score_steps += 1
        lr = self.score_lr_at(self.count)
        stepped = []
        for name, s in self.s.items():
            g = vrpg_gradient(loss1, loss2, mask1[name], mask2[name], s)
            if self.score_optimizer == "adam":
                m, v = self.score_moments.setdefault(name, (torch.zeros_like(s), torch.zeros_like(s)))
                m.mul_(0.9).add_(g, alpha=0.1)
                v.mul_(0.999).addcmul_(g, g, value=0.001)
                # m_hat / (sqrt(v_hat) + 1e-8), the same operations in place on the temporaries
                g = (m / (1 - 0.9**self.score_steps)).div_((v / (1 - 0.999**self.score_steps)).sqrt_().add_(1e-8))
            stepped.append(s - g.mul_(lr))
        # The previous step's shift starts the search: a hint for the cost only (the answer is the same from
        # anywhere), so it is not part of the saved state and a resumed run stays bit-identical.
        shift = budget_shift(stepped, self.budget, start=self._shift)
        if shift > 0:
            self._shift = shift
        self.s = dict(zip(self.s, [(t - shift).clamp(0, 1) for t in stepped]))

    # ------------------------------------------------------------------ the step
    def needs_dense_gradients(self) -> bool:
        # A sampled step trains weights outside the top-k masks (those its sampled masks keep): gradient clipping,
        # communication hooks and the CSR kernels must not cut the gradient down to the top-k.
        return self.sampling_at(self.count)

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._pass_mask is None:
            super().before_step(optimizer)
            return
        # The sparse chain rule: the gradient of L(w * m) with respect to w is m times that of the product
        # (+0.0 outside m, as masked_fill would give, by the integer-bit multiply).
        names = [n for n, p in self.params.items() if p.grad is not None]
        _zero_where_masked([self.params[n].grad for n in names], [self._pass_mask[n] for n in names], self._workspace)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> VRPGOptimizer:
        return optimizer if isinstance(optimizer, VRPGOptimizer) else VRPGOptimizer(optimizer, self)

    def attach(self, optimizer: torch.optim.Optimizer) -> VRPG:
        """Attach to the :class:`VRPGOptimizer` from :meth:`wrap_optimizer`; any other optimizer is refused."""
        if not isinstance(optimizer, VRPGOptimizer) or optimizer.sparsifier is not self:
            raise ValueError(
                f"vrpg steps through its own two-pass VRPGOptimizer, got {type(optimizer).__name__}: use "
                "optimizer = sparsifier.wrap_optimizer(optimizer), then sparsifier.attach(optimizer)"
            )
        super().attach(optimizer)
        return self

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {
            "s": {n: s.clone() for n, s in self.s.items()},
            "hidden": None if self.hidden is None else {n: h.clone() for n, h in self.hidden.items()},
            "hidden_state": {n: {k: t.clone() for k, t in b.items()} for n, b in self.hidden_state.items()},
            "score_steps": self.score_steps,
            "score_moments": {n: (m.clone(), v.clone()) for n, (m, v) in self.score_moments.items()},
        }

    def load_extra_state(self, state: dict) -> None:
        scores = state.get("s")
        if not isinstance(scores, dict) or set(scores) != set(self.params):
            raise ValueError(f"vrpg state: scores for {sorted(scores or {})}, expected {sorted(self.params)}")
        for name, value in scores.items():
            if tuple(value.shape) != self.score_shape(name):
                raise ValueError(
                    f"vrpg state: scores of {name!r} have shape {tuple(value.shape)}, expected "
                    f"{self.score_shape(name)} (granularity={self.granularity!r})"
                )
        device = {n: p.device for n, p in self.params.items()}
        self.s = {n: t.to(device[n], torch.float32).clone() for n, t in scores.items()}
        hidden = state.get("hidden")
        self.hidden = None if hidden is None else {n: hidden[n].to(device[n]).clone() for n in self.params}
        self.hidden_state = {n: {k: t.to(device[n]).clone() for k, t in b.items()}
                             for n, b in state.get("hidden_state", {}).items()}  # fmt: skip
        self.score_steps = int(state.get("score_steps", 0))
        self.score_moments = {n: (m.to(device[n]).clone(), v.to(device[n]).clone())
                              for n, (m, v) in state.get("score_moments", {}).items()}  # fmt: skip


class VRPGOptimizer(torch.optim.Optimizer):
    """The two-pass step of :class:`VRPG` around a constructed torch optimizer (``base_optimizer``).

    ``step(closure)`` while the sparsifier samples: put the latent weights back, evaluate ``closure`` at w * m1
    and at w * m2 (each pass's gradient masked by its mask), restore w, give every parameter the average of the
    two passes' gradients, step the scores, step ``base_optimizer``, then keep the weights outside the new top-k
    and zero them in the model. After ``end``: one pass and a plain step. Returns the first pass's loss.
    ``param_groups`` and ``state`` are the base optimizer's own objects (learning-rate schedules and the
    sparsifier's hooks act on the optimizer that steps).
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, sparsifier: VRPG) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            kind = type(base_optimizer).__name__
            raise TypeError(f"vrpg: base_optimizer must be a constructed torch.optim.Optimizer, got {kind}")
        params = [p for group in base_optimizer.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.base_optimizer = base_optimizer
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self.sparsifier = sparsifier

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None or not callable(closure):
            raise TypeError(
                "vrpg steps with a closure: optimizer.step(closure), where closure() zeroes the gradients, computes "
                "the loss on the batch, calls loss.backward() and returns the loss (it is evaluated twice)"
            )
        sp = self.sparsifier
        if not sp.sampling_at(sp.count):
            with torch.enable_grad():
                loss = closure()
            self.base_optimizer.step()
            return loss
        params = [p for group in self.param_groups for p in group["params"]]
        sp.restore_latent(self.base_optimizer)
        with torch.no_grad():
            latent = {n: p.detach().clone() for n, p in sp.params.items()}
        drawn = sp.sample(sp.count)  # score-shaped: the estimator's
        masks = [sp.weight_masks(m) for m in drawn]  # weight-shaped: the passes'
        losses: list[Tensor] = []
        grads: dict[int, Tensor] = {}
        try:
            for mask in masks:
                with torch.no_grad():
                    # w * m as torch.where(m, w, 0) gives it (+0.0 outside m), by the integer-bit multiply.
                    for name, p in sp.params.items():
                        p.copy_(latent[name])
                    _zero_where_masked([p.data for p in sp.params.values()], [mask[n] for n in sp.params],
                                       sp._workspace)  # fmt: skip
                for p in params:
                    p.grad = None
                sp._pass_mask = mask
                with torch.enable_grad():
                    losses.append(closure())
                for p in params:
                    if p.grad is not None:
                        g = p.grad.detach() / len(masks)
                        grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g
        finally:
            sp._pass_mask = None
            with torch.no_grad():
                for name, p in sp.params.items():
                    p.copy_(latent[name])
        for p in params:
            p.grad = grads.get(id(p))
        pair = torch.stack([losses[0].detach().double().cpu(), losses[1].detach().double().cpu()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Data-parallel ranks draw the same masks but see their own batches: the score step takes the losses
            # of the global batch (their mean), so every rank keeps the same scores and masks.
            pair = pair.to(latent[next(iter(latent))].device)
            dist.all_reduce(pair)
            pair = pair.cpu() / dist.get_world_size()
        sp.update_scores(float(pair[0]), float(pair[1]), *drawn)
        self.base_optimizer.step()
        sp.stash_latent(self.base_optimizer)
        return losses[0]

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (this wrapper keeps none of its own: the scores are the sparsifier's)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # Torch optimizers rebuild their groups and state on load: share the new objects again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)  # the sparsifier's: what it knew about the zeros of the optimizer state no longer holds
