"""Why AC/DC trails where it does: its schedule varied one knob at a time, at the accuracy benchmark's budget.

Same tasks, optimizer, learning-rate schedule and epochs as ``benchmarks/accuracy.py``; only AC/DC's options change:
phase lengths (the benchmark gives a short run 1-epoch phases and a 2-epoch final sparse phase), the momentum reset
at each decompression, the official proportions (warm-up 10%, phases 5%, final 15%), and the layer distribution
(AC/DC ranks globally by default, GMP per layer). GMP's row is the reference it is compared with in the accuracy
table.

    python benchmarks/acdc_ablation.py                              # fmnist-mlp and fmnist-lenet5 at 0.9, 3 seeds
    python benchmarks/acdc_ablation.py --tasks mnist1d-convbase --sparsity 0.95

Results: benchmarks/results/acdc_ablation/table.md and runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import COMMON, TASKS, method_options  # noqa: E402

from sparsetrain.train.config import resolve  # noqa: E402
from sparsetrain.train.loop import Run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "acdc_ablation"


def variants(epochs: int) -> dict[str, tuple[str, dict]]:
    """name -> (method, options); the first AC/DC row is the accuracy benchmark's own schedule."""
    base = method_options("acdc", epochs)
    unit = base["warmup"]
    return {
        "gmp (reference)": ("gmp", method_options("gmp", epochs)),
        "acdc as benchmarked": ("acdc", base),
        "acdc final 3 units": ("acdc", {**base, "final": 3 * unit}),
        "acdc final 4 units": ("acdc", {**base, "final": 4 * unit}),
        "acdc warm-up 2 units": ("acdc", {**base, "warmup": 2 * unit}),
        "acdc no momentum reset": ("acdc", {**base, "reset_momentum": False}),
        "acdc official proportions": ("acdc", {}),
        # GMP ranks per layer (uniform, as Zhu & Gupta), AC/DC globally by default: swap them to see what it does.
        "acdc uniform distribution": ("acdc", {**base, "distribution": "uniform"}),
        "gmp global distribution": ("gmp", {**method_options("gmp", epochs), "distribution": "global"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["fmnist-mlp", "fmnist-lenet5"])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.perf_counter()
    for task in args.tasks:
        spec = TASKS[task]
        for name, (method, options) in variants(spec["epochs"]).items():
            for seed in args.seeds:
                run_dir = out / "runs" / task / f"{name.replace(' ', '_')}-seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                config = resolve(None, {**COMMON, **spec, "threads": args.threads, "method": method,
                                        "sparsity": args.sparsity, "seed": seed, "method_options": options,
                                        "out": str(run_dir)})  # fmt: skip
                summary = Run(config).run()
                dense = summary["dense_model"]
                rows.append({"task": task, "variant": name, "seed": seed,
                             "test_acc": summary["sparse_model"]["test_acc"],
                             "dense_test_acc": dense["test_acc"] if dense and method == "acdc" else None,
                             "train_flops_ratio": summary["train_flops_ratio"]})  # fmt: skip
                print(f"{time.perf_counter() - start:6.0f}s {task} {name} seed {seed}: {rows[-1]['test_acc']:.2f}",
                      flush=True)  # fmt: skip
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = []
    for task in args.tasks:
        lines += [f"\n**{task}** at {args.sparsity:g} ({TASKS[task]['epochs']} epochs, n = {len(args.seeds)} seeds)\n",
                  "| variant | sparse test acc | dense twin | train FLOPs |", "|---|---|---|---|"]  # fmt: skip
        for name in variants(TASKS[task]["epochs"]):
            picked = [r for r in rows if r["task"] == task and r["variant"] == name]
            accs = [r["test_acc"] for r in picked]
            twins = [r["dense_test_acc"] for r in picked if r["dense_test_acc"] is not None]
            twin = f"{statistics.mean(twins):.2f} +- {statistics.pstdev(twins):.2f}" if twins else "-"
            flops = statistics.mean(r["train_flops_ratio"] for r in picked)
            lines.append(f"| {name} | {statistics.mean(accs):.2f} +- {statistics.pstdev(accs):.2f} | {twin} | "
                         f"{flops:.2f} |")  # fmt: skip
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
