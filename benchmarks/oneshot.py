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

``--models gpt``: a language model. The zoo ``gpt`` of ``benchmarks/text.py`` (2 layers, 4 heads, width 64, tied
head; AdamW, cosine schedule) trained dense ``--epochs`` on the ``text`` dataset (1 MB of the standard library's
sources, 64-byte windows, split by position), then pruned at each sparsity with magnitude (global and uniform),
OBC at magnitude's allocation (global and uniform, ``solver="auto"``), OBC with ``allocation="database"`` (its
database cached per draw under ``runs/``; the default, against OBC at the global allocation, and against OBC
uniform: ``distribution="uniform"``) and one-shot M-FAC (global, ``--gradients`` gradients of ``--samples /
--gradients`` windows each, one row per ``--blocks`` size: 0 is one block of every pruned weight). The token and
position embeddings and the tied head stay dense (the model's ``keep_dense``, every method's default selection).
Calibration: ``--samples`` training windows per ``--seeds`` draw, never the test part. Reported per row: test
perplexity and next-byte accuracy, the measured sparsity of the pruned layers, and the pruning time; the table
also gives the unigram perplexity of the test bytes (training frequencies), the bar a model must clear.

    python benchmarks/oneshot.py --models gpt --epochs 6 --seeds 0 1 2 --samples 512 --sparsities 0.5 0.7 0.9 2:4

Results go to benchmarks/results/oneshot/ (one JSON line per row and a markdown table per mode; the language
model's in ``gpt.jsonl`` and ``gpt-<epochs>ep.md``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import multiprocessing
import os
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
    prune_mfac,
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


def train_dense_text(epochs: int, out: Path) -> nn.Module:
    """The dense ``gpt`` of ``benchmarks/text.py`` (its model, data, optimizer and schedule), trained once."""
    from text import COMMON, SIZE

    run_dir = out / f"dense-gpt-{epochs}ep"
    if not (run_dir / "sparse_final.pt").exists():
        config = resolve(None, {**SIZE, **COMMON, "method": "dense", "epochs": epochs, "seed": 0, "threads": 2,
                                "out": str(run_dir)})  # fmt: skip
        Run(config).run()
    from sparsetrain.train.checkpoint import load, restore_model

    path = run_dir / "sparse_final.pt"
    return restore_model(load(path), str(path))


def unigram_ppl(train, test) -> float:
    """Perplexity of the test bytes under the training bytes' frequencies (add-one): the bar a model must clear."""
    counts = torch.bincount(train.tensors[1].flatten().long(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log()
    return float((-logp[test.tensors[1].flatten().long()].mean()).exp())


def pruned_sparsity(model: nn.Module, masks: dict) -> float:
    """Zeros held by the pruned weights (the masks' parameters), as a fraction of them."""
    params = dict(model.named_parameters())
    zeros = sum(int((params[name] == 0).sum()) for name in masks)
    return zeros / sum(params[name].numel() for name in masks)


def prune_text(dense, method: str, sparsity, distribution: str, batches, args, database=None, block=None) -> tuple:
    """One pruned copy of the language model: (model, masks, seconds, details); ``block``: M-FAC's block size."""
    model = copy.deepcopy(dense)
    target = None if isinstance(sparsity, str) else sparsity
    mask_type = _mask_type(sparsity)
    report: dict = {}
    start = time.perf_counter()
    if method == "magnitude":
        masks = prune_oneshot(model, target, mask_type=mask_type, distribution=distribution)
    elif method == "obc" and distribution.startswith("database"):  # "database-uniform": uniform's total, fallback
        masks = prune_obc(model, target, batches, distribution="uniform" if "uniform" in distribution else "global",
                          allocation="database", database=database, report=report)  # fmt: skip
    elif method == "obc":
        masks = prune_obc(model, target, batches, mask_type=mask_type, distribution=distribution)
    else:
        masks = prune_mfac(model, target, batches, num_gradients=args.gradients, num_samples=args.samples,
                           block_size=block, mask_type=mask_type, distribution=distribution, report=report)
    seconds = time.perf_counter() - start
    details = {"allocation": report["allocation"]} if "allocation" in report else {}
    if "damp" in report:
        details["damp"] = report["damp"]
    return model, masks, seconds, details


def run_text(args, out: Path) -> None:
    """``--models gpt``: one-shot pruning of a language model, scored by test perplexity."""
    from text import SIZE

    cpu = torch.device("cpu")
    splits = load_dataset("text", val_fraction=0.1, seed=0, options=SIZE["dataset_options"])  # the trainer's split
    dense = train_dense_text(args.epochs, out)
    dense_result = evaluate(dense, splits.test, 256, cpu)
    unigram = unigram_ppl(splits.train, splits.test)
    print(f"gpt: dense test perplexity {dense_result['ppl']:.3f}, next-byte accuracy {dense_result['acc']:.2f} "
          f"(unigram perplexity {unigram:.2f}); {len(splits.train)} training windows, {len(splits.test)} test",
          flush=True)  # fmt: skip
    common = {"model": "gpt", "epochs": args.epochs, "dense_ppl": dense_result["ppl"], "dense_acc": dense_result["acc"],
              "unigram_ppl": unigram, "samples": args.samples, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "load_before": os.getloadavg()}  # fmt: skip
    plan = []
    for text in args.sparsities:
        sparsity = text if ":" in text else float(text)
        if isinstance(sparsity, str):
            plan += [("magnitude", "per group", None), ("obc", "per group", None)]
            plan += [("mfac", "per group", block or None) for block in args.blocks]
        else:
            plan += [("magnitude", "global", None), ("magnitude", "uniform", None), ("obc", "global", None),
                     ("obc", "uniform", None), ("obc", "database", None),
                     ("obc", "database-uniform", None)]  # fmt: skip
            plan += [("mfac", "global", block or None) for block in args.blocks]
        for method, distribution, block in plan:
            if method in args.skip:
                continue
            # Magnitude pruning uses no calibration data: one row whatever the draw.
            for seed in [None] if method == "magnitude" else args.seeds:
                batches = calibration_batches(splits.train, args.samples, seed) if seed is not None else None
                cache = out / "runs" / f"gpt-{args.epochs}ep-seed{seed}-{args.samples}.obcdb.safetensors"
                cache.parent.mkdir(parents=True, exist_ok=True)
                allocation = "global" if distribution == "per group" else distribution
                model, masks, seconds, details = prune_text(dense, method, sparsity, allocation, batches, args, cache,
                                                            block)
                result = evaluate(model, splits.test, 256, cpu)
                row = {**common, "sparsity": text, "method": method, "distribution": distribution, "seed": seed,
                       "test_ppl": result["ppl"], "test_acc": result["acc"], "test_loss": result["loss"],
                       "measured_sparsity": pruned_sparsity(model, masks),
                       "pruned_weights": sum(m.numel() for m in masks.values()), "seconds": seconds, "block": block,
                       "gradients": args.gradients if method == "mfac" else None, **details}  # fmt: skip
                with open(out / "gpt.jsonl", "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                print(f"gpt {text:>5s} {method:9s} {distribution:9s} block {block} draw {seed}  "
                      f"test ppl {result['ppl']:8.3f}  acc {result['acc']:6.2f}  "
                      f"sparsity {row['measured_sparsity']:.4f}  {seconds:6.1f}s"
                      f"{'  ' + str(details) if details else ''}", flush=True)  # fmt: skip
        plan = []
    # The table covers every row in gpt.jsonl of this epoch count; a rerun of the same row replaces it.
    latest = {}
    for line in (out / "gpt.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["epochs"] == args.epochs:
            key = (row["sparsity"], row["method"], row["distribution"], row.get("block"), row["seed"], row["samples"])
            latest[key] = row
    table = summarize_text(list(latest.values()))
    (out / f"gpt-{args.epochs}ep.md").write_text(table + "\n")
    print(table)


NAMES = {("magnitude", "global"): "magnitude, global", ("magnitude", "uniform"): "magnitude, uniform",
         ("obc", "global"): "OBC at global magnitude's allocation", ("obc", "uniform"): "OBC, uniform",
         ("obc", "database"): "OBC, database allocation",
         ("obc", "database-uniform"): "OBC, database allocation against OBC uniform",
         ("mfac", "global"): "M-FAC, global",
         ("magnitude", "per group"): "magnitude", ("obc", "per group"): "OBC", ("mfac", "per group"): "M-FAC"}


def summarize_text(rows: list[dict]) -> str:
    """One line per sparsity and method: test perplexity and next-byte accuracy (mean +- std over draws)."""
    first = rows[0]
    lines = [f"Dense gpt ({first['epochs']} epochs): test perplexity {first['dense_ppl']:.3f}, next-byte accuracy "
             f"{first['dense_acc']:.2f}% (unigram perplexity {first['unigram_ppl']:.2f}).", "",
             "| sparsity | method | draws | test ppl | test next-byte acc (%) | measured sparsity | time (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    order = {key: i for i, key in enumerate(NAMES)}
    levels = sorted({r["sparsity"] for r in rows}, key=lambda s: (":" in s, s))
    for sparsity in levels:
        here = [r for r in rows if r["sparsity"] == sparsity]
        keys = sorted({(r["method"], r["distribution"], r.get("block") or 0) for r in here},
                      key=lambda k: (order[k[:2]], k[2]))  # fmt: skip
        for key in keys:
            group = [r for r in rows if r["sparsity"] == sparsity and
                     (r["method"], r["distribution"], r.get("block") or 0) == key]  # fmt: skip

            def stat(values, digits=3):
                if len(values) == 1:
                    return f"{values[0]:.{digits}f}"
                return f"{statistics.mean(values):.{digits}f} +- {statistics.pstdev(values):.{digits}f}"

            chose = sorted({r["allocation"] for r in group if r.get("allocation")})
            name = NAMES[key[:2]] + (f" (kept: {', '.join(chose)})" if key[1].startswith("database") else "")
            if key[0] == "mfac":
                name += f", {group[0]['gradients']} gradients, " + (f"blocks of {key[2]}" if key[2] else "one block")
            lines.append(f"| {sparsity} | {name} | {len(group) if group[0]['seed'] is not None else '-'} | "
                         f"{stat([r['test_ppl'] for r in group])} | {stat([r['test_acc'] for r in group], 2)} | "
                         f"{stat([r['measured_sparsity'] for r in group], 4)} | "
                         f"{statistics.mean(r['seconds'] for r in group):.1f} |")  # fmt: skip
    return "\n".join(lines)


def calibration_batches(train, samples: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``samples`` training samples (images, or text windows and their next bytes) drawn with ``seed``."""
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
    parser.add_argument("--gradients", type=int, default=128, help="gpt: M-FAC's gradients (of --samples windows)")
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 128],
                        help="gpt: M-FAC's block sizes, one row each (0: one block of every pruned weight)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("magnitude", "obc", "mfac"),
                        help="gpt: methods to leave out")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "database":
        return run_database(args, out)
    if "gpt" in args.models:
        if args.models != ["gpt"] or args.mode != "compare":
            parser.error("--models gpt runs alone, in the compare mode (the language model's own table)")
        return run_text(args, out)
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
