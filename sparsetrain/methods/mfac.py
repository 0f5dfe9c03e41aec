"""Gradual M-FAC pruning: GMP's cubic schedule, ranking by M-FAC's OBS saliency, with the OBS weight update."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import register
from ..mfac import MFACInverse
from .gmp import GMP


@register("mfac")
class MFACPruning(GMP):
    """Gradual pruning on GMP's cubic schedule by the M-FAC saliency, with the OBS update at every pruning step.

    Reference: Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021 (arXiv 2107.03356); the saliency and update are Optimal Brain Surgeon's
    (Hassibi & Stork 1993) with F^-1 from M-FAC's block-wise Woodbury inverse of the empirical Fisher.

    Schedule options (``start``, ``end``, ``frequency``, ``initial_sparsity``) and their defaults are GMP's.
    At each update step, with F = damp I + (1/m) sum g g^T over the m = ``ngrads`` most recent gradients
    (block-diagonal over ``block_size`` consecutive weights of the concatenated, flattened sparsified
    parameters; None: one block), the score of weight i is w_i^2 / (2 [F^-1]_ii) and the masks are the top-k of
    it among the surviving weights (distribution as GMP's). The weights pruned at this update (set Q) then move
    the kept ones by delta = -F^-1 v, v_q = w_q / [F^-1]_qq for q in Q (0 elsewhere): one product, the
    independence approximation the M-FAC paper uses to remove several weights at once (the exact multi-weight
    OBS update would need the |Q| x |Q| block of F^-1). Pruned weights are then hard zeros.

    Gradients: no extra passes. The pre-step hook records the gradient of each of the ``ngrads`` optimizer steps
    before an update step (a ring buffer of m x d, held only inside that window and freed after the update, or
    kept when the next window is already open, i.e. ``frequency < ngrads``). The gradient recorded is the one the
    step applies, after masking: pruned weights are fixed at 0, so the quadratic model OBS minimises is over the
    surviving weights, whose Fisher is exactly the one of the masked gradients (masked coordinates decouple with
    F = damp I there, get no update and are never ranked). At use the rows are masked with the current masks again
    (a no-op unless the buffer spans an earlier update). The recorded steps are ordinary training steps, so the
    method adds no backward passes and no training FLOPs; its cost is the M-FAC setup at each update,
    O(m^2 d) time and m x d memory (the inverse is computed in float64, for the 1 / damp scale).
    An update with fewer than ``ngrads`` recorded gradients (an update at step 0, or before ``ngrads`` steps were
    taken) ranks by magnitude instead, as GMP, with no weight update.

    Defaults: ``ngrads`` 16, ``damp`` 1e-4, ``block_size`` 2048 (capped at d). The paper uses far more gradients
    (hundreds to 1024, collected in extra passes) and blocks; the small m here keeps the recording within the
    training loop's own last steps. Differences from the paper: the Fisher comes from the last training
    mini-batches' gradients, not from fresh passes at the pruning step, and damp 1e-4 is not the paper's value
    (unchecked).
    """

    reads_masked_gradients = True  # the recorded gradients must be the masked ones, in .grad itself

    shardable = False  # see Sparsifier.shardable
    needs_attach = True  # the gradients are read in the pre-step hook
    reason = "mfac {sparsity:.4f}"

    def __init__(
        self,
        model: nn.Module,
        *,
        ngrads: int = 16,
        damp: float = 1e-4,
        block_size: int | None = 2048,
        **options: Any,
    ) -> None:
        if isinstance(ngrads, bool) or not isinstance(ngrads, int) or ngrads < 1:
            raise ValueError(f"mfac: ngrads (gradients in the Fisher) must be an integer >= 1, got {ngrads!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0 or damp == float("inf"):
            raise ValueError(f"mfac: damp (lambda) must be a finite number > 0, got {damp!r}")
        bad_block = isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        if block_size is not None and bad_block:
            raise ValueError(f"mfac: block_size must be None or an integer >= 1, got {block_size!r}")
        self.ngrads, self.damp, self.block_size = ngrads, float(damp), block_size
        self.grads: list[Tensor] = []  # the ring buffer, oldest first, at most ngrads rows of d
        super().__init__(model, **options)

    # ----------------------------------------------------------------- recording
    def recording_at(self, step: int) -> bool:
        """Whether the optimizer step taken at ``step`` (count before it) is within ``ngrads`` of an update step."""
        return any(step < u <= step + self.ngrads for u in self.update_steps)

    def flat_gradient(self) -> Tensor:
        """The sparsified parameters' gradients, flattened and concatenated in parameter order (0 where none)."""
        return torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad.detach()).reshape(-1) for p in self.params.values()]
        )

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().before_step(optimizer)  # mask first: the Fisher is the one of the gradients the step applies
        if self.recording_at(self.count):
            self.grads.append(self.flat_gradient().clone())
            del self.grads[: -self.ngrads]

    # ----------------------------------------------------------------- the update
    def flat_mask(self) -> Tensor:
        return torch.cat([m.reshape(-1) for m in self.masks.values()])

    def inverse(self) -> MFACInverse:
        """M-FAC's F^-1 from the recorded gradients, masked with the current masks, in float64."""
        grads = torch.stack(self.grads).double() * self.flat_mask().to(torch.float64)
        d = grads.shape[1]
        block = None if self.block_size is None else min(self.block_size, d)
        return MFACInverse(grads, self.damp, block)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, p in self.params.items():
            out[name] = flat[offset : offset + p.numel()].reshape(p.shape).to(dtype=p.dtype, device=p.device)
            offset += p.numel()
        return out

    @torch.no_grad()
    def update_masks(self, step: int) -> None:
        sparsity = self.target_sparsity_at(step)
        reason = self.reason.format(sparsity=sparsity)
        if len(self.grads) < self.ngrads:
            self.set_masks(self.compute_masks(sparsity, self.scores("magnitude"), among_active=True), reason=reason)
        else:
            inverse = self.inverse()
            diag = inverse.diag()
            weights = torch.cat([p.detach().reshape(-1) for p in self.params.values()]).to(diag)
            saliency = weights.square() / (2 * diag)
            masks = self.compute_masks(sparsity, self.unflatten(saliency.float()), among_active=True)
            new = torch.cat([masks[n].reshape(-1) for n in self.params]).to(diag.device)
            pruned = self.flat_mask().to(diag.device) & ~new
            v = torch.where(pruned, weights / diag, torch.zeros_like(weights))
            delta = self.unflatten(-inverse.ihvp(v))
            for name, p in self.params.items():
                p.add_(torch.where(masks[name].to(p.device), delta[name], torch.zeros_like(p)))
            self.set_masks(masks, reason=reason)
        if not self.recording_at(step):
            self.grads = []  # the next window has not opened: free the m x d buffer until it does

    # ----------------------------------------------------------------- state
    def extra_state(self) -> dict:
        # The buffer is part of the state inside a recording window: a resume there must rank with the same rows.
        return {"grads": torch.stack(self.grads) if self.grads else None}

    def load_extra_state(self, state: dict) -> None:
        grads = state.get("grads")
        if grads is None:
            self.grads = []
            return
        d = sum(p.numel() for p in self.params.values())
        if grads.dim() != 2 or grads.shape[1] != d:
            raise ValueError(f"mfac state: recorded gradients of shape {tuple(grads.shape)}, expected (m, {d})")
        device = next(iter(self.params.values())).device
        self.grads = [row.to(device).clone() for row in grads[-self.ngrads :]]
