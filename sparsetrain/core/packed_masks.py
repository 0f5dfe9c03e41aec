"""Masks held one bit per weight: the ``mask_storage='packed'`` store of :class:`~sparsetrain.Sparsifier`.

Boolean masks cost 1 byte per sparsified weight, as much as a quarter of the fp32 weights themselves. Packed 8 to a
byte (:func:`sparsetrain.maskops.pack_mask`'s layout) they cost 1/8 byte. The enforcement that runs at every step
reads the packed bits directly, block by block (``_zero_where_masked``); everything else that reads a mask (a
method choosing the next masks, a checkpoint, a report) gets a boolean tensor unpacked on demand, so methods and
checkpoints are the same whatever the storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import NamedTuple

import torch
from torch import Tensor

from .. import maskops

__all__ = ["MASK_STORAGES", "PackedMask", "PackedMasks", "check_mask_storage"]

MASK_STORAGES = ("bool", "packed")


def check_mask_storage(storage: str) -> str:
    if storage not in MASK_STORAGES:
        raise ValueError(f"mask_storage must be one of {', '.join(MASK_STORAGES)}; got {storage!r}")
    return storage


class PackedMask(NamedTuple):
    """One mask's bits (flat uint8, bit ``i`` of byte ``j`` is position ``8 j + i``) and its shape."""

    bits: Tensor
    shape: torch.Size

    def numel(self) -> int:
        return self.shape.numel()

    def unpack(self) -> Tensor:
        return maskops.unpack_mask(self.bits, self.shape)


class PackedMasks(MutableMapping[str, Tensor]):
    """A name -> boolean mask mapping that stores each mask packed to a bit per weight.

    Reading ``masks[name]`` returns a new boolean tensor: writing into it does not change the stored mask (assign
    it back, or use ``Sparsifier.set_masks``). ``packed(name)`` is the stored form, read without unpacking.
    """

    def __init__(self, masks: Mapping[str, Tensor] | None = None) -> None:
        self._packed: dict[str, PackedMask] = {}
        if masks is not None:
            self.update(masks)

    def __getitem__(self, name: str) -> Tensor:
        return self._packed[name].unpack()

    def __setitem__(self, name: str, mask: Tensor) -> None:
        mask = mask.to(torch.bool)
        self._packed[name] = PackedMask(maskops.pack_mask(mask), mask.shape)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self, name: str) -> PackedMask:
        return self._packed[name]

    def storages(self) -> list[Tensor]:
        """The tensors this store holds (for memory accounting)."""
        return [entry.bits for entry in self._packed.values()]
