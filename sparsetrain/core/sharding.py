"""Masks on FSDP2-sharded parameters: each rank holds the rows of a weight that its shard holds, never the rest.

``torch.distributed.fsdp.fully_shard`` turns every parameter into a DTensor sharded on dim 0 over a 1-D device
mesh: rank r holds rows ``[r c, (r + 1) c)`` with ``c = ceil(rows / world)`` (``torch.chunk``'s split), as
``param.to_local()``. A mask is kept for that local tensor only. Rows stay whole on one rank, so N:M groups
(along dim 1) and per-output-unit scales are local; what spans ranks is a count: the k largest scores of a layer
or of all layers. :func:`sharded_topk_masks` finds them exactly with a radix select on the scores' bits whose
only communication is four all-reduced 256-bucket histograms per ranked group and one all-gather of tie counts
(a few KB), never the weights, and chooses among tied scores exactly as the single-process
:func:`~sparsetrain.maskops.global_topk_masks` does, so every rank agrees and the gathered masks equal the
unsharded ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..maskops import _proportional_shares

try:  # DTensor exists in every torch build with distributed support
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch without distributed
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = ["local", "is_sharded", "check_sharding", "local_rows", "assemble_rows", "sharded_topk_masks",
           "all_reduce_sum", "UnsplittableState"]  # fmt: skip


class UnsplittableState(ValueError):
    """A method's state that is kept per rank and cannot be split by rows: load it on as many ranks as saved it."""


def is_sharded(tensor: Tensor | None) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor`` (a DTensor's local shard, which in-place writes reach), else ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_sharding(params: dict[str, Tensor]) -> dist.ProcessGroup | None:
    """The process group the parameters are sharded over, or None when none is a DTensor.

    Refuses what the masks cannot follow: a mix of sharded and plain parameters, meshes of more than one
    dimension (HSDP) or several meshes, and placements other than ``Shard(0)``.
    """
    sharded = {n: p for n, p in params.items() if is_sharded(p)}
    if not sharded:
        return None
    plain = [n for n in params if n not in sharded]
    if plain:
        raise ValueError(
            f"some sparsified parameters are FSDP-sharded DTensors and some are not ({', '.join(plain[:3])}): shard "
            "the whole model with fully_shard before creating the sparsifier"
        )
    first = next(iter(sharded.values())).device_mesh  # fully_shard makes one mesh object per call: compare by value
    for name, param in sharded.items():
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {name!r} is placed as {tuple(param.placements)} on a {param.device_mesh.ndim}-D mesh; "
                "sparsetrain supports FSDP2's Shard(0) on a 1-D mesh"
            )
    if any(p.device_mesh != first for p in sharded.values()):
        raise ValueError("the sparsified parameters are sharded over different device meshes; use one mesh")
    return first.get_group()


def local_rows(param: Tensor) -> slice:
    """The rows (dim 0) of the full ``param`` that this rank's shard holds (``torch.chunk``'s split)."""
    if not is_sharded(param):
        return slice(0, param.shape[0] if param.dim() else 1)
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = param.shape[0]
    chunk = -(-rows // world)
    start, end = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    if end - start != param.to_local().shape[0]:
        raise RuntimeError(
            f"rank {rank} holds {param.to_local().shape[0]} rows of a {rows}-row parameter; expected rows "
            f"{start}-{end} (torch.chunk's split over {world} ranks)"
        )
    return slice(start, end)


def _spans(intervals: Sequence[tuple[int, int]]) -> str:
    """Row intervals merged and written as ``0-14, 20-28`` (``none`` when empty)."""
    merged: list[list[int]] = []
    for start, stop in sorted(i for i in intervals if i[1] > i[0]):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return ", ".join(f"{a}-{b}" for a, b in merged) or "none"


def assemble_rows(pieces: Sequence[tuple[int, Tensor]], rows: slice, total: int, what: str) -> Tensor:
    """Rows ``rows`` of a ``total``-row tensor saved in pieces of consecutive rows, each ``(first row, tensor)``.

    How a rank takes its rows of a tensor that another split of the rows saved (a sharded run resumed on another
    number of ranks): only the overlapping rows of each piece are copied, never the whole tensor. Pieces may
    overlap (the same rows saved twice are taken from one of them). ``what`` names the tensor in the error raised
    when the pieces leave some of ``rows`` uncovered.
    """
    parts, at = [], rows.start
    for start, tensor in sorted(pieces, key=lambda piece: piece[0]):
        stop = start + tensor.shape[0]
        if at >= rows.stop or start > at:
            break
        if stop > at:
            parts.append(tensor[at - start : min(stop, rows.stop) - start])
            at = min(stop, rows.stop)
    if at < rows.stop:
        covered = _spans([(start, start + tensor.shape[0]) for start, tensor in pieces])
        raise ValueError(
            f"the saved pieces of {what} hold rows {covered} of its {total}; this rank needs rows "
            f"{rows.start}-{rows.stop}: load the states of every rank that saved it"
        )
    if not parts:  # a rank holding no rows of this tensor (more ranks than rows)
        first = pieces[0][1]
        return first.new_empty((0, *first.shape[1:]))
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_reduce_sum(values: Sequence[float], group: dist.ProcessGroup | None, dtype=torch.int64) -> list:
    """``values`` summed over the ranks of ``group`` (unchanged in a single process)."""
    tensor = torch.tensor(list(values), dtype=dtype)
    if _world(group)[0] > 1:
        dist.all_reduce(tensor, group=group)
    return tensor.tolist()


def _keys(scores: Tensor) -> Tensor:
    """int64 keys in [0, 2^32) ordered exactly as the float32 scores (radix order of IEEE bits)."""
    bits = scores.detach().reshape(-1).float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


@torch.no_grad()
def sharded_topk_masks(
    scores: dict[str, Tensor],
    groups: Sequence[Sequence[str]],
    keeps: Sequence[int],
    process_group: dist.ProcessGroup | None = None,
) -> dict[str, Tensor]:
    """Boolean masks keeping exactly ``keeps[g]`` largest scores of each group of names, over all ranks' shards.

    ``scores`` are this rank's local scores. A group is ranked as one (the global distribution: one group of every
    layer; per-layer distributions: a group per layer). The k-th largest score of a group is found by a radix
    select over the scores' 32 bits, 8 at a time: each pass all-reduces a 256-bucket histogram of the candidates
    (4 x 256 x 8 bytes per group in all). Every score above it is kept; tied scores fill the rest as
    in :func:`~sparsetrain.maskops.global_topk_masks`: shared among the group's layers in proportion to their tie
    counts, evenly spaced over each layer's tied positions in row-major order across ranks (rank order is row
    order under FSDP2's dim-0 sharding). The result equals the single-process masks of the gathered scores.
    """
    world, rank = _world(process_group)
    names = [n for group in groups for n in group]
    index = {n: i for i, n in enumerate(names)}
    totals = all_reduce_sum([sum(scores[n].numel() for n in group) for group in groups], process_group)
    masks: dict[str, Tensor] = {}
    active = []
    for g, group in enumerate(groups):
        keep = int(keeps[g])
        if keep <= 0 or keep >= totals[g]:
            for n in group:
                masks[n] = torch.full(scores[n].shape, keep > 0, dtype=torch.bool, device=scores[n].device)
        else:
            active.append(g)
    if not active:
        return masks
    prefix = {g: 0 for g in active}
    remaining = {g: int(keeps[g]) for g in active}  # the rank, among candidates, of the score sought (1 = largest)
    for shift in (24, 16, 8, 0):
        histogram = torch.zeros(len(active), 256, dtype=torch.int64)
        for row, g in enumerate(active):
            for n in groups[g]:
                key = _keys(scores[n])
                if shift < 24:
                    key = key[(key >> (shift + 8)) == prefix[g]]
                histogram[row] += torch.bincount(((key >> shift) & 255).cpu(), minlength=256)
        if world > 1:
            dist.all_reduce(histogram, group=process_group)
        for row, g in enumerate(active):
            counts, above = histogram[row].tolist(), 0
            for bucket in range(255, -1, -1):
                if above + counts[bucket] >= remaining[g]:
                    prefix[g] = (prefix[g] << 8) | bucket
                    remaining[g] -= above
                    break
                above += counts[bucket]
    # prefix[g] is now the key of the group's k-th largest score; remaining[g] of the scores equal to it are kept.
    tie_counts = torch.zeros(len(names), dtype=torch.int64)
    keys = {}
    for g in active:
        for n in groups[g]:
            keys[n] = _keys(scores[n])
            masks[n] = keys[n] > prefix[g]
            tie_counts[index[n]] = int((keys[n] == prefix[g]).sum())
    per_rank = [tie_counts]
    if world > 1:
        per_rank = [torch.zeros_like(tie_counts) for _ in range(world)]
        dist.all_gather(per_rank, tie_counts, group=process_group)
    table = torch.stack(per_rank)  # [rank, layer]
    for g in active:
        layer_ties = [int(table[:, index[n]].sum()) for n in groups[g]]
        for n, count, share in zip(groups[g], layer_ties, _proportional_shares(remaining[g], layer_ties)):
            mask, ties = masks[n], keys[n] == prefix[g]
            if share == count:
                mask |= ties
            elif share:
                offset, held = int(table[:rank, index[n]].sum()), int(table[rank, index[n]])
                chosen = torch.arange(share) * count // share  # the layer's tie indices, evenly spaced
                chosen = chosen[(chosen >= offset) & (chosen < offset + held)] - offset
                positions = ties.nonzero().squeeze(1)
                mask[positions[chosen.to(positions.device)]] = True
    return {n: masks[n].view(scores[n].shape) for n in names}
