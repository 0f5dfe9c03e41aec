"""AC/DC against GMP per training step on LeNet-5: is AC/DC's step dearer, and where?

Two measurements in one process:

1. The sparsifier's own work per step, timed alone: the pre-step hook (gradient masking) and the post-step work
   (step count, the re-zeroing or its proof of being unneeded, the schedule boundary), median of 2000 calls.
2. Whole steps (forward, backward, SGD Nesterov with weight decay, batch 128) of several variants interleaved in
   rounds of 30 steps, the order rotating per round, as ratios to a plain model in the same round: GMP and AC/DC
   (each in its sparse regime), a second copy of each (how far two identical variants land apart: the noise),
   and each with the other's mask distribution (AC/DC ranks globally by default, GMP per layer).

    python benchmarks/acdc_step.py             # 1 thread, 12 rounds
    python benchmarks/acdc_step.py --threads 2
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import sparsetrain
from sparsetrain.models import build_model

STEPS = 30
OPTIONS = {
    "acdc": dict(unit="steps", warmup=0, compressed=10**6, decompressed=STEPS, final=STEPS),  # one long sparse phase
    "gmp": dict(unit="steps", start=0, end=1, frequency=1),  # pruned at step 0, fixed after
}


def variant(base: nn.Module, method: str | None, distribution: str | None = None) -> tuple[Callable, object]:
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sparsifier = None
    if method is not None:
        extra = {} if distribution is None else {"distribution": distribution}
        sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=10**7, **OPTIONS[method], **extra)
        sparsifier.attach(optimizer)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    return step, (sparsifier, optimizer)


def hook_costs(base: nn.Module) -> None:
    for method in ("gmp", "acdc"):
        _, (sparsifier, optimizer) = variant(base, method)
        pre, post = [], []
        for _ in range(2000):
            start = time.perf_counter()
            sparsifier._pre_step_hook(optimizer, (optimizer,), {})
            middle = time.perf_counter()
            sparsifier._after_step(optimizer)
            pre.append(middle - start)
            post.append(time.perf_counter() - middle)
        print(f"  {method:5s} pre-step {statistics.median(pre) * 1e6:6.1f} us, post-step "
              f"{statistics.median(post) * 1e6:5.1f} us, enforcement {sparsifier.enforcement}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
    print(f"LeNet-5, batch 128, {args.threads} thread(s); the sparsifier's work per step, timed alone:")
    hook_costs(base)
    variants = {
        "plain model": variant(base, None)[0],
        "gmp": variant(base, "gmp")[0],
        "gmp (copy)": variant(base, "gmp")[0],
        "gmp, global masks": variant(base, "gmp", "global")[0],
        "acdc": variant(base, "acdc")[0],
        "acdc (copy)": variant(base, "acdc")[0],
        "acdc, uniform masks": variant(base, "acdc", "uniform")[0],
    }
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(STEPS):
                variants[name]()
            times[name].append((time.perf_counter() - start) / STEPS)
    print(f"whole steps, {args.rounds} rounds of {STEPS}: median step, median ratio to the plain model [IQR]")
    for name in names:
        ratios = [a / b for a, b in zip(times[name], times["plain model"])]
        q = statistics.quantiles(ratios, n=4)
        print(f"  {name:20s} {statistics.median(times[name]) * 1e3:7.2f} ms  {statistics.median(ratios):.3f} "
              f"[{q[0]:.3f}-{q[2]:.3f}]")  # fmt: skip


if __name__ == "__main__":
    main()
