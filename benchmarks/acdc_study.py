"""AC/DC's study options, one knob at a time, against the paper's AC/DC, GMP and dense training.

Every run has the accuracy benchmark's trainer, optimizer, learning-rate schedule and AC/DC timeline (10% warm-up,
10% compressed and decompressed phases, final 20%, in whole epochs: ``accuracy.method_options``); only one option
of ``acdc`` changes per row (``dead_units``, ``layer_floor``, ``layer_ceiling``, ``ramp``, ``ramp_start``,
``inphase_ramp``, ``score``, ``final_from``, ``decay``, ``reset_momentum``, ``cycles`` and the phase lengths; see
the ``ACDC`` docstring).
Reported per row: the sparse model's test accuracy, the dense twin's (AC/DC's best decompressed model), the training
FLOPs relative to dense training, and the gaps the targets are about (sparse - gmp, twin - dense).

    python benchmarks/acdc_study.py                                  # the budget of the BENCHMARKS.md table
    python benchmarks/acdc_study.py --limit-train 30000 --seeds 0 1 2 --sparsities 0.8 0.9 0.95 0.98
    python benchmarks/acdc_study.py --grid-task fmnist-lenet5 --seeds 0 1 2 --out benchmarks/results/acdc_study_lenet5

Default budget: LeNet-300-100 (``mlp``) on Fashion-MNIST, 10 epochs on 15000 training samples, one seed, 90% and
98%. Results: benchmarks/results/acdc_study/table.md and runs.jsonl (runs already there are reused; --fresh reruns).

``--task main`` studies the main job instead (``sparsetrain train``: the default recipe, LeNet-5 on all of
Fashion-MNIST, 30 epochs, phases as fractions of the run) against its dense recipe (``lenet5_dense.yaml``); its rows
(``main_variants``) change the recipe's ``method_options`` one at a time:

    python benchmarks/acdc_study.py --task main --threads 1 --seeds 0 1 2    # -> results/acdc_study_main/
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from accuracy import COMMON, TASKS, method_options  # noqa: E402

from sparsetrain.cli import DEFAULT_RECIPE  # noqa: E402
from sparsetrain.train.config import load_recipe, resolve  # noqa: E402
from sparsetrain.train.loop import Run  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "acdc_study"
MAIN_RESULTS = Path(__file__).parent / "results" / "acdc_study_main"
DENSE_RECIPE = DEFAULT_RECIPE.parent / "lenet5_dense.yaml"


def variants(epochs: int) -> dict[str, tuple[str, dict]]:
    """Row name -> (method, options). 'acdc paper' is the accuracy benchmark's AC/DC; each other acdc row adds one."""
    base = method_options("acdc", epochs)
    return {
        "dense": ("dense", {}),
        "gmp": ("gmp", method_options("gmp", epochs)),
        # GMP with the other distributions: the target compares AC/DC with the best of GMP's.
        "gmp global": ("gmp", {**method_options("gmp", epochs), "distribution": "global"}),
        "gmp erk": ("gmp", {**method_options("gmp", epochs), "distribution": "erk"}),
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
        # The ramp's better twin with the floor and warm-up that gave the sparse model its best rows at 98%.
        "ramp=3 + layer_floor=0.01 + warm-up 2 units": (
            "acdc", {**base, "ramp": 3, "layer_floor": 0.01, "warmup": 2 * base["warmup"]}
        ),
        "ramp=3 + final=0.1": ("acdc", {**base, "ramp": 3, "final": base["warmup"]}),
        # A shorter ramp (0.5 s, then s): one more compression at s before the final one than ramp=3.
        "ramp=2": ("acdc", {**base, "ramp": 2}),
        # The first compressed phase climbs from 0.5 s to s inside itself (2 or 4 mask updates), so s is reached
        # within the paper's first compressed phase; every later phase is the paper's.
        "inphase_ramp=2": ("acdc", {**base, "inphase_ramp": 2}),
        "inphase_ramp=4": ("acdc", {**base, "inphase_ramp": 4}),
        # The in-phase updates empty more rows than one compression from dense: with those rows re-initialised.
        "inphase_ramp=4 + dead_units=reinit": ("acdc", {**base, "inphase_ramp": 4, "dead_units": "reinit"}),
        # GMP's allocation (every layer at s) instead of the paper's global magnitude ranking.
        "distribution=uniform": ("acdc", {**base, "distribution": "uniform"}),
        "distribution=erk": ("acdc", {**base, "distribution": "erk"}),
        # The main job's final=0.1: a 1-unit (10%) final phase instead of 2 units, room for one more C/D cycle
        # before it, so the twin can be taken one unit later in the schedule; same dense epochs.
        "final=0.1": ("acdc", {**base, "final": base["warmup"]}),
        # final=0.1 with each single knob that may help the twin (the main job's twin gained from both).
        **{f"final=0.1 + {name}": ("acdc", {**base, **knob, "final": base["warmup"]}) for name, knob in (
            ("dead_units=reinit", {"dead_units": "reinit"}), ("dead_units=revive", {"dead_units": "revive"}),
            ("score=taylor", {"score": "taylor"}), ("score=normalized", {"score": "normalized"}),
            ("warm-up 2 units", {"warmup": 2 * base["warmup"]}), ("ramp=2", {"ramp": 2}),
        )},  # fmt: skip
        # A ramp that starts closer to s (ramp_start): the milder first compression that gave the ramp its better
        # twin, with less of the time below s that cost its sparse model at 98%.
        "ramp=2 + ramp_start=0.8": ("acdc", {**base, "ramp": 2, "ramp_start": 0.8}),
        "ramp=3 + ramp_start=0.8": ("acdc", {**base, "ramp": 3, "ramp_start": 0.8}),
        # The two knobs that gave the 30-epoch twin at 98% its best rows, together.
        "ramp=2 + dead_units=revive": ("acdc", {**base, "ramp": 2, "dead_units": "revive"}),
        # The final compressed phase resumes the sparse model of the compressed phase before it (weights, masks,
        # biases): the sparse model trains on uninterrupted, the last decompressed phase is a dense branch that
        # only yields the twin.
        "final_from=sparse": ("acdc", {**base, "final_from": "sparse"}),
        "final_from=sparse + ramp=2": ("acdc", {**base, "final_from": "sparse", "ramp": 2}),
        # A gradual compression: the weights a compression removes fade linearly to 0 over the first 30% / 60% of
        # the compressed phase (trained meanwhile) instead of being zeroed at once; every compression or the final
        # one only; and with the ramp that gave LeNet-300-100 its best rows.
        "decay=0.3": ("acdc", {**base, "decay": 0.3}),
        "decay=0.6": ("acdc", {**base, "decay": 0.6}),
        "decay=0.3 final only": ("acdc", {**base, "decay": 0.3, "decay_phases": "final"}),
        "decay=0.6 final only": ("acdc", {**base, "decay": 0.6, "decay_phases": "final"}),
        "decay=0.9 final only": ("acdc", {**base, "decay": 0.9, "decay_phases": "final"}),
        "ramp=2 + decay=0.3": ("acdc", {**base, "ramp": 2, "decay": 0.3}),
        # A cap on each layer's density in the global ranking (the classifier keeps ~45% at 98% without it), and
        # a floor above 1% (1% does not bind on 30-epoch runs at 98%: the first layer keeps 1.4%).
        "layer_ceiling=0.1": ("acdc", {**base, "layer_ceiling": 0.1}),
        "layer_ceiling=0.2": ("acdc", {**base, "layer_ceiling": 0.2}),
        "layer_floor=0.02": ("acdc", {**base, "layer_floor": 0.02}),
        "ramp=2 + layer_ceiling=0.1": ("acdc", {**base, "ramp": 2, "layer_ceiling": 0.1}),
        # Momentum at a decompression: kept (no reset), or reset for the sparsified weights only (the paper's code
        # resets every parameter's: the default).
        "reset_momentum=false": ("acdc", {**base, "reset_momentum": False}),
        "reset_momentum=sparsified": ("acdc", {**base, "reset_momentum": "sparsified"}),
        # Phase lengths: compressed and decompressed phases of 2 units (fewer, longer cycles: on the grid's and the
        # 30-epoch timelines one cycle, then one long decompressed phase) or of 1, 2, 4 epochs (on 30 epochs, where a
        # unit is 3 epochs), and a 3-unit final phase.
        "phases 2 units": ("acdc", {**base, "compressed": 2 * base["warmup"], "decompressed": 2 * base["warmup"]}),
        "phases 1 epoch": ("acdc", {**base, "compressed": 1, "decompressed": 1}),
        "phases 2 epochs": ("acdc", {**base, "compressed": 2, "decompressed": 2}),
        "phases 4 epochs": ("acdc", {**base, "compressed": 4, "decompressed": 4}),
        "final 3 units": ("acdc", {**base, "final": 3 * base["warmup"]}),
        # Fewer cycles, so that the last decompressed phase (where the twin is taken) is longer: two compressions
        # before the final one instead of three (the paper's phases), or three short ones (2-epoch phases).
        "cycles=2": ("acdc", {**base, "cycles": 2}),
        "phases 2 epochs + cycles=3": ("acdc", {**base, "compressed": 2, "decompressed": 2, "cycles": 3}),
    }


def main_variants() -> dict[str, tuple[str, dict]]:
    """The main job's rows: row name -> (method, ``method_options`` overrides of the default recipe). The study
    was run on the former recipe (final phase 20% of the run), so every row but the last states ``final`` itself."""
    former = {"final": 0.2}  # W 0-3, C 3-6, D 6-9, C 9-12, D 12-15, C 15-18, D 18-24, final C 24-30
    return {
        "dense": ("dense", {}),
        "final=0.2 (former recipe)": ("acdc", former),
        "ramp=3": ("acdc", {**former, "ramp": 3}),
        "dead_units=reinit": ("acdc", {**former, "dead_units": "reinit"}),
        "reset_momentum=false": ("acdc", {**former, "reset_momentum": False}),
        "warmup=0.2": ("acdc", {**former, "warmup": 0.2}),  # 6-epoch warm-up, 3 compressions; 15 dense epochs
        # A 3-epoch final phase leaves room for a fifth compression (21-24) and a last decompressed phase 24-27: the
        # twin can be taken 3 epochs later, the sparse model is fine-tuned 3 epochs instead of 6; 15 dense epochs.
        "final=0.1 (recipe)": ("acdc", {"final": 0.1}),
    }


def run_one(name: str, method: str, options: dict, spec: dict, sparsity: float, seed: int, out: Path,
            recipe: dict | None = None) -> dict:  # fmt: skip
    """One run; ``recipe`` (the main job's) replaces the accuracy benchmark's settings, ``options`` merge into its
    ``method_options``."""
    run_dir = out / "runs" / f"{re.sub('[^A-Za-z0-9._-]', '', name.replace('=', '-'))}-s{sparsity:g}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    if recipe is None:
        config = resolve(None, {**COMMON, **spec, "method": method, "sparsity": sparsity, "seed": seed,
                                "method_options": options, "out": str(run_dir)})  # fmt: skip
    else:
        overrides = {f"method_options.{k}": v for k, v in options.items()}
        config = resolve(recipe, {**spec, **overrides, "seed": seed, "out": str(run_dir)})
    summary = Run(config).run()
    dense = summary["dense_model"]
    twin = dense if dense and method == "acdc" else None
    return {"variant": name, "sparsity": sparsity, "seed": seed, "test_acc": summary["sparse_model"]["test_acc"],
            "dense_test_acc": twin["test_acc"] if twin else None, "dense_epoch": twin["epoch"] if twin else None,
            "train_flops_ratio": summary["train_flops_ratio"]}  # fmt: skip


def mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def spread(values: list[float]) -> str:
    """Mean, and +- the population std over seeds when there are several."""
    return f"{statistics.mean(values):.2f}" + (f" +- {statistics.pstdev(values):.2f}" if len(values) > 1 else "")


def table(rows: list[dict], names: list[str], sparsities: list[float], header: str, main_task: bool = False) -> str:
    """The markdown table; the main job's (no gmp row) compares the sparse model with dense training instead and
    says at which epochs the dense twins were taken."""
    lines = [header]
    dense = mean([r["test_acc"] for r in rows if r["variant"] == "dense"])
    for s in sparsities:
        at = [r for r in rows if r["sparsity"] == s]
        gmp = mean([r["test_acc"] for r in at if r["variant"] == "gmp"])
        reference, reference_name = (dense, "dense") if main_task else (gmp, "gmp")
        n = len({r["seed"] for r in at})
        dense_text = spread([r["test_acc"] for r in rows if r["variant"] == "dense"]) if dense is not None else "-"
        extra = " twin epochs |" if main_task else ""
        lines += [f"\n**{s:g} sparsity** (dense: {dense_text}; n = {n} seed{'s' if n > 1 else ''})\n",
                  f"| variant | sparse test acc | sparse - {reference_name} | dense twin | twin - dense | train FLOPs |"
                  + extra, "|---|---|---|---|---|---|" + ("---|" if main_task else "")]  # fmt: skip
        for name in names:
            picked = [r for r in at if r["variant"] == name]
            if not picked or (main_task and name == "dense"):
                continue
            accs = [r["test_acc"] for r in picked]
            twins = [r["dense_test_acc"] for r in picked if r["dense_test_acc"] is not None]
            flops = mean([r["train_flops_ratio"] for r in picked])
            gap = f"{mean(accs) - reference:+.2f}" if reference is not None and name != reference_name else "-"
            twin_gap = f"{mean(twins) - dense:+.2f}" if twins and dense is not None else "-"
            twin_text = spread(twins) if twins else "-"
            line = f"| {name} | {spread(accs)} | {gap} | {twin_text} | {twin_gap} | {flops:.2f} |"
            if main_task:
                epochs = [r.get("dense_epoch") for r in picked]
                line += " " + (", ".join(f"{e:g}" for e in epochs) if None not in epochs else "-") + " |"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["mlp", "main"], default="mlp",
                        help="mlp: the accuracy benchmark's LeNet-300-100 budget; main: the main job's recipe")
    parser.add_argument("--grid-task", choices=list(TASKS), default=None,
                        help="with --task mlp: run one of the accuracy grid's tasks exactly (its model, data, "
                             "epochs and samples; --epochs and --limit-train are then ignored)")  # fmt: skip
    parser.add_argument("--sparsities", nargs="+", type=float, default=None, help="default: 0.9 0.98 (main: 0.9)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit-train", type=int, default=15000, help="training samples; 0: all of them")
    parser.add_argument("--variants", nargs="+", default=None, help="row names to run (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: results/acdc_study (main: results/acdc_study_main)")
    parser.add_argument("--fresh", action="store_true", help="rerun the runs already recorded in runs.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    main_task = args.task == "main"
    args.sparsities = args.sparsities or ([0.9] if main_task else [0.9, 0.98])
    recipes = {"acdc": load_recipe(DEFAULT_RECIPE), "dense": load_recipe(DENSE_RECIPE)} if main_task else None
    if main_task:
        spec = dict(threads=args.threads, plots=False)
        table_variants = main_variants()
    elif args.grid_task:
        spec = {**TASKS[args.grid_task], "threads": args.threads}
        args.epochs = spec["epochs"]
        table_variants = variants(args.epochs)
    else:
        spec = dict(dataset="fashion-mnist", model="mlp", epochs=args.epochs, limit_train=args.limit_train or None,
                    batch_size=128, threads=args.threads)  # fmt: skip
        table_variants = variants(args.epochs)
    names = args.variants or list(table_variants)
    unknown = sorted(set(names) - set(table_variants))
    if unknown:
        parser.error(f"unknown variants {', '.join(unknown)}; known: {', '.join(table_variants)}")
    out = Path(args.out or (MAIN_RESULTS if main_task else RESULTS))
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
                    recipe = None if recipes is None else recipes[method]
                    if recipe is not None:
                        recipe = {**recipe, "sparsity": sparsity}
                    done[key] = run_one(name, method, options, spec, sparsity, seed, out, recipe)
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(done[key]) + "\n")
                    print(f"{time.perf_counter() - start:6.0f}s {name} s={sparsity:g} seed {seed}: "
                          f"{done[key]['test_acc']:.2f} twin {done[key]['dense_test_acc']}", flush=True)  # fmt: skip
                rows.append(done[key])
    if main_task:
        header = f"The main job (LeNet-5 on Fashion-MNIST, 30 epochs), seeds {', '.join(map(str, args.seeds))}"
    elif args.grid_task:
        header = f"The accuracy grid's `{args.grid_task}` task, seeds {', '.join(map(str, args.seeds))}"
    else:
        header = (f"LeNet-300-100 (`mlp`) on Fashion-MNIST, {args.epochs} epochs on {args.limit_train or 'all'} "
                  f"training samples, seeds {', '.join(map(str, args.seeds))}")  # fmt: skip
    # The table keeps every variant already run on all of these seeds at a sparsity, not only this call's: a
    # narrower rerun must not drop earlier rows (one-seed screening runs stay out of it, in runs.jsonl).
    earlier = set()
    for name, (method, _) in table_variants.items():
        for s in [] if name in names else [0.0] if method == "dense" else args.sparsities:
            if all((name, s, seed) in done for seed in args.seeds):
                rows += [done[(name, s, seed)] for seed in args.seeds]
                earlier.add(name)
    shown = [n for n in table_variants if n in names or n in earlier]
    text = table(rows, shown, args.sparsities, header, main_task)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
