"""Gradient communication in data-parallel sparse training: bits on the wire and step time per hook.

For each hook (none, fp16, qsgd 4-bit, qsgd 8-bit, natural, masked) and each process count, torchrun starts the
processes on this machine (gloo over loopback); each trains the same 784-1024-1024-10 MLP with AC/DC in a
compressed phase (90% sparse, masks fixed) and times the steps. Bits per coordinate are counted by the hooks
themselves (what one rank put on the wire per gradient coordinate).

    python benchmarks/comm.py                       # 2 and 4 processes
    python benchmarks/comm.py --procs 2 --steps 30

Accuracy beside it: `sparsetrain train --nproc 2 --comm-hook HOOK` on Fashion-MNIST (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HOOKS = {
    "none": ("none", {}),
    "fp16": ("fp16", {}),
    "qsgd 4-bit (s=7)": ("qsgd", {"levels": 7, "bucket_size": 512}),
    "qsgd 8-bit (s=127)": ("qsgd", {"levels": 127, "bucket_size": 512}),
    "natural": ("natural", {}),
    "masked (90% sparse)": ("masked", {}),
}


def worker(hook_key: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import sparsetrain
    from sparsetrain.distributed import register_hook

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    total = steps + 10
    sparsifier = sparsetrain.create("acdc", model, sparsity=0.9, total_steps=total, unit="steps", warmup=0,
                                    compressed=total - 2, decompressed=1, final=1)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sparsifier.attach(optimizer)
    name, options = HOOKS[hook_key]
    state = register_hook(ddp, name, sparsifier=sparsifier, **options)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    times = []
    for step in range(steps + 3):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        if state is not None:
            state.step = step
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    if rank == 0:
        bits = state.stats.bits_per_coordinate if state is not None else 32.0
        with open(out, "w") as handle:
            json.dump(
                {"hook": hook_key, "world": world, "step_ms": 1000 * statistics.median(times), "bits": bits}, handle
            )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--worker", nargs=3, metavar=("HOOK", "STEPS", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2])
        return
    rows = []
    for world in args.procs:
        for hook in HOOKS:
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
                out = handle.name
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                       __file__, "--worker", hook, str(args.steps), out]  # fmt: skip
            threads = max(1, (os.cpu_count() or 1) // world)
            subprocess.run(
                command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
            )
            with open(out) as handle:
                rows.append(json.load(handle))
            os.unlink(out)
    print(f"machine: {os.cpu_count()} CPUs, gloo over loopback; MLP 784-1024-1024-10 (1.86M weights), batch 64/rank")
    print(f"{'hook':22s} {'procs':>5s} {'bits/coord':>10s} {'step (ms)':>10s} {'vs none':>8s}")
    for row in rows:
        base = next(r for r in rows if r["world"] == row["world"] and r["hook"] == "none")
        print(
            f"{row['hook']:22s} {row['world']:5d} {row['bits']:10.2f} {row['step_ms']:10.1f} "
            f"{row['step_ms'] / base['step_ms']:8.2f}"
        )


if __name__ == "__main__":
    main()
