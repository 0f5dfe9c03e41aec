"""AC/DC's study options, one knob at a time, against the paper's AC/DC, GMP and dense training.

Every run has the accuracy benchmark's trainer, optimizer, learning-rate schedule and AC/DC timeline (10% warm-up,
10% compressed and decompressed phases, final 20%, in whole epochs: ``accuracy.method_options``); only one option
of ``acdc`` changes per row (``dead_units``, ``layer_floor``, ``ramp``, ``score``; see the ``ACDC`` docstring).
Reported per row: the sparse model's test accuracy, the dense twin's (AC/DC's best decompressed model), the training
FLOPs relative to dense training, and the gaps the targets are about (sparse - gmp, twin - dense).

    python benchmarks/acdc_study.py                                  # the budget of the BENCHMARKS.md table
    python benchmarks/acdc_study.py --limit-train 30000 --seeds 0 1 2 --sparsities 0.8 0.9 0.95 0.98

Default budget: LeNet-300-100 (``mlp``) on Fashion-MNIST, 10 epochs on 15000 training samples, one seed, 90% and
98%. Results: benchmarks/results/acdc_study/table.md and runs.jsonl (runs already there are reused; --fresh reruns).
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
from accuracy import COMMON, method_options  # noqa: E402

from sparsetrain.train.config import resolve  # noqa: E402
from sparsetrain.train.loop import Run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "acdc_study"


def variants(epochs: int) -> dict[str, tuple[str, dict]]:
    """Row name -> (method, options). 'acdc paper' is the accuracy benchmark's AC/DC; each other acdc row adds one."""
    base = method_options("acdc", epochs)
    return {
        "dense": ("dense", {}),
        "gmp": ("gmp", method_options("gmp", epochs)),
        "acdc paper": ("acdc", base),
        "dead_units=reinit": ("acdc", {**base, "dead_units": "reinit"}),
        "dead_units=revive": ("acdc", {**base, "dead_units": "revive"}),
        "layer_floor=0.01": ("acdc", {**base, "layer_floor": 0.01}),
        "ramp=3": ("acdc", {**base, "ramp": 3}),
        "score=normalized": ("acdc", {**base, "score": "normalized"}),
        "score=taylor": ("acdc", {**base, "score": "taylor"}),
        # The knob found before this study (a longer dense warm-up), and the single knobs that helped, combined.
        "warm-up 2 units": ("acdc", {**base, "warmup": 2 * base["warmup"]}),
        "ramp=3 + layer_floor=0.01 + reinit": (
            "acdc", {**base, "ramp": 3, "layer_floor": 0.01, "dead_units": "reinit"}
        ),
        "layer_floor=0.01 + reinit": ("acdc", {**base, "layer_floor": 0.01, "dead_units": "reinit"}),
        "layer_floor=0.01 + warm-up 2 units": ("acdc", {**base, "layer_floor": 0.01, "warmup": 2 * base["warmup"]}),
    }


def run_one(name: str, method: str, options: dict, spec: dict, sparsity: float, seed: int, out: Path) -> dict:
    run_dir = out / "runs" / f"{name.replace('=', '-')}-s{sparsity:g}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = resolve(None, {**COMMON, **spec, "method": method, "sparsity": sparsity, "seed": seed,
                            "method_options": options, "out": str(run_dir)})  # fmt: skip
    summary = Run(config).run()
    dense = summary["dense_model"]
    return {"variant": name, "sparsity": sparsity, "seed": seed, "test_acc": summary["sparse_model"]["test_acc"],
            "dense_test_acc": dense["test_acc"] if dense and method == "acdc" else None,
            "train_flops_ratio": summary["train_flops_ratio"]}  # fmt: skip


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def spread(values: list[float]) -> str:
    """Mean, and +- the population std over seeds when there are several."""
    return f"{statistics.mean(values):.2f}" + (f" +- {statistics.pstdev(values):.2f}" if len(values) > 1 else "")


def table(rows: list[dict], names: list[str], sparsities: list[float], header: str) -> str:
    lines = [header]
    dense = mean([r["test_acc"] for r in rows if r["variant"] == "dense"])
    for s in sparsities:
        at = [r for r in rows if r["sparsity"] == s]
        gmp = mean([r["test_acc"] for r in at if r["variant"] == "gmp"])
        n = len({r["seed"] for r in at})
        dense_text = spread([r["test_acc"] for r in rows if r["variant"] == "dense"])
        lines += [f"\n**{s:g} sparsity** (dense: {dense_text}; n = {n} seed{'s' if n > 1 else ''})\n",
                  "| variant | sparse test acc | sparse - gmp | dense twin | twin - dense | train FLOPs |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name in names:
            picked = [r for r in at if r["variant"] == name]
            if not picked:
                continue
            accs = [r["test_acc"] for r in picked]
            twins = [r["dense_test_acc"] for r in picked if r["dense_test_acc"] is not None]
            flops = mean([r["train_flops_ratio"] for r in picked])
            gap = f"{mean(accs) - gmp:+.2f}" if gmp is not None and name != "gmp" else "-"
            twin_gap = f"{mean(twins) - dense:+.2f}" if twins and dense is not None else "-"
            twin_text = spread(twins) if twins else "-"
            lines.append(f"| {name} | {spread(accs)} | {gap} | {twin_text} | {twin_gap} | {flops:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.98])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit-train", type=int, default=15000)
    parser.add_argument("--variants", nargs="+", default=None, help="row names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--fresh", action="store_true", help="rerun the runs already recorded in runs.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    spec = dict(dataset="fashion-mnist", model="mlp", epochs=args.epochs, limit_train=args.limit_train,
                batch_size=128, threads=args.threads)  # fmt: skip
    table_variants = variants(args.epochs)
    names = args.variants or list(table_variants)
    unknown = sorted(set(names) - set(table_variants))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; known: {', '.join(table_variants)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    if args.fresh and log_path.exists():
        log_path.unlink()
    done = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["variant"], row["sparsity"], row["seed"])] = row
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        for name in names:
            method, options = table_variants[name]
            for sparsity in [0.0] if method == "dense" else args.sparsities:
                key = (name, sparsity, seed)
                if key not in done:
                    done[key] = run_one(name, method, options, spec, sparsity, seed, out)
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(done[key]) + "\n")
                    print(f"{time.perf_counter() - start:6.0f}s {name} s={sparsity:g} seed {seed}: "
                          f"{done[key]['test_acc']:.2f} twin {done[key]['dense_test_acc']}", flush=True)  # fmt: skip
                rows.append(done[key])
    header = (f"LeNet-300-100 (`mlp`) on Fashion-MNIST, {args.epochs} epochs on {args.limit_train} training samples, "
              f"seeds {', '.join(map(str, args.seeds))}")  # fmt: skip
    text = table(rows, names, args.sparsities, header)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
