"""One-shot pruning of a trained model: OBC / ExactOBS against magnitude, no fine-tuning.

Trains each dense model once (Fashion-MNIST, the trainer's defaults, ``--epochs``), then prunes a copy at each
sparsity with magnitude and with OBC at the same per-layer allocation (``uniform`` and ``global``), drawing the
calibration samples from the training split with each ``--seeds`` value (never the test set). Reported per row:
test accuracy of the pruned model (batch norm re-calibrated where the model has it), the layer-wise
reconstruction error ||W X - W' X||^2 / N of every pruned layer on the inputs it receives in the pruned model
(the same definition for both methods), and the time OBC took.

    python benchmarks/oneshot.py                                  # LeNet-300-100 and LeNet-5, 3 seeds
    python benchmarks/oneshot.py --models mlp --seeds 0 --sparsities 0.5 0.9

Results go to benchmarks/results/oneshot/ (one JSON line per row and a markdown table).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sparsetrain.oneshot import norm_modules, prune_obc, prune_oneshot, recalibrate_batchnorm
from sparsetrain.train.config import resolve
from sparsetrain.train.data import load_dataset
from sparsetrain.train.evaluation import evaluate
from sparsetrain.train.loop import Run

RESULTS = Path(__file__).parent / "results" / "oneshot"


def train_dense(model_name: str, epochs: int, out: Path) -> nn.Module:
    """The dense model to prune: trained once, then read back from its run folder."""
    run_dir = out / f"dense-{model_name}-{epochs}ep"
    if not (run_dir / "sparse_final.pt").exists():
        config = resolve(None, {"method": "dense", "model": model_name, "dataset": "fashion-mnist", "epochs": epochs,
                                "plots": False, "threads": 2, "out": str(run_dir)})  # fmt: skip
        Run(config).run()
    from sparsetrain.train.checkpoint import load, restore_model

    path = run_dir / "sparse_final.pt"
    return restore_model(load(path), str(path))


def calibration_batches(train, samples: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(train), generator=generator)[:samples]
    x, y = train[index]
    return list(zip(x.split(128), y.split(128)))


@torch.no_grad()
def layer_errors(dense: nn.Module, pruned: nn.Module, batches) -> dict[str, float]:
    """||W X - W' X||^2 / N per pruned Linear/Conv2d, X the inputs each layer receives in the pruned model."""
    dense_modules = dict(dense.named_modules())
    sums: dict[str, float] = {}
    count = 0
    handles = []

    def hook(name: str):
        def record(module, inputs, output):
            reference = type(module).forward(_with_weight(module, dense_modules[name].weight), inputs[0])
            sums[name] = sums.get(name, 0.0) + float((output - reference).pow(2).sum())

        return record

    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(hook(name)))
    pruned.eval()
    for x, _ in batches:
        pruned(x)
        count += len(x)
    for handle in handles:
        handle.remove()
    return {name: total / count for name, total in sums.items()}


def _with_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    twin = copy.copy(module)
    twin._parameters = {**module._parameters, "weight": weight}
    return twin


def prune_and_score(dense, method, sparsity, distribution, batches, splits) -> dict:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    target = None if isinstance(sparsity, str) else sparsity  # an N:M mask type fixes the sparsity itself
    if method == "obc":
        prune_obc(model, target, batches, distribution=distribution, mask_type=_mask_type(sparsity))
    else:
        prune_oneshot(model, target, distribution=distribution, mask_type=_mask_type(sparsity))
    seconds = time.perf_counter() - start
    if norm_modules(model):
        recalibrate_batchnorm(model, batches, num_samples=1000)
    test = evaluate(model, splits.test, 1000, torch.device("cpu"))
    errors = layer_errors(dense, model, batches)
    return {"test_acc": test["acc"], "layer_errors": errors, "seconds": seconds}


def _mask_type(sparsity) -> str:
    return sparsity if isinstance(sparsity, str) else "unstructured"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "0.9", "0.95", "2:4"])
    parser.add_argument("--distributions", nargs="+", default=["uniform", "global"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("fashion-mnist", val_fraction=0.1, seed=0)  # the trainer's split: calibrate on its train part
    rows = []
    for model_name in args.models:
        dense = train_dense(model_name, args.epochs, out)
        dense_acc = evaluate(dense, splits.test, 1000, torch.device("cpu"))["acc"]
        print(f"{model_name}: dense test accuracy {dense_acc:.2f}", flush=True)
        for text in args.sparsities:
            sparsity = text if ":" in text else float(text)
            distributions = args.distributions if not isinstance(sparsity, str) else ["uniform"]
            for distribution in distributions:
                for seed in args.seeds:
                    batches = calibration_batches(splits.train, args.samples, seed)
                    for method in ("magnitude", "obc"):
                        try:
                            result = prune_and_score(dense, method, sparsity, distribution, batches, splits)
                        except ValueError as error:  # an N:M pattern that does not fit one of the model's layers
                            print(f"{model_name} {text}: skipped ({error})", flush=True)
                            break
                        row = {"model": model_name, "dense_acc": dense_acc, "sparsity": text,
                               "distribution": distribution, "seed": seed, "method": method, **result}  # fmt: skip
                        rows.append(row)
                        with open(out / "rows.jsonl", "a") as handle:
                            handle.write(json.dumps(row) + "\n")
                        worst = max(result["layer_errors"].values())
                        print(f"{model_name:6s} {text:>5s} {distribution:8s} seed {seed} {method:9s} "
                              f"test {result['test_acc']:6.2f}  worst layer error {worst:9.4f}  "
                              f"{result['seconds']:6.1f}s", flush=True)  # fmt: skip
    table = summarize(rows)
    (out / "table.md").write_text(table + "\n")
    print(table)


def summarize(rows: list[dict]) -> str:
    lines = ["| model | sparsity | allocation | magnitude | OBC | OBC / magnitude layer error (max over layers) "
             "| OBC time (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["model"], r["sparsity"], r["distribution"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for model, sparsity, distribution in keys:
        group = [r for r in rows if (r["model"], r["sparsity"], r["distribution"]) == (model, sparsity, distribution)]
        mag = [r for r in group if r["method"] == "magnitude"]
        obc = [r for r in group if r["method"] == "obc"]
        ratios = [max(o["layer_errors"][k] / max(m["layer_errors"][k], 1e-12) for k in o["layer_errors"])
                  for o, m in zip(obc, mag)]  # fmt: skip

        def stat(values):
            return f"{statistics.mean(values):.2f} +- {statistics.pstdev(values):.2f}"

        lines.append(f"| {model} | {sparsity} | {distribution} | {stat([r['test_acc'] for r in mag])} | "
                     f"{stat([r['test_acc'] for r in obc])} | {max(ratios):.3f} | "
                     f"{statistics.mean(r['seconds'] for r in obc):.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
