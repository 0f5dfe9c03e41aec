"""Data-parallel sparse training: mask consistency across ranks and gradient-compression communication hooks."""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .hooks import HOOKS, HookState, WireStats, check_hook, list_comm_hooks, register_comm_hook, register_hook

__all__ = ["HOOKS", "HookState", "WireStats", "check_hook", "list_comm_hooks", "register_comm_hook", "register_hook",
           "masks_checksum", "check_masks_consistent"]  # fmt: skip


def masks_checksum(masks: dict[str, torch.Tensor]) -> int:
    """A 63-bit digest of all masks (names, shapes and bits), cheap to all-gather."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", torch.uint8).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(mask.shape)).encode())
        digest.update(mask.numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def check_masks_consistent(masks: dict[str, torch.Tensor], group=None) -> None:
    """Raise RuntimeError unless every rank holds bit-identical masks (all-gather of one checksum per rank)."""
    local = torch.tensor([masks_checksum(masks)], dtype=torch.int64)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    values = [int(t) for t in gathered]
    if len(set(values)) != 1:
        raise RuntimeError(f"masks differ across ranks (checksums {values}); rank {dist.get_rank(group)}")
