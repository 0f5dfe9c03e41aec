"""Structured pruning: forward FLOPs removed against accuracy, training time, and the slim model's CPU latency.

Fashion-MNIST LeNet-5, ~50% of forward FLOPs removed by whole channels, for ``oto`` (``oto-hspg``: HSPG, the
NeurIPS 2021 optimizer; ``oto-dhspg``: OTOv2's DHSPG, sparsifying from ``n_p`` to ``--finish``), ``variational``
(Bernoulli gates; ``variational-eb``: with the empirical-Bayes slab scale, ``slab="empirical"``,
``--slab-prior-weight`` its ``slab_prior_weight``; ``variational-gates``: the slab prices the gates only,
``slab_on_weights=False``), channel GMP and channel AC/DC (``mask_type=channel``, at the
uniform group sparsity whose slim model has half the FLOPs), against the dense model. ``oto`` and ``variational``
prune to the target at 75% of the run (``--finish``; groups their dynamics zeroed earlier stay zero) and train
the pruned network for the rest, as GMP (pruning ends at 80%) and AC/DC (final compressed phase) do. Every run
is a ``sparsetrain train`` run (SGD, cosine LR, batch 128); the slim model is what ``sparsetrain slim`` writes
(checked against the masked model). Latency: lowest of 3 medians of repeated forward passes at batch 1 and 64, one
thread, eager and TorchScript-frozen (``torch.jit.freeze(torch.jit.script(model))``).

    python benchmarks/structured.py                        # 1 seed, 4 epochs, 20,000 training samples
    python benchmarks/structured.py --epochs 10 --limit-train 0 --seeds 0 1 2
    python benchmarks/structured.py --model resnet20 --limit-train 10000 --epochs 3
    python benchmarks/structured.py --model convbase       # MNIST-1D (the dataset follows the model)
    python benchmarks/structured.py --model resnet20 --limit-train 10000 --epochs 3 --latency-only
    python benchmarks/structured.py --seeds 0 1 2 --methods oto-dhspg channel-gmp   # a subset (dense always runs)
    python benchmarks/structured.py --seeds 0 1 2 --methods oto-dhspg --oto-periods 3   # own run folders and files
    python benchmarks/structured.py --model resnet20 --limit-train 10000 --epochs 3 --methods channel-gmp \
        --channel-multiple 8                               # kept counts rounded to multiples of 8
    python benchmarks/structured.py --model resnet20 --shape-latency 11/23/45 12/24/48 8/24/48 --rounds 9
    python benchmarks/structured.py --model resnet20 --shape-latency 11/23/45 16/16/32 --steady-malloc
    python benchmarks/structured.py --slim-training        # train time per epoch, slim_training off and auto

The dataset is Fashion-MNIST, or MNIST-1D for ``convbase`` (``--dataset`` overrides). ``--latency-only`` trains
nothing: it measures the latencies again on the finished run folders of ``--out`` (e.g. on a quiet machine).
``--shape-latency K/K/...`` trains nothing either: it times slim-*shaped* models (random weights, eval mode) that
keep K channels in every channel set of each width (widths in the order the model's channel sets first name them,
e.g. 16/32/64 for ResNet-20, 6/16/120/84 for LeNet-5) against the dense model, interleaved in ``--rounds`` rounds
(medians over rounds, and the median of the per-round ratios to dense, so that load shared with other jobs moves
both sides of a ratio alike). ``--steady-malloc`` stops glibc from handing large activations back to the kernel
between forward passes (see ``steady_malloc``); without it, batch-64 latencies include page faults whose count
depends on the tensor sizes.

``--slim-training`` trains every method twice, with ``slim_training`` off and auto (the channel-masked model
trained as the narrower network its masks leave), in fresh folders under ``OUT/slim-timing``, and reports the
wall time of each epoch's training pass (evaluation excluded) and the accuracies; no latencies.

Results go to benchmarks/results/structured/ (per model: one JSON line per run and a markdown table; with
``--methods``, files named after the model and the methods).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from sparsetrain.methods._groupwise import group_sparsity_for_flops
from sparsetrain.models import build_model
from sparsetrain.structured import apply_keep, groups, kept_channels
from sparsetrain.train.checkpoint import load, restore_model
from sparsetrain.train.config import resolve
from sparsetrain.train.data import load_run_dataset
from sparsetrain.train.loop import Run

RESULTS = Path(__file__).parent / "results" / "structured"
# Besides dense (always run: the reference for accuracy and latency).
METHODS = ("oto-hspg", "oto-dhspg", "variational", "variational-eb", "variational-gates", "channel-gmp",
           "channel-acdc")


class TimedRun(Run):
    """A ``sparsetrain train`` run that also records the wall time of each epoch's training pass alone (no
    evaluation, no checkpoint), into ``train_times.json`` of its folder."""

    def train_epoch(self) -> dict[str, float]:
        start = time.perf_counter()
        result = super().train_epoch()
        self.train_times = [*getattr(self, "train_times", []), time.perf_counter() - start]
        (self.out / "train_times.json").write_text(json.dumps(self.train_times))
        return result


def slim_training_timing(args: argparse.Namespace, methods: dict, common: dict, out: Path) -> None:
    """``--slim-training``: each method trained with ``slim_training`` off and auto (fresh folders under
    ``OUT/slim-timing``), the training pass's wall time per epoch (evaluation excluded) and the accuracy of each."""
    rows = []
    load_before = os.getloadavg()
    for seed in args.seeds:
        for name, settings in methods.items():
            for mode in ("off", "auto") if name != "dense" else ("off",):
                run_dir = out / "slim-timing" / f"{name}-{mode}-seed{seed}"
                if not (run_dir / "summary.json").exists():
                    TimedRun(resolve(None, {**common, **settings, "seed": seed, "slim_training": mode,
                                            "out": str(run_dir), "plots": False, "progress": False})).run()  # fmt: skip
                summary = json.loads((run_dir / "summary.json").read_text())
                times = json.loads((run_dir / "train_times.json").read_text())
                slim = summary.get("slim_training") or {}
                row = {"method": name, "slim_training": mode, "seed": seed,
                       "test_acc": summary["sparse_model"]["test_acc"],
                       "train_epoch_s": [round(t, 2) for t in times], "train_s": round(sum(times), 2),
                       "rebuilds": slim.get("rebuilds"), "widths": slim.get("widths")}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    load_after = os.getloadavg()
    lines = [
        f"{args.model}, {common['dataset']}, {args.epochs} epochs, seeds {args.seeds}, threads {args.threads}; "
        f"training pass wall time per epoch (evaluation excluded); load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after (1 min)",
        "",
        "| method | slim_training | test acc | train s per epoch | train s | vs off |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in methods:
        for mode in ("off", "auto") if name != "dense" else ("off",):
            mine = [r for r in rows if r["method"] == name and r["slim_training"] == mode]
            off = [r for r in rows if r["method"] == name and r["slim_training"] == "off"]
            epochs = [statistics.mean(r["train_epoch_s"][e] for r in mine) for e in range(args.epochs)]
            total = statistics.mean(r["train_s"] for r in mine)
            ratio = total / statistics.mean(r["train_s"] for r in off)
            lines.append(f"| {name} | {mode} | {statistics.mean(r['test_acc'] for r in mine):.2f} | "
                         f"{', '.join(f'{t:.1f}' for t in epochs)} | {total:.1f} | {ratio:.2f}x |")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = args.model + ("" if args.methods is None else "-" + "+".join(args.methods)) + "-slim-training"
    with open(RESULTS / f"rows-{tag}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "load_before": load_before[0], "load_after": load_after[0]}) + "\n")
    (RESULTS / f"table-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run(settings: dict, out: Path, train: bool = True) -> dict:
    """One ``sparsetrain train`` run into ``out`` (reused when it already finished); returns its summary."""
    summary = out / "summary.json"
    if not summary.exists() and not train:
        raise SystemExit(f"error: --latency-only needs the finished run {out} (no summary.json there)")
    if not summary.exists():
        Run(resolve(None, {**settings, "out": str(out), "plots": False, "progress": False})).run()
    return json.loads(summary.read_text())


def latency_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Wall time of one forward pass in milliseconds: the lowest of 3 medians (the machine is shared)."""
    medians = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(3):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
    return 1000 * min(medians)


def frozen(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    try:
        scripted = torch.jit.script(model)
    except Exception:  # noqa: BLE001 - fall back to tracing models TorchScript cannot compile
        scripted = torch.jit.trace(model, x)
    return torch.jit.freeze(scripted.eval())


def latencies(model: torch.nn.Module, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    model = model.eval()
    out = {}
    for batch in (1, 64):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
        out[f"eager_b{batch}_ms"] = latency_ms(model, x, repeats if batch == 1 else repeats // 4)
        out[f"frozen_b{batch}_ms"] = latency_ms(frozen(model, x), x, repeats if batch == 1 else repeats // 4)
    return out


def slim_of(run_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """The run's masked model, its slim model, and their largest output difference on random inputs."""
    data = load(str(run_dir / "sparse_final.pt"))
    model = restore_model(data, run_dir).eval()
    shape = data["model_spec"]["input_shape"]
    zigs = groups(model, torch.zeros(1, *shape))
    small = apply_keep(copy.deepcopy(model), zigs, kept_channels(model, zigs)).eval()
    x = torch.randn(256, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((model(x) - small(x)).abs().max())
    return model, small, diff


def steady_malloc() -> None:
    """glibc: serve every allocation from the heap and never hand memory back (``--steady-malloc``).

    By default glibc maps an allocation above a moving threshold (128 KiB to 32 MiB) with mmap and trims the
    heap's free top, so a batch-64 forward's activations (MiBs each) can be new pages on every call, each zeroed
    by the kernel at its first touch; whether they are depends on the tensor sizes and the allocation history,
    not on the model's arithmetic (measured: the dense ResNet-20's batch-64 eager pass 39 ms by default, 23 ms
    steady; its 15/32/64 twin 33 ms and 23 ms). M_MMAP_THRESHOLD and M_TRIM_THRESHOLD at 1 GiB stop both.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise SystemExit("error: --steady-malloc needs glibc's mallopt (it refused the thresholds)")


def distinct_widths(model: torch.nn.Module, shape: tuple[int, ...]) -> list[int]:
    """The widths of the model's channel sets, each once, in the order the sets first name them."""
    widths: list[int] = []
    for channel_set in groups(model, torch.zeros(1, *shape)).sets:
        if channel_set.width not in widths:
            widths.append(channel_set.width)
    return widths


def shaped(
    model_name: str, shape: tuple[int, ...], classes: int, kept: dict[int, int]
) -> tuple[torch.nn.Module, float]:
    """A model of ``model_name`` whose channel sets of width w keep their first ``kept[w]`` channels, and the
    fraction of the dense forward FLOPs it has (random weights: only the shapes matter for latency)."""
    torch.manual_seed(0)
    model = build_model(model_name, input_shape=shape, num_classes=classes).eval()
    sample = torch.zeros(1, *shape)
    zigs = groups(model, sample)
    small = apply_keep(model, zigs, {c.name: list(range(kept[c.width])) for c in zigs.sets}).eval()
    return small, groups(small, sample).dense_flops / zigs.dense_flops


def shape_latency(args: argparse.Namespace, shape: tuple[int, ...], classes: int) -> None:
    """Latency of slim-shaped models against the dense one (``--shape-latency``); see the module doc."""
    dense = build_model(args.model, input_shape=shape, num_classes=classes)
    widths = distinct_widths(dense, shape)
    specs = ["/".join(map(str, widths))] + [s for s in args.shape_latency if s != "/".join(map(str, widths))]
    models, flops = {}, {}
    for spec in specs:
        counts = [int(k) for k in spec.split("/")]
        if len(counts) != len(widths) or not all(0 < k <= w for k, w in zip(counts, widths)):
            raise SystemExit(f"error: --shape-latency {spec!r}: give one kept count in 1..w per width of "
                             f"{'/'.join(map(str, widths))}")  # fmt: skip
        models[spec], flops[spec] = shaped(args.model, shape, classes, dict(zip(widths, counts)))
    inputs = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(0)) for b in (1, 64)}
    # One callable per (model, mode, batch); frozen per batch size, as latencies() does.
    runners = {}
    for spec, model in models.items():
        for b, x in inputs.items():
            runners[spec, "eager", b] = model
            runners[spec, "frozen", b] = frozen(model, x)
    configs = [(mode, b) for b in (1, 64) for mode in ("eager", "frozen")]
    times: dict[tuple, list[float]] = {key: [] for key in runners}
    load_before = os.getloadavg()
    order = list(specs)
    with torch.inference_mode():
        for key, runner in runners.items():  # warm-up (the profiling executor optimises on the first calls)
            for _ in range(5):
                runner(inputs[key[2]])
        for rnd in range(args.rounds):
            random.Random(rnd).shuffle(order)  # no model always runs right after another
            for spec in order:
                for mode, b in configs:
                    runner, x = runners[spec, mode, b], inputs[b]
                    repeats = args.repeats // 4 if b == 1 else max(5, args.repeats // 20)
                    for _ in range(2):
                        runner(x)
                    samples = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        runner(x)
                        samples.append(time.perf_counter() - start)
                    times[spec, mode, b].append(1000 * statistics.median(samples))
    load_after = os.getloadavg()
    allocator = "steady malloc" if args.steady_malloc else "default malloc"
    head = (f"{args.model}, input {shape}, threads {args.threads}, {allocator}, {args.rounds} rounds; load average "
            f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (1 min)")  # fmt: skip
    lines = [
        head,
        "",
        f"| kept ({'/'.join(map(str, widths))}) | FLOPs removed | target speed-up (0.8 x FLOP reduction) | "
        "b1 eager | b1 frozen | b64 eager | b64 frozen |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    dense_spec = specs[0]
    rows = []
    for spec in specs:
        cells, row = [], {"kept": spec, "flops_removed": 1 - flops[spec]}
        for mode, b in configs:
            mine, ref = times[spec, mode, b], times[dense_spec, mode, b]
            ms = statistics.median(mine)
            ratio = statistics.median(r / m for r, m in zip(ref, mine))  # paired by round
            row[f"{mode}_b{b}_ms"], row[f"{mode}_b{b}_speedup"] = ms, ratio
            cells.append(f"{ms:.3f} ms" if spec == dense_spec else f"{ratio:.2f}x ({ms:.3f} ms)")
        rows.append(row)
        lines.append(f"| {spec} | {1 - flops[spec]:.1%} | {0.8 / flops[spec]:.2f}x | " + " | ".join(cells) + " |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = f"shapes-{args.model}" + ("-steady-malloc" if args.steady_malloc else "")
    with open(RESULTS / f"rows-{tag}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "load_before": load_before[0], "load_after": load_after[0]}) + "\n")
    (RESULTS / f"table-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--dataset", default=None, help="default: mnist1d for convbase, else fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-train", type=int, default=20000, help="training samples (0: all)")
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of forward FLOPs to remove")
    parser.add_argument("--oto-lam", type=float, default=1e-3)
    parser.add_argument("--oto-n-p", type=float, default=None, help="oto's n_p (fraction of the run)")
    parser.add_argument("--oto-periods", type=int, default=None, help="oto-dhspg's pruning periods (default: oto's)")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        help=f"methods to run besides dense (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--channel-multiple",
        type=int,
        default=1,
        help="round each channel set's kept count to a multiple of this (the methods' channel_multiple); "
        "the runs get their own folders (dense is shared) and files",
    )
    parser.add_argument("--finish", type=float, default=0.75, help="oto's and variational's prune to target")
    parser.add_argument(
        "--slab-prior-weight",
        type=float,
        default=0.0,
        help="variational-eb's slab_prior_weight (pseudo-weights at the initial scale); other values get their "
        "own run folders and files",
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="run folders (default: runs/structured-benchmark-MODEL)")
    parser.add_argument(
        "--latency-only",
        action="store_true",
        help="train nothing: measure the slim models of the finished runs in --out again",
    )
    parser.add_argument(
        "--shape-latency",
        nargs="+",
        default=None,
        metavar="K/K/...",
        help="train nothing: time slim-shaped models keeping K channels per width against the dense model",
    )
    parser.add_argument("--rounds", type=int, default=7, help="--shape-latency: interleaved rounds")
    parser.add_argument(
        "--slim-training",
        action="store_true",
        help="time each method's training pass per epoch with slim_training off and auto (no latencies)",
    )
    parser.add_argument(
        "--steady-malloc",
        action="store_true",
        help="latencies with glibc's mmap and trim thresholds at 1 GiB (no fresh pages per forward pass)",
    )
    args = parser.parse_args()
    if args.steady_malloc:
        steady_malloc()
    torch.set_num_threads(args.threads)
    chosen = args.methods or list(METHODS)

    dataset = args.dataset or ("mnist1d" if args.model == "convbase" else "fashion-mnist")
    common = {"model": args.model, "dataset": dataset, "threads": args.threads, "epochs": args.epochs}
    if args.limit_train:
        common["limit_train"] = args.limit_train
    splits = load_run_dataset(resolve(None, common))
    shape = tuple(splits.input_shape)
    samples = min(args.limit_train or len(splits.train), len(splits.train))
    if args.shape_latency:
        shape_latency(args, shape, splits.num_classes)
        return
    dense_model = build_model(args.model, input_shape=shape, num_classes=splits.num_classes)
    multiple = args.channel_multiple
    try:
        group_sparsity = group_sparsity_for_flops(dense_model, torch.zeros(1, *shape), args.flops, multiple)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    rounding = {} if multiple == 1 else {"channel_multiple": multiple}
    variant_suffix = ("" if args.flops == 0.5 else f"-flops{args.flops:g}") + (
        "" if multiple == 1 else f"-mult{multiple}"
    )
    oto = {"target_flops": args.flops, "lam": args.oto_lam, "finish": args.finish, **rounding}
    if args.oto_n_p is not None:
        oto["n_p"] = args.oto_n_p
    periods = {} if args.oto_periods is None else {"periods": args.oto_periods}
    methods = {
        "dense": {"method": "dense", "sparsity": 0.0},
        "oto-hspg": {"method": "oto", "sparsity": group_sparsity, "method_options": {**oto, "variant": "hspg"}},
        "oto-dhspg": {"method": "oto", "sparsity": group_sparsity,
                      "method_options": {**oto, "variant": "dhspg", **periods}},
        "variational": {"method": "variational", "sparsity": group_sparsity,
                        "method_options": {"target_flops": args.flops, "num_samples": samples, "finish": args.finish,
                                           **rounding}},
        "variational-eb": {"method": "variational", "sparsity": group_sparsity,
                           "method_options": {"target_flops": args.flops, "num_samples": samples,
                                              "finish": args.finish, "slab": "empirical",
                                              "slab_prior_weight": args.slab_prior_weight, **rounding}},
        "variational-gates": {"method": "variational", "sparsity": group_sparsity,
                              "method_options": {"target_flops": args.flops, "num_samples": samples,
                                                 "finish": args.finish, "slab_on_weights": False, **rounding}},
        "channel-gmp": {"method": "gmp", "sparsity": group_sparsity, "mask_type": "channel",
                        "method_options": rounding},
        "channel-acdc": {"method": "acdc", "sparsity": group_sparsity, "mask_type": "channel",
                         "method_options": rounding},
    }  # fmt: skip
    assert list(methods) == ["dense", *METHODS]
    methods = {name: settings for name, settings in methods.items() if name == "dense" or name in chosen}
    # Runs are reused by folder: other pruning periods get their own.
    suffix = "" if args.oto_periods is None else f"-periods{args.oto_periods}"
    out, rows = Path(args.out or f"runs/structured-benchmark-{args.model}{suffix}"), []
    if args.slim_training:
        slim_training_timing(args, methods, common, out)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    dense_latency = None
    for seed in args.seeds:
        for name, settings in methods.items():
            # Rounded kept counts or another FLOPs target: the pruned runs' own folders (dense depends on neither).
            variant = "" if name == "dense" else variant_suffix
            if name == "variational-eb" and args.slab_prior_weight:
                variant += f"-nu{args.slab_prior_weight:g}"
            run_dir = out / f"{name}{variant}-seed{seed}"
            summary = run({**common, **settings, "seed": seed}, run_dir, train=not args.latency_only)
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            # train_flops_ratio is cumulative: the ratio of epoch e alone is e r_e - (e - 1) r_(e-1).
            per_epoch = [m["train_flops_ratio"] * m["epoch"] - (p["train_flops_ratio"] * p["epoch"] if p else 0.0)
                         for p, m in zip([None, *metrics[:-1]], metrics)]  # fmt: skip
            epoch_times = [m["time"] - (p["time"] if p else 0.0) for p, m in zip([None, *metrics[:-1]], metrics)]
            row = {"method": name, "seed": seed, "test_acc": summary["sparse_model"]["test_acc"],
                   "flops_removed": 1 - summary["sparse_model"]["forward_flops_ratio"],
                   "train_time_s": summary["wall_time_s"], "epoch_time_s": [round(t, 1) for t in epoch_times],
                   "epoch_train_flops": [round(r, 3) for r in per_epoch]}  # fmt: skip
            if name == "dense":
                model = restore_model(load(str(run_dir / "sparse_final.pt")), run_dir)
                if dense_latency is None:
                    dense_latency = latencies(model, shape, args.repeats)
                row.update(dense_latency)
            else:
                _, small, diff = slim_of(run_dir)
                row["slim_vs_masked_max_diff"] = diff
                row["slim_channels"] = {n: m.out_channels if hasattr(m, "out_channels") else m.out_features
                                        for n, m in small.named_modules()
                                        if isinstance(m, torch.nn.modules.conv._ConvNd | torch.nn.Linear)}  # fmt: skip
                row.update(latencies(small, shape, args.repeats))
            rows.append(row)
            print(json.dumps(row), flush=True)
    # A subset of the methods writes its own files, leaving the full comparison's in place.
    tag = args.model + ("" if args.methods is None else "-" + "+".join(chosen))
    tag += "" if args.oto_periods is None else f"-periods{args.oto_periods}"
    tag += variant_suffix + ("-steady-malloc" if args.steady_malloc else "")
    tag += f"-nu{args.slab_prior_weight:g}" if args.slab_prior_weight and "variational-eb" in chosen else ""
    with open(RESULTS / f"rows-{tag}.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")

    assert dense_latency is not None
    lines = [
        f"{args.model}, {dataset}, {args.epochs} epochs, {samples:,} training samples, seeds {args.seeds}; "
        f"target {args.flops:.0%} of forward FLOPs removed (group sparsity {group_sparsity:.3f} per channel set"
        + ("" if multiple == 1 else f", kept counts rounded to multiples of {multiple}")
        + ")"
        + ("; latencies with steady malloc" if args.steady_malloc else ""),
        "",
        "| method | test acc | FLOPs removed | train time (s) | FLOPs per epoch (train, rel. dense) | "
        "b1 eager speed-up | b1 frozen | b64 eager | b64 frozen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        accs = [r["test_acc"] for r in mine]
        acc = f"{statistics.mean(accs):.2f}" + (f" +- {statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
        speed = [statistics.mean(dense_latency[k] / r[k] for r in mine) for k in
                 ("eager_b1_ms", "frozen_b1_ms", "eager_b64_ms", "frozen_b64_ms")]  # fmt: skip
        lines.append(
            f"| {name} | {acc} | {statistics.mean(r['flops_removed'] for r in mine):.1%} | "
            f"{statistics.mean(r['train_time_s'] for r in mine):.0f} | "
            f"{', '.join(f'{v:.2f}' for v in mine[0]['epoch_train_flops'])} | "
            + " | ".join(f"{s:.2f}x" for s in speed)
            + " |"
        )
    lines.append("")
    lines.append(
        "dense latency (ms): " + ", ".join(f"{k.removesuffix('_ms')} {v:.3f}" for k, v in dense_latency.items())
    )
    (RESULTS / f"table-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
