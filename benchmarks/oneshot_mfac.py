"""One-shot M-FAC against global magnitude on trained models, no fine-tuning (three calibration draws).

The same dense LeNet-300-100 and LeNet-5 as ``benchmarks/oneshot.py`` (Fashion-MNIST, the trainer's defaults,
``--epochs``, trained once and cached in the results folder), pruned to each sparsity by global magnitude (the
default of ``sparsetrain prune``) and by ``prune_mfac`` with its defaults (m = 256 per-sample gradients, one
block, damp 1% of the mean Fisher diagonal; global saliency ranking, the same allocation rule as global
magnitude). Each ``--seeds`` value draws other calibration samples from the training split (never the test set).
Reported: test accuracy and loss, and M-FAC's time for the whole model. The models have no batch norm, so there is
nothing to re-calibrate.

    python benchmarks/oneshot_mfac.py                             # both models, 50/70/90/95%, 3 draws
    python benchmarks/oneshot_mfac.py --models mlp --seeds 0 --gradients 64 --block 2048

Results go to benchmarks/results/oneshot_mfac/ (one JSON line per row and a markdown table).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from oneshot import calibration_batches, train_dense

from sparsetrain.oneshot import prune_mfac, prune_oneshot
from sparsetrain.oneshot.mfac import DEFAULT_GRADIENTS
from sparsetrain.train.data import load_dataset
from sparsetrain.train.evaluation import evaluate

RESULTS = Path(__file__).parent / "results" / "oneshot_mfac"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9, 0.95])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--gradients", type=int, default=DEFAULT_GRADIENTS)
    parser.add_argument("--block", type=int, default=None)
    parser.add_argument("--damp", type=float, default=None)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--dense-dir", default=None, help="where the dense runs are cached (default: --out)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cpu = torch.device("cpu")
    splits = load_dataset("fashion-mnist", val_fraction=0.1, seed=0)  # the trainer's split: calibrate on its train part
    rows = []
    for model_name in args.models:
        dense = train_dense(model_name, args.epochs, Path(args.dense_dir or out))
        dense_result = evaluate(dense, splits.test, 1000, cpu)
        print(f"{model_name}: dense test accuracy {dense_result['acc']:.2f}", flush=True)
        for sparsity in args.sparsities:
            model = copy.deepcopy(dense)
            prune_oneshot(model, sparsity)  # deterministic: one row, whatever the draw
            result = evaluate(model, splits.test, 1000, cpu)
            runs = [{"method": "magnitude", "seed": None, "test_acc": result["acc"], "test_loss": result["loss"],
                     "seconds": 0.0}]  # fmt: skip
            for seed in args.seeds:
                batches = calibration_batches(splits.train, args.gradients, seed)
                model = copy.deepcopy(dense)
                report: dict = {}
                start = time.perf_counter()
                prune_mfac(model, sparsity, batches, num_gradients=args.gradients, block_size=args.block,
                           damp=args.damp, report=report)
                seconds = time.perf_counter() - start
                result = evaluate(model, splits.test, 1000, cpu)
                runs.append({"method": "mfac", "seed": seed, "test_acc": result["acc"], "test_loss": result["loss"],
                             "seconds": seconds, "damp": report["damp"]})  # fmt: skip
            for run in runs:
                row = {"model": model_name, "dense_acc": dense_result["acc"], "sparsity": sparsity,
                       "gradients": args.gradients, "block": args.block, **run}  # fmt: skip
                rows.append(row)
                with open(out / "rows.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{model_name:6s} {sparsity:<5g} {run['method']:9s} seed {run['seed']} "
                      f"test {run['test_acc']:6.2f} loss {run['test_loss']:.3f} {run['seconds']:6.1f}s", flush=True)
    table = summarize(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)


def summarize(rows: list[dict]) -> str:
    lines = ["| model | sparsity | magnitude acc | M-FAC acc | magnitude loss | M-FAC loss | M-FAC time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["model"], r["sparsity"]) for r in rows})

    def stat(values):
        return f"{statistics.mean(values):.2f} +- {statistics.pstdev(values):.2f}"

    for model, sparsity in keys:
        mag = [r for r in rows if (r["model"], r["sparsity"], r["method"]) == (model, sparsity, "magnitude")]
        mfac = [r for r in rows if (r["model"], r["sparsity"], r["method"]) == (model, sparsity, "mfac")]
        lines.append(f"| {model} | {sparsity:g} | {mag[0]['test_acc']:.2f} | {stat([r['test_acc'] for r in mfac])} | "
                     f"{mag[0]['test_loss']:.3f} | {statistics.mean(r['test_loss'] for r in mfac):.3f} | "
                     f"{statistics.mean(r['seconds'] for r in mfac):.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
