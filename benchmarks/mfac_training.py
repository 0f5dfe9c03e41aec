"""M-FAC during training: the gradual ``mfac`` method against ``gmp``, and the MFAC optimizer against SGD and Adam.

Part ``gradual``: the accuracy grid's ``fmnist-mlp`` task (LeNet-300-100, Fashion-MNIST, 30k training samples, the
grid's SGD settings and GMP schedule: pruning from 10% to 70% of training), ``gmp`` and ``mfac`` (its defaults:
16 recorded gradients, blocks of 2048, damp 1e-4) at each sparsity, ``--epochs`` (the grid uses 10). Reported:
test accuracy, wall time and training FLOPs relative to dense.

Part ``optimizer``: the same task trained dense by SGD (the grid's settings), Adam (lr 1e-3) and
``sparsetrain.optim.MFAC`` (momentum 0.9, ``--mfac-ngrads`` 128, ``--mfac-lr`` 0.002, ``--mfac-damp`` 0.01: chosen on
the validation split, see BENCHMARKS.md), all with the cosine schedule, in one plain loop, for each of ``--seeds``
(the seed draws the initial weights and the batch order); test accuracy (mean +- std over the seeds) and time per
optimizer step (the step only, and the whole training step) against SGD.

    python benchmarks/mfac_training.py gradual --epochs 5 --seeds 0 1 2 --threads 1
    python benchmarks/mfac_training.py optimizer --epochs 3 --seeds 0 1 2 --threads 1

``--task`` picks another task of the grid (e.g. ``fmnist-lenet5``: LeNet-5, 15k training samples), same settings.

Results: benchmarks/results/mfac_training/{gradual,optimizer}.jsonl and .md (``-<task>`` appended to the names
for tasks other than fmnist-mlp).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path

import torch
from accuracy import COMMON, TASKS
from torch import nn

from sparsetrain.optim import MFAC
from sparsetrain.train.config import resolve
from sparsetrain.train.data import iterate_batches, load_dataset
from sparsetrain.train.evaluation import evaluate
from sparsetrain.train.loop import Run
from sparsetrain.train.models import build_model, model_spec

RESULTS = Path(__file__).parent / "results" / "mfac_training"


def stem(args: argparse.Namespace, part: str) -> str:
    """Results file name: the part, with the task appended for tasks other than fmnist-mlp (the first one run)."""
    return part if args.task == "fmnist-mlp" else f"{part}-{args.task}"


def gradual(args: argparse.Namespace, out: Path) -> str:
    rows = []
    for seed in args.seeds:
        for sparsity in args.sparsities:
            for method in ("gmp", "mfac"):
                run_dir = out / "runs" / f"{args.task}-{method}-s{sparsity:g}-seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)
                config = resolve(None, {**COMMON, **TASKS[args.task], "epochs": args.epochs, "method": method,
                                        "sparsity": sparsity, "seed": seed, "progress": False,
                                        "method_options": {"start": 0.1, "end": 0.7}, "out": str(run_dir),
                                        "threads": args.threads})  # fmt: skip
                start = time.perf_counter()
                summary = Run(config).run()
                row = {"task": args.task, "method": method, "sparsity": sparsity, "seed": seed, "epochs": args.epochs,
                       "test_acc": summary["sparse_model"]["test_acc"], "seconds": time.perf_counter() - start,
                       "train_flops_ratio": summary["train_flops_ratio"]}  # fmt: skip
                rows.append(row)
                with open(out / f"{stem(args, 'gradual')}.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"{method:5s} {sparsity:<5g} seed {seed} test {row['test_acc']:.2f} {row['seconds']:.1f}s "
                      f"flops {row['train_flops_ratio']:.3f}", flush=True)  # fmt: skip
    lines = ["| sparsity | gmp acc | mfac acc | mfac / gmp wall time | train FLOPs gmp | train FLOPs mfac |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for sparsity in args.sparsities:

        def pick(method, key, sparsity=sparsity):
            return [r[key] for r in rows if (r["method"], r["sparsity"]) == (method, sparsity)]

        lines.append(f"| {sparsity:g} | {statistics.mean(pick('gmp', 'test_acc')):.2f} | "
                     f"{statistics.mean(pick('mfac', 'test_acc')):.2f} | "
                     f"{sum(pick('mfac', 'seconds')) / sum(pick('gmp', 'seconds')):.2f} | "
                     f"{statistics.mean(pick('gmp', 'train_flops_ratio')):.3f} | "
                     f"{statistics.mean(pick('mfac', 'train_flops_ratio')):.3f} |")  # fmt: skip
    return "\n".join(lines)


def optimizer_part(args: argparse.Namespace, out: Path) -> str:
    task = TASKS[args.task]
    splits = load_dataset(task["dataset"], val_fraction=0.1, seed=0, limit_train=task.get("limit_train"))
    makers = {
        "sgd": lambda p: torch.optim.SGD(p, lr=COMMON["lr"], momentum=COMMON["momentum"], nesterov=True,
                                         weight_decay=COMMON["weight_decay"]),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
        "mfac": lambda p: MFAC(p, lr=args.mfac_lr, momentum=0.9, weight_decay=COMMON["weight_decay"],
                               damp=args.mfac_damp, ngrads=args.mfac_ngrads),
    }  # fmt: skip
    rows = []
    for seed, (name, make) in itertools.product(args.seeds, makers.items()):
        torch.manual_seed(seed)
        model = build_model(**model_spec(task["model"], tuple(splits.train.tensors[0].shape[1:]), 10))
        optimizer = make(model.parameters())
        steps_per_epoch = -(-len(splits.train) // task["batch_size"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * steps_per_epoch)
        step_seconds, total_seconds, steps = 0.0, 0.0, 0
        for epoch in range(args.epochs):
            for x, y in iterate_batches(splits.train, task["batch_size"], shuffle=True, seed=seed, epoch=epoch):
                begin = time.perf_counter()
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                middle = time.perf_counter()
                optimizer.step()
                schedule.step()
                end = time.perf_counter()
                step_seconds += end - middle
                total_seconds += end - begin
                steps += 1
        acc = evaluate(model, splits.test, 1000, torch.device("cpu"))["acc"]
        row = {"task": args.task, "optimizer": name, "seed": seed, "epochs": args.epochs, "mfac_lr": args.mfac_lr,
               "mfac_damp": args.mfac_damp, "mfac_ngrads": args.mfac_ngrads,
               "test_acc": acc, "step_ms": 1000 * step_seconds / steps,
               "train_step_ms": 1000 * total_seconds / steps}  # fmt: skip
        rows.append(row)
        with open(out / f"{stem(args, 'optimizer')}.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{name:5s} seed {seed} test {acc:.2f} optimizer step {row['step_ms']:.2f} ms, training step "
              f"{row['train_step_ms']:.2f} ms", flush=True)  # fmt: skip

    def pick(name, key):
        return [r[key] for r in rows if r["optimizer"] == name]

    sgd_ms = statistics.mean(pick("sgd", "train_step_ms"))
    lines = ["| optimizer | test acc (mean +- std) | per seed | optimizer step (ms) | training step (ms) | "
             "training step / SGD's |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in makers:
        accs = pick(name, "test_acc")
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.2f} +- {spread:.2f} | "
                     f"{' / '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(pick(name, 'step_ms')):.2f} | "
                     f"{statistics.mean(pick(name, 'train_step_ms')):.2f} | "
                     f"{statistics.mean(pick(name, 'train_step_ms')) / sgd_ms:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("gradual", "optimizer"))
    parser.add_argument("--task", choices=sorted(TASKS), default="fmnist-mlp", help="a task of the accuracy grid")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--mfac-lr", type=float, default=0.002)
    parser.add_argument("--mfac-damp", type=float, default=0.01)
    parser.add_argument("--mfac-ngrads", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the accuracy grid's runs use 2)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = gradual(args, out) if args.part == "gradual" else optimizer_part(args, out)
    (out / f"{stem(args, args.part)}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
