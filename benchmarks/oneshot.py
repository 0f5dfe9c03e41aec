"""One-shot pruning of a trained model: OBC / ExactOBS against magnitude, no fine-tuning.

Trains each dense model once (Fashion-MNIST, the trainer's defaults, ``--epochs``), then prunes a copy at each
sparsity with magnitude and with OBC at the same per-layer allocation (``uniform`` and ``global``), drawing the
calibration samples from the training split with each ``--seeds`` value (never the test set). Reported per row:
test accuracy of the pruned model (batch norm re-calibrated where the model has it), the layer-wise
reconstruction error ||W X - W' X||^2 / N of every pruned layer on the inputs it receives in the pruned model
(the same definition for both methods), and the time OBC took.

    python benchmarks/oneshot.py                                  # LeNet-300-100 and LeNet-5, 3 seeds
    python benchmarks/oneshot.py --models mlp --seeds 0 --sparsities 0.5 0.9
    python benchmarks/oneshot.py --models lenet5 --distributions database   # default against default

``--distributions database`` compares the defaults: magnitude at its global allocation against ``prune_obc`` with
``allocation="database"`` (per-layer levels from the OBC database at the same total zeros, or OBC at magnitude's
allocation when its calibration loss is lower), the database cached per model and draw under ``runs/``.

``--mode database``: the OBC database of each model (every layer at the default grid of 12 sparsities), its build
time and the peak resident memory of the process that builds it (a fresh process per model, ``ru_maxrss``).

``--mode spdy``: SPDY (Frantar & Alistarh, ICML 2022) on the wide MLP 784-2048-2048-10 (``mlp-wide``) trained
``--epochs`` on Fashion-MNIST: the profile for ``--target-speedup`` at ``--batch-size``, calibrated on the whole
model's measured speed-up (``prune_spdy``'s default: every calibration step is printed and recorded), its
predicted speed-up, the measured one the calibration kept it on, and a fresh measurement (``measure_speedup``:
``to_sparse_kernels`` and paired timing, median of ``--repeats``), and its accuracy against every uniform profile
of the same database (all layers at one sparsity), measured the same way; the uniform profile whose measured
speed-up is closest to SPDY's is the comparison.

    python benchmarks/oneshot.py --mode database --models lenet5 mlp
    python benchmarks/oneshot.py --mode spdy --epochs 1 --target-speedup 2 --batch-size 1

Results go to benchmarks/results/oneshot/ (one JSON line per row and a markdown table per mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from sparsetrain.oneshot import (
    DEFAULT_GRID,
    build_database,
    measure_speedup,
    norm_modules,
    prune_obc,
    prune_oneshot,
    prune_spdy,
    recalibrate_batchnorm,
)
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


def prune_and_score(dense, method, sparsity, distribution, batches, splits, database=None) -> dict:
    """``distribution`` 'database' is default against default: magnitude at its global allocation against
    ``prune_obc(allocation="database")`` at the same total sparsity (its database cached at ``database``)."""
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    target = None if isinstance(sparsity, str) else sparsity  # an N:M mask type fixes the sparsity itself
    if method == "obc" and distribution == "database":
        prune_obc(model, target, batches, distribution="global", allocation="database", database=database)
    elif method == "obc":
        prune_obc(model, target, batches, distribution=distribution, mask_type=_mask_type(sparsity))
    else:
        prune_oneshot(model, target, mask_type=_mask_type(sparsity),
                      distribution="global" if distribution == "database" else distribution)
    seconds = time.perf_counter() - start
    if norm_modules(model):
        recalibrate_batchnorm(model, batches, num_samples=1000)
    test = evaluate(model, splits.test, 1000, torch.device("cpu"))
    errors = layer_errors(dense, model, batches)
    return {"test_acc": test["acc"], "layer_errors": errors, "seconds": seconds}


def _mask_type(sparsity) -> str:
    return sparsity if isinstance(sparsity, str) else "unstructured"


def _build_in_child(model_name: str, epochs: int, out: str, samples: int, seed: int, cache: str, grid, queue) -> None:
    """Run in a fresh process: the peak resident memory it reports is the database build's own."""
    torch.set_num_threads(2)
    splits = load_dataset("fashion-mnist", val_fraction=0.1, seed=0)
    dense = train_dense(model_name, epochs, Path(out))
    batches = calibration_batches(splits.train, samples, seed)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    db = build_database(dense, batches, solver="auto", cache=cache, grid=grid)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"seconds": seconds, "peak_rss_mib": peak / 1024, "rss_before_mib": before / 1024,
               "source": db.source, "solvers": db.solvers, "layers": len(db.names), "levels": len(db.grid)})


def database_row(model_name: str, epochs: int, out: Path, samples: int, seed: int, grid=DEFAULT_GRID) -> dict:
    """Build (or load) the model's OBC database in a fresh process; its time and peak memory."""
    levels = "" if tuple(grid) == DEFAULT_GRID else f"-grid{len(grid)}"
    cache = out / "runs" / f"{model_name}-{epochs}ep-seed{seed}{levels}.obcdb.safetensors"
    cache.parent.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_build_in_child,
                            args=(model_name, epochs, str(out), samples, seed, str(cache), tuple(grid), queue))
    child.start()
    result = queue.get()
    child.join()
    return {"model": model_name, "samples": samples, "seed": seed, **result, "cache": str(cache)}


def run_database(args, out: Path) -> None:
    rows = []
    for model_name in args.models:
        row = database_row(model_name, args.epochs, out, args.samples, args.seeds[0])
        rows.append(row)
        with open(out / "database.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{model_name}: database of {row['layers']} layers x {row['levels']} levels ({row['source']}) in "
              f"{row['seconds']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB (before {row['rss_before_mib']:.0f})",
              flush=True)


def run_spdy(args, out: Path, splits) -> None:
    model_name = "mlp-wide"
    seed = args.seeds[0]
    grid = tuple(args.grid) if args.grid else DEFAULT_GRID
    built = database_row(model_name, args.epochs, out, args.samples, seed, grid)
    print(f"{model_name}: database in {built['seconds']:.1f} s ({built['source']}), peak RSS "
          f"{built['peak_rss_mib']:.0f} MiB, solvers {built['solvers']}", flush=True)
    dense = train_dense(model_name, args.epochs, out).eval()
    dense_acc = evaluate(dense, splits.test, 1000, torch.device("cpu"))["acc"]
    batches = calibration_batches(splits.train, args.samples, seed)
    db = build_database(dense, batches, solver="auto", cache=built["cache"], grid=grid)
    sample = torch.cat([x for x, _ in batches])[: args.batch_size]
    model = copy.deepcopy(dense)
    report: dict = {}
    start = time.perf_counter()
    prune_spdy(model, args.target_speedup, batches, batch_size=args.batch_size, database=db,
               candidates=args.candidates, seed=seed, report=report)
    seconds = time.perf_counter() - start
    calibration = report["calibration"]
    print(f"calibration (window {calibration['window'][0]:g}-{calibration['window'][1]:.3g}x): "
          f"{calibration['outcome']}", flush=True)
    for i, step in enumerate(calibration["steps"]):
        how = ("between two measured profiles" if step["refined"] else
               f"asked {step['asked']:.3g}x, budget x{step['budget_scale']:.3f}")
        profile = " / ".join(f"{v:g}" for v in step["levels"].values())
        print(f"  step {step['step']}{' (kept)' if i == calibration['chosen'] else ''}: {how}, profile {profile}, "
              f"predicted {step['predicted']:.2f}x, measured {step['measured']:.2f}x, loss {step['loss']:.4g}",
              flush=True)  # fmt: skip
    spdy_speed = measure_speedup(dense, model, sample, repeats=args.repeats)
    spdy_acc = evaluate(model, splits.test, 1000, torch.device("cpu"))["acc"]
    row = {"mode": "spdy", "model": model_name, "epochs": args.epochs, "dense_acc": dense_acc,
           "threads": torch.get_num_threads(),
           "target": args.target_speedup, "batch_size": args.batch_size, "profile": report["levels"],
           "kernels": report["kernels"], "predicted": report["predicted_speedup"], "measured": spdy_speed,
           "measured_in_calibration": report["measured_speedup"], "calibration": calibration,
           "max_speedup": report["max_speedup"], "test_acc": spdy_acc, "seconds": seconds,
           "candidates": report["candidates"], "calibration_loss": report["calibration_loss"],
           "database_seconds": built["seconds"], "database_peak_rss_mib": built["peak_rss_mib"],
           "solvers": built["solvers"]}  # fmt: skip
    print(f"SPDY {args.target_speedup:g}x at batch {args.batch_size}: profile {report['levels']}, predicted "
          f"{row['predicted']:.2f}x, measured {report['measured_speedup']:.2f}x in calibration, {spdy_speed:.2f}x "
          f"again, test {spdy_acc:.2f} (dense {dense_acc:.2f}); search and calibration {seconds:.1f} s", flush=True)
    uniform = []
    params = dict(model.named_parameters())
    for level, sparsity in enumerate(db.grid):
        if sparsity < 0.5:
            continue
        for name in db.names:
            params[name].data.copy_(db.weights[name][level])
        speed = measure_speedup(dense, model, sample, repeats=args.repeats)
        acc = evaluate(model, splits.test, 1000, torch.device("cpu"))["acc"]
        uniform.append({"sparsity": sparsity, "measured": speed, "test_acc": acc})
        print(f"uniform {sparsity:g}: measured {speed:.2f}x, test {acc:.2f}", flush=True)
    row["uniform"] = uniform
    closest = min(uniform, key=lambda u: abs(u["measured"] - spdy_speed))
    row["uniform_closest"] = closest
    with open(out / "spdy.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    lines = [f"SPDY on {model_name} ({args.epochs} epoch(s), dense {dense_acc:.2f}%), target "
             f"{args.target_speedup:g}x at batch {args.batch_size}:", "",
             "Calibration on the measured speed-up (window "
             f"{calibration['window'][0]:g}-{calibration['window'][1]:.3g}x): {calibration['outcome']}", "",
             "| step | asked | budget scale | per-layer sparsity | predicted | measured | calibration loss |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, step in enumerate(calibration["steps"]):
        asked, scale = ("between", "-") if step["refined"] else (f"{step['asked']:.3g}x", f"{step['budget_scale']:.3f}")
        lines.append(f"| {step['step']}{' (kept)' if i == calibration['chosen'] else ''} | {asked} | "
                     f"{scale} | {' / '.join(f'{v:g}' for v in step['levels'].values())} | "
                     f"{step['predicted']:.2f}x | {step['measured']:.2f}x | {step['loss']:.4g} |")  # fmt: skip
    lines += ["", "| profile | per-layer sparsity | predicted | measured (calibration / again) | test acc |",
              "|---|---|---|---|---|",
              f"| SPDY | {' / '.join(f'{s:g}' for s in report['levels'].values())} | {row['predicted']:.2f}x | "
              f"{report['measured_speedup']:.2f}x / {spdy_speed:.2f}x | {spdy_acc:.2f} |"]  # fmt: skip
    for u in uniform:
        mark = " (closest speed)" if u is closest else ""
        lines.append(f"| uniform{mark} | {u['sparsity']:g} | - | {u['measured']:.2f}x | {u['test_acc']:.2f} |")
    (out / "spdy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("compare", "database", "spdy"), default="compare")
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--target-speedup", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="spdy: speed-up measurements per profile (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process (timings)")
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.7", "0.9", "0.95", "2:4"])
    parser.add_argument("--distributions", nargs="+", default=["uniform", "global"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--grid", nargs="+", type=float, help="spdy: the database's sparsity levels (default: "
                        "the library's 12, 0-0.98)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "database":
        return run_database(args, out)
    splits = load_dataset("fashion-mnist", val_fraction=0.1, seed=0)  # the trainer's split: calibrate on its train part
    if args.mode == "spdy":
        # The per-layer timing table and each calibration step, as prune_spdy logs them.
        logging.basicConfig(format="%(message)s", level=logging.WARNING)
        logging.getLogger("sparsetrain.oneshot.spdy").setLevel(logging.INFO)
        return run_spdy(args, out, splits)
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
                            cache = out / "runs" / f"{model_name}-{args.epochs}ep-seed{seed}.obcdb.safetensors"
                            cache.parent.mkdir(parents=True, exist_ok=True)
                            result = prune_and_score(dense, method, sparsity, distribution, batches, splits, cache)
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
    # The table covers every row in rows.jsonl (earlier runs too); a rerun of the same row replaces it.
    latest = {}
    for line in (out / "rows.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[(row["model"], row["sparsity"], row["distribution"], row["seed"], row["method"])] = row
    table = summarize(list(latest.values()))
    (out / "table.md").write_text(table + "\n")
    print(table)


def summarize(rows: list[dict]) -> str:
    lines = ["| model | sparsity | allocation | draws | magnitude | OBC | OBC / magnitude layer error (max over layers)"
             " | OBC time (s) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["model"], r["sparsity"], r["distribution"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for model, sparsity, distribution in keys:
        group = [r for r in rows if (r["model"], r["sparsity"], r["distribution"]) == (model, sparsity, distribution)]
        mag = [r for r in group if r["method"] == "magnitude"]
        obc = [r for r in group if r["method"] == "obc"]
        mag = sorted(mag, key=lambda r: r["seed"])
        obc = sorted(obc, key=lambda r: r["seed"])
        ratios = [max(o["layer_errors"][k] / max(m["layer_errors"][k], 1e-12) for k in o["layer_errors"])
                  for o, m in zip(obc, mag)]  # fmt: skip

        def stat(values):
            return f"{statistics.mean(values):.2f} +- {statistics.pstdev(values):.2f}"

        lines.append(f"| {model} | {sparsity} | {distribution} | {len(obc)} | {stat([r['test_acc'] for r in mag])} | "
                     f"{stat([r['test_acc'] for r in obc])} | {max(ratios):.3f} | "
                     f"{statistics.mean(r['seconds'] for r in obc):.1f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
