"""Accuracy at equal budget: every method, every sparsity, several seeds, three real tasks.

Every run uses the same trainer, model, data, optimizer, learning-rate schedule and number of epochs; only the
method differs. Reported: test accuracy of the sparse model (mean +- std over seeds), AC/DC's dense twin, and
training FLOPs relative to dense training.

    python benchmarks/accuracy.py                       # the full grid (about 40 minutes on 2 cores)
    python benchmarks/accuracy.py --quick               # one task, one seed, two sparsities (under 3 minutes)
    python benchmarks/accuracy.py --tasks mnist1d-convbase --seeds 0 1 2 --methods acdc gmp

Runs already recorded in runs.jsonl are reused, so an interrupted grid continues where it stopped; --fresh starts over.

Results go to benchmarks/results/accuracy/ (one JSON line per run, a markdown table, a plot per task).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from sparsetrain.train.config import resolve
from sparsetrain.train.loop import Run

RESULTS = Path(__file__).parent / "results" / "accuracy"
METHODS = ("dense", "static", "gmp", "rigl", "set", "gap", "imp", "acdc")
SPARSITIES = (0.8, 0.9, 0.95, 0.98)

# Budgets chosen so the full grid fits in about 40 minutes on 2 cores; every method gets the same one.
TASKS = {
    "fmnist-mlp": dict(dataset="fashion-mnist", model="mlp", epochs=10, limit_train=30000, batch_size=128),
    "fmnist-lenet5": dict(dataset="fashion-mnist", model="lenet5", epochs=10, limit_train=15000, batch_size=128),
    "mnist1d-convbase": dict(dataset="mnist1d", model="convbase", epochs=40, batch_size=100),
}
COMMON = dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine",
              threads=2, plots=False)  # fmt: skip


def method_options(method: str, epochs: int) -> dict:
    """Each method's schedule scaled to the run, the same rule for every task."""
    if method == "acdc":
        # 10% warm-up, 10% compressed / 10% decompressed phases, final 20% sparse (whole epochs).
        unit = max(1, epochs // 10)
        return {"unit": "epochs", "warmup": unit, "compressed": unit, "decompressed": unit, "final": 2 * unit}
    if method == "gmp":
        return {"start": 0.1, "end": 0.7}
    if method in ("rigl", "set"):
        return {"delta": 100}
    if method == "gap":
        return {"groups": 3, "rounds": 1}
    if method == "imp":
        return {"rounds": 3, "retrain": "lrw"}
    return {}


def run_one(task: str, method: str, sparsity: float, seed: int, out_root: Path) -> dict:
    spec = TASKS[task]
    out = out_root / task / f"{method}-s{sparsity:g}-seed{seed}"
    config = resolve(None, {**COMMON, **spec, "method": method, "sparsity": sparsity, "seed": seed,
                            "method_options": method_options(method, spec["epochs"]), "out": str(out)})  # fmt: skip
    if out.exists():
        for child in out.iterdir():
            child.unlink()
    start = time.perf_counter()
    summary = Run(config).run()
    dense = summary["dense_model"]
    return {
        "task": task, "method": method, "sparsity": sparsity, "seed": seed,
        "test_acc": summary["sparse_model"]["test_acc"], "measured_sparsity": summary["sparse_model"]["sparsity"],
        "dense_test_acc": dense["test_acc"] if dense and method != "dense" else None,
        "train_flops_ratio": summary["train_flops_ratio"], "seconds": time.perf_counter() - start,
    }  # fmt: skip


def table(rows: list[dict], tasks: list[str], methods: list[str], sparsities: list[float]) -> str:
    lines = []
    for task in tasks:
        dense = [r["test_acc"] for r in rows if r["task"] == task and r["method"] == "dense"]
        dense_text = f"{statistics.mean(dense):.2f} +- {statistics.pstdev(dense):.2f}" if dense else "-"
        lines += [f"\n**{task}** ({TASKS[task]['epochs']} epochs; dense: {dense_text}; n = seeds)\n",
                  "| method | " + " | ".join(f"{s:g}" for s in sparsities) + " | train FLOPs at 0.9 |",
                  "|---|" + "---|" * (len(sparsities) + 1)]  # fmt: skip
        for method in methods:
            if method == "dense":
                continue
            cells = []
            for s in sparsities:
                accs = [r["test_acc"] for r in rows if (r["task"], r["method"], r["sparsity"]) == (task, method, s)]
                cells.append(f"{statistics.mean(accs):.2f} +- {statistics.pstdev(accs):.2f} (n={len(accs)})"
                             if accs else "-")  # fmt: skip
            key = (task, method, 0.9)
            flops = [r["train_flops_ratio"] for r in rows if (r["task"], r["method"], r["sparsity"]) == key]
            flops_text = f"{statistics.mean(flops):.2f}" if flops else "-"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {flops_text} |")
        twins = []
        for s in sparsities:
            accs = [r["dense_test_acc"] for r in rows if (r["task"], r["method"], r["sparsity"]) == (task, "acdc", s)
                    and r["dense_test_acc"] is not None]  # fmt: skip
            twins.append(f"{statistics.mean(accs):.2f} +- {statistics.pstdev(accs):.2f}" if accs else "-")
        lines.append("| acdc dense twin | " + " | ".join(twins) + " | |")
    return "\n".join(lines)


def plot(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [r["test_acc"] for r in rows if r["task"] == task and r["method"] == "dense"]
    if dense:
        ax.axhline(statistics.mean(dense), color="k", ls="--", lw=1, label="dense")
    for method in sorted({r["method"] for r in rows if r["task"] == task} - {"dense"}):
        points = sorted({r["sparsity"] for r in rows if r["task"] == task and r["method"] == method})
        accs = [[r["test_acc"] for r in rows if (r["task"], r["method"], r["sparsity"]) == (task, method, s)]
                for s in points]  # fmt: skip
        ax.errorbar(points, [statistics.mean(a) for a in accs], yerr=[statistics.pstdev(a) for a in accs],
                    marker="o", capsize=3, label=method)  # fmt: skip
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task}: accuracy at equal budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one task, one seed, sparsities 0.9 and 0.98")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--fresh", action="store_true",
                        help="rerun every run; by default runs already in runs.jsonl are kept (an interrupted grid "
                             "continues where it stopped)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.seeds, args.sparsities = ["mnist1d-convbase"], [0], [0.9, 0.98]
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "runs.jsonl"
    if args.fresh and log_path.exists():
        log_path.unlink()
    done = {}
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            row = json.loads(line)
            done[(row["task"], row["method"], row["sparsity"], row["seed"])] = row
    rows: list[dict] = []
    start = time.perf_counter()
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                for sparsity in [0.0] if method == "dense" else args.sparsities:
                    if (task, method, sparsity, seed) in done:
                        rows.append(done[(task, method, sparsity, seed)])
                        continue
                    row = run_one(task, method, sparsity, seed, out / "runs")
                    rows.append(row)
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    print(f"{time.perf_counter() - start:7.0f}s {task:17s} {method:7s} s={sparsity:<5g} seed={seed} "
                          f"test {row['test_acc']:.2f}" + (f" dense twin {row['dense_test_acc']:.2f}"
                                                           if row["dense_test_acc"] else ""), flush=True)  # fmt: skip
    text = table(rows, args.tasks, args.methods, args.sparsities)
    (out / "table.md").write_text(text + "\n")
    for task in args.tasks:
        plot(rows, task, out / f"{task}.png")
    print(text)
    print(f"\ntotal {time.perf_counter() - start:.0f}s; results in {out}")


if __name__ == "__main__":
    main()
