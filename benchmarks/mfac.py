"""M-FAC inverse-Fisher-vector products at d = 1M weights: setup time, time per product, memory.

For m in (32, 64) and block sizes (None: one block of all d weights; and blocks of 10k), builds
``sparsetrain.mfac.MFACInverse`` from m random float32 gradients and reports the setup (Gram matrices and
coefficients, O(m^2 d + m^3 blocks)), the median time of ``ihvp`` (O(m d + m^2)) over ``--reps`` products, and the
memory the inverse holds: the gradients in block layout (m * d * 4 bytes plus padding) and the (blocks, m, m)
coefficients. Runs on CUDA when available (``--device``), else CPU. Prints only.

    python benchmarks/mfac.py [--d 1000000] [--reps 10] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparsetrain.mfac import MFACInverse


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, d = {args.d}, float32")
    print(f"{'m':>4} {'block':>8} {'setup s':>9} {'ihvp ms':>9} {'held MiB':>9}")
    for m in (32, 64):
        for block in (None, 10_000):
            gen = torch.Generator(device=device).manual_seed(0)
            grads = torch.randn(m, args.d, generator=gen, device=device)
            v = torch.randn(args.d, generator=gen, device=device)
            _sync(device)
            start = time.perf_counter()
            inverse = MFACInverse(grads, damp=1e-4, block_size=block)
            _sync(device)
            setup = time.perf_counter() - start
            del grads
            inverse.ihvp(v)  # warm-up
            times = []
            for _ in range(args.reps):
                _sync(device)
                start = time.perf_counter()
                inverse.ihvp(v)
                _sync(device)
                times.append(time.perf_counter() - start)
            held = sum(t.numel() * t.element_size() for t in (inverse.grads, inverse.coef, inverse.dvec))
            label = "all" if block is None else str(block)
            print(f"{m:>4} {label:>8} {setup:>9.3f} {1e3 * statistics.median(times):>9.2f} {held / 2**20:>9.1f}")
            del inverse


if __name__ == "__main__":
    main()
