"""Sparse training as models grow: mask memory per parameter and step time relative to dense, at 1M, 10M and 100M
parameters (400M on request; an MLP and a stack of transformer encoder blocks), then data-parallel (DDP) against
sharded (FSDP2) training on 2 processes.

Step time: one training step (batch 32, SGD momentum 0.9) with the sparsifier attached, divided by the same step
of an identical dense model, in interleaved ABBA pairs; the median of the pairs' ratios. Memory: what
``Sparsifier.memory_bytes()`` reports per sparsified weight. ``enforce='always'`` re-zeroes after every step (two
passes per step, as before the re-zeroing was skipped where the optimizer cannot move masked weights);
``mask_storage='packed'`` holds the masks a bit per weight and unpacks them block by block in the enforcement.
"gmp, MaskedSGD" trains with ``sparsetrain.optim.MaskedSGD``, which masks the gradients inside its compiled update
instead of in a separate pass; ``--dense-optimizer fused`` times the dense model with torch's fused SGD kernel, the
fastest dense update torch has on CPU, so that the ratio is the masks' cost alone, not the compiled update's gain.

    python benchmarks/scale.py                      # 1M, 10M, 100M single process, then DDP vs FSDP2 at 10M
    python benchmarks/scale.py --no-single --distributed-size 1M --rounds 3
    python benchmarks/scale.py --sizes 1M 10M --rounds 3 --no-distributed --threads 2
    python benchmarks/scale.py --kernel --threads 2     # the enforcement pass alone: bool against packed masks
    python benchmarks/scale.py --kinds mlp --sizes 100M --no-distributed --threads 2 --rounds 9 --steps 4 \
        --variants gmp "gmp, MaskedSGD" --dense-optimizer fused
    python benchmarks/scale.py --breakdown --kinds mlp --sizes 100M --threads 2 --steps 12 [--steady-malloc]
    python benchmarks/scale.py --compile-time --kinds mlp blocks --sizes 10M    # the masked kernel's cold build
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import sparsetrain

SPARSITY = 0.9
BATCH = 32
# (width, layers) per size: an MLP of `layers` Linear(width, width); a stack of `layers` encoder blocks of
# d_model `width` (4x feed-forward, about 12 width^2 weights each) on sequences of SEQ tokens.
MLP_SIZES = {"1M": (512, 4), "10M": (1024, 10), "100M": (4096, 6), "400M": (8192, 6)}
BLOCK_SIZES = {"1M": (128, 5), "10M": (256, 13), "100M": (768, 14), "400M": (1536, 14)}
SEQ = 8
# The optimizers steps are timed with (SGD momentum 0.9, lr 1e-3); "masked" is the sparse side's MaskedSGD.
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9),
    "fused": lambda params: torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=True),
    "masked": lambda params: sparsetrain.optim.MaskedSGD(params, lr=1e-3, momentum=0.9),
    # --breakdown --family adamw
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01),
    "fused adamw": lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True),
    "masked adamw": lambda params: sparsetrain.optim.MaskedAdamW(params, lr=1e-4, weight_decay=0.01),
}
VARIANTS = {
    # name: (method, options[, optimizer of the sparse model, "sgd" if left out])
    "gmp": ("gmp", dict(unit="steps", start=0, end=1, frequency=1)),
    "acdc": ("acdc", dict(unit="steps", warmup=1, compressed=10_000, decompressed=1, final=1)),
    "rigl": ("rigl", dict(delta=1000)),
    "gmp, enforce=always": ("gmp", dict(unit="steps", start=0, end=1, frequency=1, enforce="always")),
    "gmp, packed": ("gmp", dict(unit="steps", start=0, end=1, frequency=1, mask_storage="packed")),
    "gmp, MaskedSGD": ("gmp", dict(unit="steps", start=0, end=1, frequency=1), "masked"),
    "acdc, MaskedSGD": ("acdc", dict(unit="steps", warmup=1, compressed=10_000, decompressed=1, final=1), "masked"),
}


class Blocks(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(width, nhead=max(1, width // 64), dim_feedforward=4 * width, dropout=0.0,
                                       batch_first=True)
            for _ in range(layers)
        ])  # fmt: skip
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(1))


def build(kind: str, size: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "mlp":
        width, layers = MLP_SIZES[size]
        body = [m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]
        return nn.Sequential(*body, nn.Linear(width, 10)), torch.randn(BATCH, width)
    width, layers = BLOCK_SIZES[size]
    return Blocks(width, layers), torch.randn(BATCH, SEQ, width)


def optimizer_for(model: nn.Module, kind: str = "sgd") -> torch.optim.Optimizer:
    """The timed optimizer ``kind`` (a key of ``OPTIMIZERS``) over ``model``'s parameters."""
    return OPTIMIZERS[kind](model.parameters())


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def timed(step: Callable, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def paired_ratio(dense: Callable, sparse: Callable, rounds: int, steps: int) -> tuple[float, list[float]]:
    ratios = []
    for _ in range(rounds):
        b1, v1, v2, b2 = timed(dense, steps), timed(sparse, steps), timed(sparse, steps), timed(dense, steps)
        ratios.append((v1 + v2) / (b1 + b2))
    return statistics.median(ratios), ratios


def bench_single(
    kind: str, size: str, rounds: int, variants: list[str], steps: int | None = None, dense_optimizer: str = "sgd"
) -> dict:
    base, x = build(kind, size)
    y = torch.randint(0, 10, (BATCH,))
    n_params = sum(p.numel() for p in base.parameters())
    steps = steps or (1 if size in ("100M", "400M") else 3)
    dense = copy.deepcopy(base)
    dense_step = make_step(dense, optimizer_for(dense, dense_optimizer), x, y)
    timed(dense_step, 2)
    dense_ms = 1000 * timed(dense_step, steps)
    rows = {}
    for name in variants:
        method, options, *optimizer_kind = VARIANTS[name]
        model = copy.deepcopy(base)
        optimizer = optimizer_for(model, *optimizer_kind)
        sparsifier = sparsetrain.create(method, model, sparsity=SPARSITY, total_steps=100_000, **options)
        sparsifier.attach(optimizer)
        step = make_step(model, optimizer, x, y)
        timed(step, 3)  # past the first mask update and the first (full) enforcement (and a kernel's compilation)
        median, ratios = paired_ratio(dense_step, step, rounds, steps)
        memory = sparsifier.memory_bytes()
        rows[name] = {"ratio": median, "ratios": ratios, "bytes_per_param": memory.bytes_per_parameter,
                      "workspace_bytes": memory.workspace, "enforcement": dict(sparsifier.enforcement)}  # fmt: skip
        del model, optimizer, sparsifier, step
    return {"kind": kind, "size": size, "params": n_params, "dense_step_ms": dense_ms,
            "dense_optimizer": dense_optimizer, "variants": rows}  # fmt: skip


# ------------------------------------------------------------------------------------------ 2 processes
def worker(kind: str, size: str, mode: str, rounds: int, out: str) -> None:
    """Under torchrun: dense and gmp step times with DDP or FSDP2 (each Linear / block and the root sharded)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)

    def wrap(model: nn.Module) -> nn.Module:
        if mode == "ddp":
            return nn.parallel.DistributedDataParallel(model)
        units = model.blocks if isinstance(model, Blocks) else [m for m in model if isinstance(m, nn.Linear)]
        for unit in units:
            fully_shard(unit)
        fully_shard(model)
        return model

    base, x = build(kind, size)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(x.shape, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    dense_model = wrap(copy.deepcopy(base))
    dense_step = make_step(dense_model, optimizer_for(dense_model), x, y)
    model = copy.deepcopy(base)
    wrapped = wrap(model)
    optimizer = optimizer_for(model)
    sparsifier = sparsetrain.create("gmp", model, sparsity=SPARSITY, total_steps=100_000, **VARIANTS["gmp"][1])
    sparsifier.attach(optimizer)
    step = make_step(wrapped, optimizer, x, y)
    timed(dense_step, 2)
    timed(step, 3)
    dense_ms = 1000 * timed(dense_step, 2)
    median, ratios = paired_ratio(dense_step, step, rounds, 2)
    result = {"mode": mode, "dense_step_ms": dense_ms, "ratio": median, "ratios": ratios,
              "bytes_per_param_per_rank": sparsifier.memory_bytes().bytes_per_parameter,
              "sparsity": sparsifier.sparsity().overall}  # fmt: skip
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


def bench_distributed(kind: str, size: str, rounds: int) -> list[dict]:
    results = []
    for mode in ("ddp", "fsdp"):
        out = f"/tmp/sparsetrain_scale_{os.getpid()}_{mode}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                   "--worker", kind, size, mode, str(rounds), out]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-3000:]}")
        with open(out) as handle:
            results.append({"kind": kind, "size": size, **json.load(handle)})
        os.remove(out)
    return results


def bench_kernel(n: int = 100_000_000, repeats: int = 5) -> dict:
    """The enforcement pass alone (``_zero_where_masked``) over ``n`` float32 values at 90%: bool or packed masks."""
    from sparsetrain.core.packed_masks import PackedMask
    from sparsetrain.core.sparsifier import _zero_where_masked

    g = torch.Generator().manual_seed(0)
    values = torch.randn(n, generator=g)
    mask = torch.rand(n, generator=g) >= SPARSITY
    forms = {"bool": mask, "packed": PackedMask(sparsetrain.maskops.pack_mask(mask), mask.shape)}
    times: dict[str, list[float]] = {name: [] for name in forms}
    workspace: dict = {}
    for _ in range(repeats):  # interleaved
        for name, form in forms.items():
            _zero_where_masked([values], [form], workspace)
            times[name].append(timed(lambda form=form: _zero_where_masked([values], [form], workspace), 3))
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def bench_mask_placement(size: str, rounds: int, steps: int) -> dict:
    """Where the one gradient-masking pass runs, against the same dense step (no masking) on the MLP of ``size``:
    all gradients before the optimizer step (what the sparsifier does), or each gradient in a post-accumulate
    hook right after backward wrote it (while it may still be in cache). The pass is ``_zero_where_masked``."""
    from sparsetrain.core.sparsifier import _zero_where_masked

    base, x = build("mlp", size)
    y = torch.randint(0, 10, (BATCH,))
    g = torch.Generator().manual_seed(0)
    weights = [n for n, p in base.named_parameters() if p.dim() == 2]
    masks = {n: torch.rand(base.get_parameter(n).shape, generator=g) >= SPARSITY for n in weights}
    workspace: dict = {}
    dense = copy.deepcopy(base)
    dense_step = make_step(dense, optimizer_for(dense), x, y)
    before = copy.deepcopy(base)
    optimizer = optimizer_for(before)
    params = [before.get_parameter(n) for n in weights]
    optimizer.register_step_pre_hook(
        lambda *_: _zero_where_masked([p.grad for p in params], [masks[n] for n in weights], workspace))
    before_step = make_step(before, optimizer, x, y)
    hooked = copy.deepcopy(base)
    for n in weights:
        hooked.get_parameter(n).register_post_accumulate_grad_hook(
            lambda p, m=masks[n]: _zero_where_masked([p.grad], [m], workspace))
    hooked_step = make_step(hooked, optimizer_for(hooked), x, y)
    out = {}
    for name, step in (("before the step", before_step), ("post-accumulate hook", hooked_step)):
        timed(step, 2)
        out[name] = paired_ratio(dense_step, step, rounds, steps)
    return out


def bench_breakdown(size: str, steps: int, family: str = "sgd", kind: str = "mlp") -> dict:
    """Forward-backward and optimizer step timed apart, the models taking one step each in turn (round robin), on
    the model of ``kind`` and ``size``: dense with torch's default and fused SGD, GMP at 90% with
    ``torch.optim.SGD`` (the sparsifier's gradient-masking pass before the step) and with ``MaskedSGD`` (the
    masks inside the update); ``family='adamw'``: the same with AdamW and ``MaskedAdamW``. Medians over ``steps``
    rounds after 3 warm-up ones."""
    base, x = build(kind, size)
    y = torch.randint(0, 10, (BATCH,))
    runs = {}
    optimizers = {"sgd": ("sgd", "fused", "masked"), "adamw": ("adamw", "fused adamw", "masked adamw")}[family]
    plain, masked = {"sgd": ("SGD", "MaskedSGD"), "adamw": ("AdamW", "MaskedAdamW")}[family]
    for optimizer_kind, label in ((optimizers[0], plain), (optimizers[1], f"fused {plain}")):
        model = copy.deepcopy(base)
        runs[f"dense, {label}"] = (model, optimizer_for(model, optimizer_kind))
    for optimizer_kind, label in ((optimizers[0], plain), (optimizers[2], masked)):
        model = copy.deepcopy(base)
        optimizer = optimizer_for(model, optimizer_kind)
        method, options = VARIANTS["gmp"]
        sparsetrain.create(method, model, sparsity=SPARSITY, total_steps=100_000, **options).attach(optimizer)
        runs[f"gmp, {label}"] = (model, optimizer)
    times: dict[str, dict[str, list[float]]] = {name: {"forward-backward": [], "optimizer": []} for name in runs}
    for round_ in range(steps + 3):
        for name, (model, optimizer) in runs.items():
            optimizer.zero_grad(set_to_none=True)
            start = time.perf_counter()
            nn.functional.cross_entropy(model(x), y).backward()
            middle = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
            if round_ >= 3:
                times[name]["forward-backward"].append(1000 * (middle - start))
                times[name]["optimizer"].append(1000 * (end - middle))
    return {name: {part: statistics.median(values) for part, values in parts.items()} for name, parts in times.items()}


def compile_time_worker(kind: str, size: str, family: str) -> None:
    """In a fresh process with an empty compile cache: the first optimizer steps of gmp with the masked optimizer
    of ``family``, in seconds (the masks are handed over after step 0, so step 1 builds the kernel)."""
    torch.set_num_threads(2)
    model, x = build(kind, size)
    y = torch.randint(0, 10, (BATCH,))
    optimizer = optimizer_for(model, {"sgd": "masked", "adamw": "masked adamw"}[family])
    method, options = VARIANTS["gmp"]
    sparsifier = sparsetrain.create(method, model, sparsity=SPARSITY, total_steps=100_000, **options)
    sparsifier.attach(optimizer)
    seconds = []
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        start = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"kind": kind, "size": size, "family": family, "masked_weights": len(sparsifier.params),
                      "step_seconds": seconds}))  # fmt: skip


def bench_compile_time(kind: str, size: str, family: str) -> dict:
    """``compile_time_worker`` in a subprocess whose inductor cache is a new empty folder (a cold start)."""
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, __file__, "--compile-time-worker", kind, size, family],
                              capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--compile-time-worker":
        compile_time_worker(*sys.argv[2:5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, size, mode, rounds, out = sys.argv[2:7]
        worker(kind, size, mode, int(rounds), out)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"], choices=list(MLP_SIZES))
    parser.add_argument("--kinds", nargs="+", default=["mlp", "blocks"], choices=["mlp", "blocks"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-distributed", action="store_true")
    parser.add_argument("--distributed-size", default="10M", choices=list(MLP_SIZES))
    parser.add_argument("--no-single", action="store_true", help="only the 2-process runs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the single-process runs")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed half-round (default: 3, or 1 at "
                        "100M and 400M)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"single-process variants (default: all of {', '.join(map(repr, VARIANTS))})")
    parser.add_argument("--dense-optimizer", default="sgd", choices=["sgd", "fused"], help="the dense baseline's "
                        "SGD: torch's default (foreach) or its fused kernel")
    parser.add_argument("--steady-malloc", action="store_true", help="glibc serves every allocation from its heap "
                        "and keeps it (structured.py's steady_malloc): no fresh, page-faulted gradient buffers")
    parser.add_argument("--breakdown", action="store_true", help="only forward-backward and optimizer step timed "
                        "apart, round robin: dense (default and fused SGD), gmp with SGD and with MaskedSGD; --kinds "
                        "and --sizes, --steps rounds (default 12)")
    parser.add_argument("--family", default="sgd", choices=["sgd", "adamw"], help="--breakdown's optimizers: SGD "
                        "(torch's, fused, MaskedSGD) or AdamW (torch's, fused, MaskedAdamW)")
    parser.add_argument("--compile-time", action="store_true", help="only the first optimizer steps of gmp with "
                        "the masked optimizer of --family, cold compile cache, on --kinds and --sizes")
    parser.add_argument("--kernel", action="store_true", help="only the enforcement pass over 100M values")
    parser.add_argument("--mask-placement", action="store_true", help="only the gradient-masking pass's placement "
                        "(before the step or in a post-accumulate hook) against no masking, MLP of --sizes")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.steady_malloc:
        from structured import steady_malloc

        steady_malloc()
    if args.mask_placement:
        torch.set_num_threads(args.threads)
        for size in args.sizes:
            for name, (median, ratios) in bench_mask_placement(size, args.rounds, args.steps or 3).items():
                print(f"mlp {size}, {torch.get_num_threads()} threads, masking {name}: {median:.3f}x the unmasked step "
                      f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})", flush=True)  # fmt: skip
        return
    if args.compile_time:
        for kind, size in [(k, s) for k in args.kinds for s in args.sizes]:
            row = bench_compile_time(kind, size, args.family)
            print(f"{kind} {size}, {args.family}, {row['masked_weights']} masked weights: first optimizer steps "
                  + ", ".join(f"{t:.2f}" for t in row["step_seconds"]) + " s", flush=True)
        return
    if args.breakdown:
        torch.set_num_threads(args.threads)
        for kind, size in [(k, s) for k in args.kinds for s in args.sizes]:
            rows = bench_breakdown(size, args.steps or 12, args.family, kind)
            print(f"{kind} {size}, {args.family}, {torch.get_num_threads()} threads, steady malloc "
                  f"{args.steady_malloc}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
            for name, parts in rows.items():
                fb, opt = parts["forward-backward"], parts["optimizer"]
                print(f"  {name:18s} forward-backward {fb:7.1f} ms  optimizer {opt:6.1f} ms  step {fb + opt:7.1f} ms")
            dense, fused, plain, masked = (sum(parts.values()) for parts in rows.values())
            names = list(rows)
            print(f"  {names[2]} / {names[0]} {plain / dense:.3f}x; {names[3]} / {names[1]} {masked / fused:.3f}x; "
                  f"{names[3]} / {names[0]} {masked / dense:.3f}x")  # fmt: skip
        return
    if args.kernel:
        torch.set_num_threads(args.threads)
        ms = bench_kernel()
        print(f"enforcement pass over 100M float32 values, {torch.get_num_threads()} threads: "
              + ", ".join(f"{k} masks {v:.1f} ms" for k, v in ms.items()))
        return
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"batch {BATCH}, sparsity {SPARSITY}, SGD momentum (dense: {args.dense_optimizer}); steady malloc "
          f"{args.steady_malloc}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    single = []
    print(f"{'model':8s}{'params':>8s}{'dense ms':>10s}  " + "".join(f"{v:>26s}" for v in args.variants))
    for kind in [] if args.no_single else args.kinds:
        for size in args.sizes:
            row = bench_single(kind, size, args.rounds, args.variants, args.steps, args.dense_optimizer)
            single.append(row)
            cells = "".join(f"{r['ratio']:>14.3f}x {r['bytes_per_param']:5.3f} B/p" for r in row["variants"].values())
            print(f"{kind:8s}{row['params'] / 1e6:7.1f}M{row['dense_step_ms']:10.1f}  {cells}", flush=True)
    distributed = []
    if not args.no_distributed:
        for kind in args.kinds:
            for result in bench_distributed(kind, args.distributed_size, args.rounds):
                distributed.append(result)
                size = args.distributed_size
                print(f"2 processes, {kind} {size}, {result['mode']:4s}: dense step {result['dense_step_ms']:.1f} ms, "
                      f"gmp {result['ratio']:.3f}x dense, {result['bytes_per_param_per_rank']:.3f} B/param per rank, "
                      f"sparsity {result['sparsity']:.4f}", flush=True)  # fmt: skip
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"single": single, "distributed": distributed, "load": os.getloadavg()[0]}, handle, indent=2)


if __name__ == "__main__":
    main()
