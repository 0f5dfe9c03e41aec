"""Training epochs inside a sparse phase on CSR kernels (``sparse_kernels: auto``) against the dense kernels.

Wide MLP (784-2048-2048-10, ``mlp-wide``) on Fashion-MNIST, batch 128, the trainer's SGD (``make_optimizer``:
Nesterov, weight decay, multi-tensor step), masks fixed at 90/95/98% (``static``: what every step of a sparse
phase does). Three variants train side by side in one process, on the same batches, from the same weights:

- ``dense``: no sparsifier at all (a dense epoch);
- ``off``: the sparsifier attached, dense kernels (what a sparse phase costs without the kernels);
- ``auto``: the sparsifier attached and :class:`sparsetrain.SparseKernels` (the per-layer timing it does on its
  first forward is part of its epoch).

The epoch is cut into blocks of ``--block`` steps; each block is run by every variant in turn (the order rotates
from block to block), so drift in the machine's speed (other jobs on a shared machine) hits all of them alike. Per
variant: epoch time = sum of its blocks; speed-up = median over blocks of the paired ratio of block times (the
robust figure under load) and ratio of the sums. Peak memory: each variant trains ``--memory-steps`` steps in a
fresh subprocess on random batches of the same shape and reports its peak resident set (VmHWM: Python, torch,
model, optimizer state, activations; no dataset).

A second table runs smaller zoo models (LeNet-300-100, LeNet-5) the same way, ``off`` against ``auto`` only: where
CSR never wins (small layers, convolutions), ``auto`` should cost nothing beyond its timing.

    python benchmarks/training_speed.py                      # 1 thread, one epoch per sparsity (~10 min on 2 cores)
    python benchmarks/training_speed.py --steps 100          # a shorter run
    python benchmarks/training_speed.py --threads 2
    python benchmarks/training_speed.py --runs --seeds 0 1 2      # whole runs, off against auto (see below)

``--zoo``: every registered zoo model, ``off`` against ``auto`` at 90% (``static``), on random batches of the model's
example input shape (token ids for language models), a batch size per model that keeps a step short on 2 cores
(``ZOO_BATCH``): the check that ``auto`` is never measurably slower than ``off`` where CSR does not help (conv nets
keep their convolutions dense; only their Linear layers can be timed).

    python benchmarks/training_speed.py --zoo --zoo-steps 60 --block 10

``--runs``: whole training runs with the CLI (``sparsetrain train``, evaluation and checkpoints included) at equal
epochs: dense, AC/DC at 90%, GMP and static at 95%, each sparse run once with ``sparse_kernels=off`` and once with
``auto``. Two runs at a time, one thread each, the ``off`` and ``auto`` runs of a configuration started together
so that they share the machine alike. Per run: wall time (``summary.json``), test accuracy of the sparse model, and
the peak resident set of its process (``os.wait4``'s ru_maxrss of that child).
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
from collections.abc import Callable, Iterator

import torch
from torch import nn

import sparsetrain
from sparsetrain.models import build_model, list_models, sample_input, takes_tokens
from sparsetrain.train.data import iterate_batches, load_dataset
from sparsetrain.train.loop import make_optimizer

VARIANTS = ("dense", "off", "auto")


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The classification loss, per position for a language model's (batch, T, classes) logits."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_variant(base: nn.Module, variant: str, sparsity: float, total: int) -> tuple[nn.Module, Callable]:
    """A model copy and its step function for ``variant`` (masks fixed at ``sparsity`` from step 0)."""
    model = copy.deepcopy(base)
    # The trainer's optimizer (fused SGD step, weights decayed, biases not): what a `sparsetrain train` step runs.
    optimizer = make_optimizer(model, {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4})
    if variant != "dense":
        sparsifier = sparsetrain.create("static", model, sparsity=sparsity, total_steps=total)
        sparsifier.attach(optimizer)
        if variant == "auto":
            model.kernels = sparsetrain.SparseKernels(sparsifier)  # kept alive with the model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy(model(x), y).backward()
        optimizer.step()

    return model, step


def batches(data, batch: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        yield from iterate_batches(data.train, batch, shuffle=True, seed=0, epoch=epoch, drop_last=True)
        epoch += 1


def paired(model_name: str, variants: tuple[str, ...], sparsity: float, data, batch: int, steps: int, block: int,
           plan: list | None = None, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None):
    """Train ``variants`` side by side on the same batches (``plan``, or ``steps`` batches of ``data``)."""
    torch.manual_seed(0)
    shape = input_shape or data.input_shape
    base = build_model(model_name, input_shape=shape, num_classes=num_classes or data.num_classes)
    made = {v: make_variant(base, v, sparsity, steps) for v in variants}
    if plan is None:
        stream = batches(data, batch, steps)
        plan = [next(stream) for _ in range(steps)]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for index, start in enumerate(range(0, steps, block)):
        chunk = plan[start : start + block]
        order = variants[index % len(variants) :] + variants[: index % len(variants)]
        for variant in order:
            step = made[variant][1]
            began = time.perf_counter()
            for xb, yb in chunk:
                step(xb, yb)
            times[variant].append(time.perf_counter() - began)
    result = {"model": model_name, "sparsity": sparsity, "steps": steps, "block": block, "batch": batch,
              "epoch_s": {v: sum(t) for v, t in times.items()}}  # fmt: skip
    reference = "dense" if "dense" in variants else "off"
    result["speedup_median"] = {
        v: statistics.median(r / t for r, t in zip(times[reference], times[v])) for v in variants if v != reference
    }
    result["speedup_sums"] = {v: result["epoch_s"][reference] / result["epoch_s"][v] for v in variants}
    if "auto" in made:
        kernels = made["auto"][0].kernels
        result["report"] = str(kernels.report())
        if "off" in variants and reference != "off":
            result["auto_vs_off_median"] = statistics.median(o / a for o, a in zip(times["off"], times["auto"]))
    return result


# Batch per zoo model for --zoo: the trainer's 128 where a step is a few ms, fewer where one step of 128 would take
# seconds on one thread (the wide ResNets); the ratio off/auto is what is measured, not throughput.
ZOO_BATCH = {"resnet20": 64, "resnet32": 32, "resnet56": 32, "wrn-16-4": 16, "wrn-28-10": 4, "mobilenet-v1": 32,
             "gpt": 32, "vit": 64}  # fmt: skip


def zoo_plan(name: str, batch: int, steps: int) -> tuple[list, tuple[int, ...], int]:
    """Random batches of model ``name``'s example input (token ids for a language model), 10 classes (256 tokens)."""
    from sparsetrain.models import MODEL_REGISTRY

    shape = MODEL_REGISTRY.entry(name).meta["example_input"]
    classes = 256 if takes_tokens(name) else 10
    generator = torch.Generator().manual_seed(0)
    plan = []
    for _ in range(steps):
        x = sample_input(name, shape, classes, batch=batch, generator=generator)
        y_shape = x.shape if takes_tokens(name) else (batch,)
        plan.append((x, torch.randint(0, classes, y_shape, generator=generator)))
    return plan, shape, classes


def zoo_table(args) -> list[dict]:
    """``--zoo``: off against auto at 90% on every zoo model (module docstring)."""
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in _load())
    print(f"zoo models at 90% (static), {args.zoo_steps} steps per variant, off against auto (blocks of "
          f"{args.block}), {torch.get_num_threads()} threads; load average {load}")  # fmt: skip
    results = []
    for name in args.zoo_models or list_models():
        batch = ZOO_BATCH.get(name, 128)
        plan, shape, classes = zoo_plan(name, batch, args.zoo_steps)
        r = paired(name, ("off", "auto"), 0.9, None, batch, args.zoo_steps, args.block, plan=plan,
                   input_shape=shape, num_classes=classes)  # fmt: skip
        results.append(r)
        e = r["epoch_s"]
        print(f"  {name:12s} batch {batch:3d}  off {e['off']:7.2f} s  auto {e['auto']:7.2f} s  auto/off median "
              f"{r['speedup_median']['auto']:.3f}x (sums {r['speedup_sums']['auto']:.3f}x)", flush=True)  # fmt: skip
        print("    " + r["report"].replace("\n", "\n    "))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in _load())}")
    return results


def peak_memory(model_name: str, variant: str, sparsity: float, steps: int, threads: int) -> float:
    """Peak resident set (MiB) of a fresh process that trains ``steps`` steps of ``variant``."""
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child would report this process's
    # peak (the dataset) whatever it used itself; VmHWM belongs to the child's own address space.
    code = (
        "import torch; "
        f"torch.set_num_threads({threads}); "
        "import benchmarks.training_speed as b; "
        f"b.memory_child({model_name!r}, {variant!r}, {sparsity}, {steps}); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def memory_child(model_name: str, variant: str, sparsity: float, steps: int) -> None:
    # Random batches of Fashion-MNIST's shape: memory does not depend on the values, and the dataset (~200 MB in
    # memory) would dwarf the difference between the paths.
    torch.manual_seed(0)
    base = build_model(model_name, input_shape=(1, 28, 28), num_classes=10)
    _, step = make_variant(base, variant, sparsity, steps)
    del base
    for _ in range(steps):
        step(torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant (default: one epoch)")
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98")
    parser.add_argument("--memory-steps", type=int, default=20)
    parser.add_argument("--small-steps", type=int, default=200, help="steps of the small-model table (0: skip it)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--runs", action="store_true", help="whole CLI runs, off against auto (module docstring)")
    parser.add_argument("--epochs", type=int, default=3, help="--runs: epochs per run")
    parser.add_argument("--limit-train", type=int, default=20000, help="--runs: training images (0: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="--runs: seeds")
    parser.add_argument("--runs-out", default="runs/training-speed", help="--runs: run folders and runs.json")
    parser.add_argument("--methods", nargs="+", choices=[m for m, _ in RUN_CONFIGS[1:]], default=None,
                        help="--runs: only these sparse configurations (the dense baseline always runs)")  # fmt: skip
    parser.add_argument("--zoo", action="store_true", help="every zoo model, off against auto at 90%% (docstring)")
    parser.add_argument("--zoo-steps", type=int, default=60, help="--zoo: steps per variant and model")
    parser.add_argument("--zoo-models", nargs="+", default=None, help="--zoo: only these models")
    args = parser.parse_args()
    if args.runs:
        return whole_runs(args)
    if args.zoo:
        results = zoo_table(args)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(results, handle, indent=2)
        return None
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", download=False)
    batch = 128
    steps = args.steps or len(data.train) // batch
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; load average {' '.join(f'{x:.1f}' for x in _load())}")  # fmt: skip
    print(f"mlp-wide (784-2048-2048-10) on Fashion-MNIST, batch {batch}, {steps} steps per variant "
          f"({steps / (len(data.train) // batch):.2f} epoch), blocks of {args.block} interleaved")  # fmt: skip
    results = []
    header = (f"{'sparsity':>8} {'dense s':>8} {'off s':>8} {'auto s':>8}  {'auto/dense median':>17} "
              f"{'(sums)':>6}  {'auto/off median':>15}  {'peak MiB dense/off/auto':>24}")  # fmt: skip
    print(header)
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        r = paired("mlp-wide", VARIANTS, sparsity, data, batch, steps, args.block)
        r["peak_mib"] = {v: peak_memory("mlp-wide", v, sparsity, args.memory_steps, args.threads) for v in VARIANTS}
        results.append(r)
        e, m = r["epoch_s"], r["peak_mib"]
        print(f"{sparsity:8.2f} {e['dense']:8.1f} {e['off']:8.1f} {e['auto']:8.1f}  "
              f"{r['speedup_median']['auto']:16.2f}x {r['speedup_sums']['auto']:5.2f}x  "
              f"{r['auto_vs_off_median']:14.2f}x  "
              f"{m['dense']:8.0f}/{m['off']:.0f}/{m['auto']:.0f}", flush=True)  # fmt: skip
    for r in results:
        print(f"\nsparsity {r['sparsity']}: {r['report']}")
    if args.small_steps:
        print(f"\nsmaller zoo models at 90%, {args.small_steps} steps, off against auto (blocks of {args.block}):")
        for name in ("mlp", "lenet5"):
            r = paired(name, ("off", "auto"), 0.9, data, batch, args.small_steps, args.block)
            results.append(r)
            e, up = r["epoch_s"], r["speedup_median"]["auto"]
            print(f"  {name:8s} off {e['off']:6.2f} s  auto {e['auto']:6.2f} s  auto/off median {up:.3f}x "
                  f"(sums {r['speedup_sums']['auto']:.3f}x)")  # fmt: skip
            print("    " + r["report"].replace("\n", "\n    "))
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in _load())}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


RUN_CONFIGS = (("dense", 0.0), ("acdc", 0.9), ("gmp", 0.95), ("static", 0.95))


def run_job(method: str, sparsity: float, kernels: str, seed: int, args, out: str):
    """Start one ``sparsetrain train`` run in a fresh folder ``out`` (an old one is removed); returns the process."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "sparsetrain", "train", "--method", method, "--model", "mlp-wide",
               "--epochs", str(args.epochs), "--seed", str(seed), "--threads", "1", "--out", out,
               "--set", f"sparse_kernels={kernels}"]  # fmt: skip
    if method != "dense":
        command += ["--sparsity", str(sparsity)]
    if args.limit_train:
        command += ["--limit-train", str(args.limit_train)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish_job(process, out: str) -> dict:
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"run {out} failed:\n{process.stderr.read()[-3000:]}")
    with open(f"{out}/summary.json") as handle:
        summary = json.load(handle)
    return {"wall_s": summary["wall_time_s"], "acc": summary["sparse_model"]["test_acc"],
            "dense_twin_acc": (summary.get("dense_model") or {}).get("test_acc"), "peak_mib": usage.ru_maxrss / 1024,
            "flops": summary["train_flops_ratio"], "kernels": summary.get("sparse_kernels")}  # fmt: skip


def whole_runs(args) -> None:
    base = args.runs_out
    configs = [(m, s) for m, s in RUN_CONFIGS if m == "dense" or args.methods is None or m in args.methods]
    jobs = []  # pairs started together
    for seed in args.seeds:
        for method, sparsity in configs:
            modes = ("off",) if method == "dense" else ("off", "auto")
            jobs.append([(method, sparsity, mode, seed) for mode in modes])
    # The dense runs have no partner of their own: pair them with each other (and a lone one with a spare dense
    # run, not counted) so that every counted run shares the machine with another one.
    dense = [job[0] for job in jobs if len(job) == 1]
    jobs = [job for job in jobs if len(job) == 2]
    while dense:
        pair = dense[:2]
        dense = dense[2:]
        jobs.insert(0, pair if len(pair) == 2 else [pair[0], ("dense", 0.0, "spare", pair[0][3])])
    print(f"whole runs: mlp-wide, {args.epochs} epochs, limit_train {args.limit_train}, seeds {args.seeds}; "
          f"load average {' '.join(f'{x:.1f}' for x in _load())}", flush=True)  # fmt: skip
    results = []
    for pair in jobs:
        started = []
        for method, sparsity, mode, seed in pair:
            out = f"{base}/{method}-{mode}-seed{seed}"
            kernels = "off" if mode == "spare" else mode
            started.append(((method, sparsity, mode, seed, out), run_job(method, sparsity, kernels, seed, args, out)))
        for (method, sparsity, mode, seed, out), process in started:
            row = finish_job(process, out)
            if mode == "spare":
                continue
            row.update(method=method, sparsity=sparsity, mode=mode, seed=seed)
            results.append(row)
            print(f"  {method:6s} {sparsity:.2f} {mode:4s} seed {seed}: {row['wall_s']:7.1f} s  acc {row['acc']:.2f}  "
                  f"peak {row['peak_mib']:.0f} MiB", flush=True)  # fmt: skip
    dense_wall = {r["seed"]: r["wall_s"] for r in results if r["method"] == "dense"}
    print(f"\n{'method':8s}{'sparsity':>9s}{'mode':>6s}{'wall / dense (mean)':>22s}{'acc mean +- std':>18s}"
          f"{'peak MiB':>10s}")  # fmt: skip
    for method, sparsity in configs:
        for mode in ("off",) if method == "dense" else ("off", "auto"):
            rows = [r for r in results if r["method"] == method and r["mode"] == mode]
            ratio = statistics.mean(r["wall_s"] / dense_wall[r["seed"]] for r in rows)
            accs = [r["acc"] for r in rows]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            peak = max(r["peak_mib"] for r in rows)
            print(f"{method:8s}{sparsity:9.2f}{mode:>6s}{ratio:21.3f}x{statistics.mean(accs):11.2f} +- {spread:4.2f}"
                  f"{peak:10.0f}")  # fmt: skip
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in _load())}")
    os.makedirs(base, exist_ok=True)
    with open(f"{base}/runs.json", "w") as handle:
        json.dump(results, handle, indent=2)


def _load() -> tuple[float, ...]:
    try:
        return os.getloadavg()
    except OSError:
        return ()


if __name__ == "__main__":
    main()
