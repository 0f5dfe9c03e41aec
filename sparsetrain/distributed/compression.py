"""Pure gradient compressors: QSGD and natural compression, with exact bit packing.

Both are unbiased stochastic quantizers (E[decode(encode(v))] = v), so averaging the decoded gradients of all
workers gives an unbiased estimate of the average gradient.

- QSGD (Alistarh et al., NeurIPS 2017, arXiv 1610.02132): per bucket of d values, Q(v_i) = ||v|| sgn(v_i) xi_i / s,
  xi_i the stochastic rounding of s |v_i| / ||v|| to one of its two neighbouring integers. Sent: one float32 norm
  per bucket and, per value, a sign bit and the level (4-bit codes for s <= 7, 8-bit for s <= 127).
- Natural compression (Horvath et al., 2019, arXiv 1905.10988): round |v_i| stochastically to one of its two
  neighbouring powers of two (unbiased; second moment at most 9/8 of the input's). Sent: the sign and the 8-bit
  exponent, 9 bits per value (an exponent byte, and the signs packed 8 to a byte).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QSGDPayload", "NaturalPayload", "qsgd_encode", "qsgd_decode", "natural_encode", "natural_decode",
           "pack_bits", "unpack_bits", "pack_nibbles", "unpack_nibbles"]  # fmt: skip


def pack_bits(bits: Tensor) -> Tensor:
    """Pack a flat bool tensor 8 to a byte (little-endian within the byte); length padded to a multiple of 8."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits.to(torch.uint8)
    weights = 1 << torch.arange(8, device=bits.device, dtype=torch.uint8)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.view(-1, 1) >> shifts) & 1).view(-1)[:n].bool()


def pack_nibbles(codes: Tensor) -> Tensor:
    """Two 4-bit codes (values 0..15) per byte."""
    n = codes.numel()
    padded = torch.zeros((n + 1) // 2 * 2, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    pairs = padded.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).view(-1)[:n]


@dataclass
class QSGDPayload:
    codes: Tensor  # uint8: packed sign + level codes
    norms: Tensor  # float32, one per bucket
    numel: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.norms.numel()


def qsgd_encode(values: Tensor, *, levels: int, bucket_size: int, norm: str = "l2",
                generator: torch.Generator | None = None) -> QSGDPayload:  # fmt: skip
    """Quantize a flat float tensor to ``levels`` levels per bucket with stochastic rounding."""
    if not 1 <= levels <= 127:
        raise ValueError(f"QSGD levels must be in [1, 127] (4-bit codes up to 7, 8-bit up to 127), got {levels}")
    n = values.numel()
    buckets = -(-n // bucket_size)
    flat = torch.zeros(buckets * bucket_size, dtype=torch.float32, device=values.device)
    flat[:n] = values.reshape(-1).float()
    grid = flat.view(buckets, bucket_size)
    norms = grid.norm(dim=1) if norm == "l2" else grid.abs().amax(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scaled = grid.abs() / safe.unsqueeze(1) * levels
    lower = scaled.floor()
    up = torch.rand(scaled.shape, generator=generator, device=values.device) < (scaled - lower)
    level = (lower + up).clamp_(0, levels).to(torch.uint8)
    sign_bit = 8 if levels > 7 else 4
    codes = level | ((grid < 0).to(torch.uint8) << (sign_bit - 1))
    codes = codes.view(-1)[:n]
    packed = pack_nibbles(codes) if sign_bit == 4 else codes.contiguous()
    return QSGDPayload(codes=packed, norms=norms, numel=n)


def qsgd_decode(payload: QSGDPayload, *, levels: int, bucket_size: int) -> Tensor:
    n = payload.numel
    sign_bit = 8 if levels > 7 else 4
    codes = unpack_nibbles(payload.codes, n) if sign_bit == 4 else payload.codes[:n]
    negative = (codes >> (sign_bit - 1)) & 1
    level = (codes & ((1 << (sign_bit - 1)) - 1)).float()
    norms = payload.norms.repeat_interleave(bucket_size)[:n]
    return norms * level / levels * (1 - 2 * negative.float())


@dataclass
class NaturalPayload:
    exponents: Tensor  # uint8 biased exponent of the rounded power of two; 0 encodes an exact zero
    signs: Tensor  # packed sign bits
    numel: int

    @property
    def nbytes(self) -> int:
        return self.exponents.numel() + self.signs.numel()


_SMALLEST_NORMAL = 2.0**-126  # float32's; the 8-bit exponent byte codes 2^-126 .. 2^127, and 0 for zero


def natural_encode(values: Tensor, generator: torch.Generator | None = None) -> NaturalPayload:
    """Round each |v| to 2^floor(log2|v|) or the next power of two, with the probability that keeps it unbiased.

    Subnormal values (|v| < 2^-126) round to 0 or 2^-126, unbiased as well; zero sends 0.
    """
    flat = values.reshape(-1).float()
    mantissa, exponent = torch.frexp(flat)  # |v| = |m| 2^e with |m| in [0.5, 1): neighbours 2^(e-1) and 2^e
    low = exponent - 1
    p_up = mantissa.abs() * 2 - 1  # (|v| - 2^(e-1)) / 2^(e-1)
    draw = torch.rand(flat.shape, generator=generator, device=flat.device)
    up = draw < p_up
    k = low + up.to(low.dtype)
    biased = (k + 127).clamp(1, 254)
    # Below the smallest normal 2^-126 (subnormals) the two neighbours are 0 and 2^-126 (biased exponent 0 and 1):
    # send 2^-126 with probability |v| / 2^-126, else 0, which keeps the rounding unbiased there too.
    subnormal = flat.abs() < _SMALLEST_NORMAL
    p_smallest = torch.ldexp(flat.abs(), torch.tensor(126, device=flat.device))  # |v| / 2^-126, exact
    biased = torch.where(subnormal, (draw < p_smallest).to(biased.dtype), biased)  # an exact zero sends 0
    return NaturalPayload(exponents=biased.to(torch.uint8), signs=pack_bits(flat < 0), numel=flat.numel())


def natural_decode(payload: NaturalPayload) -> Tensor:
    exponent = payload.exponents.to(torch.int32)
    magnitude = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - 127)
    magnitude = torch.where(exponent == 0, torch.zeros_like(magnitude), magnitude)
    negative = unpack_bits(payload.signs, payload.numel)
    return torch.where(negative, -magnitude, magnitude)
