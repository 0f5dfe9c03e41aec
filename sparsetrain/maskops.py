"""Pure mask operations: exact top-k masks (per tensor and global), N:M masks, mask statistics, sparse-init scales.

Every function here is pure: it reads tensors and returns new boolean masks, never touching a model.
Counts are exact: a tensor of n elements kept at density d keeps exactly ``keep_count(n, 1 - d)`` elements,
whatever the ties. Per tensor we choose by index from ``torch.topk``; the global ranking keeps what lies above
its threshold and chooses among the scores equal to it by count. A bare threshold comparison would keep every
element equal to it, so ties would change the count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "keep_count",
    "channel_keep_count",
    "check_channel_multiple",
    "topk_mask",
    "topk_count_mask",
    "global_topk_masks",
    "parse_nm",
    "nm_sparsity",
    "check_nm_shape",
    "nm_mask",
    "count_zeros",
    "relative_mask_difference",
    "pack_mask",
    "unpack_mask",
    "packed_mask_counts",
    "packed_relative_mask_difference",
    "check_sparsity",
    "sparse_init_scale",
]


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """Validate a sparsity value: a number in [0, 1). Returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"{what} must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{what} must be in [0, 1) (0 = dense, 0.9 = 90% zeros), got {sparsity!r}")
    return float(sparsity)


def keep_count(n: int, sparsity: float) -> int:
    """Number of elements kept when ``n`` elements are pruned to ``sparsity``: ``round((1 - s) * n)``."""
    return int(round((1.0 - sparsity) * n))


def check_channel_multiple(multiple: int) -> int:
    """Validate ``channel_multiple``: a positive integer (1: kept channel counts are not rounded). Returns it."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(
            "channel_multiple must be a positive integer (each channel set's kept count is rounded to a multiple "
            f"of it; 1: no rounding), got {multiple!r}"
        )
    return multiple


def channel_keep_count(width: int, sparsity: float, multiple: int = 1) -> int:
    """Groups a channel set of ``width`` keeps at group ``sparsity``: ``keep_count``, at least 1.

    With ``multiple`` > 1 the count is rounded to the nearest of ``multiple``, ``2 * multiple``, ... up to
    ``width``, and ``width`` itself (a tie goes to the smaller count; a count under ``multiple`` becomes
    ``multiple``); a set narrower than ``multiple`` keeps its unrounded count. Why: oneDNN's CPU convolutions
    work on blocked layouts of 16 channels on AVX-512 (8 on AVX2) and pad a partial block, so a width just above
    a multiple costs about as much as the next multiple. The count never falls as ``sparsity`` falls.
    """
    kept = max(1, keep_count(width, sparsity))
    if multiple <= 1 or width < multiple:
        return kept
    if kept <= multiple:
        return multiple
    lower = kept // multiple * multiple
    upper = min(width, lower + multiple)
    return lower if kept - lower <= upper - kept else upper


def _mask_from_indices(n: int, indices: Tensor, value: bool, device: torch.device) -> Tensor:
    mask = torch.full((n,), not value, dtype=torch.bool, device=device)
    mask[indices] = value
    return mask


def _select(flat_scores: Tensor, keep: int) -> Tensor:
    """Flat boolean mask keeping exactly ``keep`` largest scores.

    ``torch.topk`` is cheapest for small k, so when more than half is kept we select the complement
    (the ``n - keep`` smallest) instead. Either way ties are broken by index, not by value.
    """
    n = flat_scores.numel()
    if keep >= n:
        return torch.ones(n, dtype=torch.bool, device=flat_scores.device)
    if keep <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat_scores.device)
    if keep <= n - keep:
        idx = torch.topk(flat_scores, keep, largest=True, sorted=False).indices
        return _mask_from_indices(n, idx, True, flat_scores.device)
    idx = torch.topk(flat_scores, n - keep, largest=False, sorted=False).indices
    return _mask_from_indices(n, idx, False, flat_scores.device)


def topk_count_mask(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of ``scores``' shape keeping exactly ``keep`` largest scores (ties broken by index)."""
    flat = scores.detach().reshape(-1).float()
    return _select(flat, int(keep)).view(scores.shape)


def topk_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Boolean mask of ``scores``' shape keeping the ``keep_count(n, sparsity)`` largest scores."""
    flat = scores.detach().reshape(-1).float()
    return _select(flat, keep_count(flat.numel(), sparsity)).view(scores.shape)


def global_topk_masks(scores: dict[str, Tensor], sparsity: float, *, concat_below: int = 1 << 20) -> dict[str, Tensor]:
    """One ranking over all tensors: keep exactly the ``keep_count(N, sparsity)`` largest of all N scores.

    Small sets (fewer than ``concat_below`` scores) find the threshold (the keep-th largest score) with one
    ``torch.kthvalue`` over the concatenation. Large sets (a ResNet-50 has 25M weights) never materialize it: a
    sample brackets the threshold, one counting pass over the tensors confirms the bracket, and only the few
    scores inside it are ranked. Extra memory is a small fraction of the scores plus the output masks.

    Every score above the threshold is kept. Scores equal to it (ties) fill the remaining places, shared among
    the tensors in proportion to how many tied scores each holds (largest remainders, integer arithmetic), and
    spread evenly over each tensor's tied positions. So the count is exact, every rank of a distributed run
    chooses the same weights, and many equal weights (a constant init, quantised weights) never empty one layer
    while another stays dense, as a tie-break by parameter order would.
    """
    names = list(scores)
    if not names:
        return {}
    total = sum(scores[n].numel() for n in names)
    keep = keep_count(total, sparsity)
    if keep in (0, total):
        return {n: torch.full(scores[n].shape, keep > 0, dtype=torch.bool, device=scores[n].device) for n in names}
    if total < concat_below:
        flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
        threshold = float(torch.kthvalue(flat, total - keep + 1).values)  # the keep-th largest
        flats = list(flat.split([scores[n].numel() for n in names]))
        above = int((flat > threshold).sum())
        tie_counts = [int((f == threshold).sum()) for f in flats]
    else:
        flats = [scores[n].detach().reshape(-1) for n in names]
        threshold, above, tie_counts = _kth_largest(flats, keep, total)
    kept = [f > threshold for f in flats]
    for mask, flat, count, share in zip(kept, flats, tie_counts, _proportional_shares(keep - above, tie_counts)):
        if share == 0:
            continue
        ties = flat == threshold
        if share == count:
            mask |= ties
        else:
            positions = ties.nonzero().squeeze(1)
            # Evenly spaced among the layer's tied positions: a constant layer keeps some of every row.
            mask[positions[torch.arange(share, device=positions.device) * count // share]] = True
    return {n: mask.view(scores[n].shape) for n, mask in zip(names, kept)}


def _proportional_shares(total: int, counts: list[int]) -> list[int]:
    """Split ``total`` places among groups holding ``counts`` candidates, in proportion: exact, deterministic.

    Largest-remainder apportionment in integers: each group gets floor(total * count / sum); the places left go
    to the largest remainders, earlier groups first on equal remainders. No float, so every process agrees.
    """
    whole = sum(counts)
    if total == 0 or whole == 0:
        return [0] * len(counts)
    shares = [total * c // whole for c in counts]
    remainders = [total * c % whole for c in counts]
    left = total - sum(shares)
    for i in sorted(range(len(counts)), key=lambda i: (-remainders[i], i))[:left]:
        shares[i] += 1
    return shares


def _kth_largest(flats: list[Tensor], k: int, total: int) -> tuple[float, int, list[int]]:
    """The k-th largest value over the tensors, how many values are strictly larger, and how many equal it in each."""
    generator = torch.Generator().manual_seed(0)  # the result is exact whatever the sample; fixed for speed only
    sample_size = min(total, 1 << 18)
    sample = torch.cat([
        f[torch.randint(0, f.numel(), (max(1, round(sample_size * f.numel() / total)),), generator=generator,
                        device=f.device)].float()
        for f in flats
    ]).sort(descending=True).values  # fmt: skip
    m = sample.numel()
    position = k / total * m
    margin = 6 * (position * (1 - k / total)) ** 0.5 + 64
    for widen in (1, 4, 16):
        hi_index = max(0, int(position - widen * margin))
        lo_index = min(m - 1, int(position + widen * margin))
        hi = float(sample[hi_index]) if hi_index > 0 else float("inf")
        lo = float(sample[lo_index]) if lo_index < m - 1 else float("-inf")
        above = sum(int((f > hi).sum()) for f in flats)
        inside = [f[(f >= lo) & (f <= hi)].float() for f in flats]
        n_inside = sum(t.numel() for t in inside)
        if above < k <= above + n_inside:
            candidates = torch.cat(inside)
            threshold = float(torch.topk(candidates, k - above, sorted=False).values.min())
            # Every value equal to the threshold lies inside the bracket: count the ties per tensor there.
            return threshold, above + int((candidates > threshold).sum()), [int((t == threshold).sum()) for t in inside]
    raise RuntimeError("global top-k: the threshold bracket failed to converge")  # unreachable: lo=-inf, hi=inf


_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(mask_type: str) -> tuple[int, int] | None:
    """Parse ``"N:M"`` into ``(N, M)``; ``"unstructured"`` gives None. Anything else is a ValueError."""
    if mask_type == "unstructured":
        return None
    match = _NM_PATTERN.match(str(mask_type))
    if not match:
        raise ValueError(
            f"mask_type must be 'unstructured', 'N:M' such as '2:4', or 'channel' (methods that support it); "
            f"got {mask_type!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n <= m:
        raise ValueError(f"mask_type {mask_type!r}: N:M needs 0 < N <= M, got N={n}, M={m}")
    return n, m


def nm_sparsity(mask_type: str, sparsity: float | None = None) -> float | None:
    """The sparsity of a ``mask_type``: 1 - N/M for 'N:M', ``sparsity`` itself for 'unstructured'.

    An N:M mask type fixes the sparsity: a ``sparsity`` given beside it must agree, else a ValueError.
    """
    nm = parse_nm(mask_type)
    if nm is None:
        return sparsity
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(sparsity - implied) > 1e-9:
        raise ValueError(
            f"mask_type {mask_type!r} fixes the sparsity at {implied:g}; got sparsity={sparsity!r} "
            "(leave sparsity out or make them agree)"
        )
    return implied


def check_nm_shape(
    shape: Sequence[int], n: int, m: int, what: str = "weight", remedy: str = "", input_dim: int = 1
) -> None:
    """Raise ValueError unless a weight of ``shape`` can take an N:M mask: 2+ dims, input dim a multiple of M.

    ``input_dim`` is the dimension that runs over the layer's inputs: 1 for ``nn.Linear`` (out, in) and convs
    (out, in, k...), 0 for a transposed (in, out) weight such as Hugging Face's ``Conv1D``.
    ``what`` names the weight in the message, ``remedy`` says how to leave it out (default: ``exclude=``).
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"N:M masks need a weight with at least 2 dims; {what} has shape {shape}")
    if shape[input_dim] % m:
        where = "" if input_dim == 1 else f" (dim {input_dim})"
        raise ValueError(
            f"mask_type '{n}:{m}': {what} of shape {shape} has an input dimension{where} ({shape[input_dim]}) "
            f"that is not a multiple of {m}; {remedy or 'exclude this layer with exclude='}"
        )


def nm_mask(scores: Tensor, n: int, m: int, input_dim: int = 1) -> Tensor:
    """N:M mask: in every group of M consecutive weights along the input dimension keep the N largest scores.

    The input dimension is ``input_dim``: dim 1 by default (``in_features`` of a Linear, input channels of a
    conv), dim 0 for a transposed (in, out) weight such as Hugging Face's ``Conv1D``; the groups then lie along
    each output's inputs, the layout that sparse tensor cores and N:M kernels expect. Its size must be a multiple
    of M.
    """
    check_nm_shape(scores.shape, n, m, input_dim=input_dim)
    # Move the input dim last so groups of M are contiguous: (out, k..., in) -> (-1, M).
    moved = scores.detach().float().movedim(input_dim, -1).contiguous()
    groups = moved.reshape(-1, m)
    idx = torch.topk(groups, n, dim=1, largest=True, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, idx, True)
    return keep.view(moved.shape).movedim(-1, input_dim).contiguous()


def count_zeros(tensor: Tensor) -> int:
    """Number of elements equal to zero (-0.0 included; NaN is not a zero)."""
    return tensor.numel() - int(torch.count_nonzero(tensor))


def relative_mask_difference(old: dict[str, Tensor], new: dict[str, Tensor]) -> float:
    """Fraction of kept weights that changed between two masks, corrected for a change in sparsity.

    Hamming distance H counts every position that differs. If the two masks keep k_a and k_b weights,
    |k_a - k_b| of those differences are forced by the change in count; the rest come in pairs (one weight
    out, another in). The result is ``(H - |k_a - k_b|) / (2 min(k_a, k_b))``: 0 for identical supports,
    1 when every kept weight was swapped. Summed over all layers.
    """
    hamming = kept_a = kept_b = 0
    for name, a in old.items():
        b = new[name]
        hamming += int((a != b).sum())
        kept_a += int(a.sum())
        kept_b += int(b.sum())
    smaller = min(kept_a, kept_b)
    if smaller == 0:
        return 0.0
    return (hamming - abs(kept_a - kept_b)) / (2 * smaller)


def pack_mask(mask: Tensor) -> Tensor:
    """A boolean mask packed 8 positions to a byte (flat, row-major, bit i of byte j is position 8 j + i).

    A packed mask costs 1/8 byte per weight; :func:`unpack_mask` restores it given its shape.
    """
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    packed = groups[:, 0].clone()
    for bit in range(1, 8):
        packed |= groups[:, bit] << bit
    return packed


def unpack_mask(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The boolean mask of ``shape`` that :func:`pack_mask` packed into ``packed``."""
    n = 1
    for size in shape:
        n *= int(size)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (n + 7) // 8:
        raise ValueError(
            f"a packed mask of shape {tuple(shape)} is a flat uint8 tensor of {(n + 7) // 8} bytes; got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & 1).view(-1)[:n].to(torch.bool).view(tuple(shape))


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


def _popcount(packed: Tensor) -> int:
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum(dtype=torch.int64))


def packed_mask_counts(old: dict[str, Tensor], new: dict[str, Tensor]) -> tuple[int, int, int]:
    """Hamming distance and kept counts of two sets of masks packed by :func:`pack_mask`, without unpacking them.

    The Hamming distance is the popcount of the bytes' XOR, the kept counts the popcounts of each (pad bits are 0).
    Counts add up over shards: summed over ranks they are the counts of the whole masks.
    """
    hamming = kept_a = kept_b = 0
    for name, a in old.items():
        b = new[name]
        hamming += _popcount(a ^ b)
        kept_a += _popcount(a)
        kept_b += _popcount(b)
    return hamming, kept_a, kept_b


def packed_relative_mask_difference(
    old: dict[str, Tensor] | None = None, new: dict[str, Tensor] | None = None, *, counts: Sequence[int] | None = None
) -> float:
    """:func:`relative_mask_difference` of two sets of packed masks, or of their :func:`packed_mask_counts`."""
    hamming, kept_a, kept_b = counts if counts is not None else packed_mask_counts(old or {}, new or {})
    smaller = min(kept_a, kept_b)
    if smaller == 0:
        return 0.0
    return (hamming - abs(kept_a - kept_b)) / (2 * smaller)


def sparse_init_scale(mask: Tensor) -> Tensor:
    """Per-output-unit factor ``sqrt(fan_in / active_fan_in)`` that gives a masked layer its dense init's scale.

    Dim 0 is the output unit (a Linear's row, a conv's output channel); its fan-in is every other dim together
    (``in_features``, or ``in_channels / groups * kernel size``) and its active fan-in the kept entries there.
    Multiplying the kept weights of a freshly initialised layer by the factor is the sparse-aware
    initialisation of Evci et al., "Gradient Flow in Sparse Neural Networks and How Lottery Tickets Win",
    AAAI 2022 (std ``gain / sqrt(active fan-in)`` per unit). Units with no active input get 1 (nothing to scale).

    Returns float32 factors of shape ``(out, 1, ..., 1)``, ready to broadcast against the weight.
    """
    rows = mask.reshape(mask.shape[0], -1).to(torch.bool)
    active = rows.sum(dim=1).float()
    # A dense init draws each weight with variance ~ 1 / fan_in, so a unit keeping a of its fan_in inputs sees
    # its pre-activation variance shrink by a / fan_in; the product over layers is what stops sparse nets learning.
    scale = torch.where(active > 0, (rows.shape[1] / active.clamp(min=1)).sqrt(), torch.ones_like(active))
    return scale.view(-1, *([1] * (mask.dim() - 1)))
