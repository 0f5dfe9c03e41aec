"""``sparsetrain train | eval | compare | methods``: the command-line face of the library.

User mistakes end with a one-paragraph message and exit code 2 (usage) or 1 (runtime), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, SparsetrainError

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "fashion_mnist" / "lenet5_acdc_s90.yaml"

PLUGGED_COMMANDS = ("deploy", "prune")

# Command-line flags that map straight onto config keys.
FLAGS = {
    "method": str,
    "sparsity": float,
    "model": str,
    "dataset": str,
    "data_dir": str,
    "epochs": int,
    "batch_size": int,
    "lr": float,
    "optimizer": str,
    "schedule": str,
    "seed": int,
    "out": str,
    "device": str,
    "mask_type": str,
    "distribution": str,
    "threads": int,
    "limit_train": int,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsetrain", description="Train sparse yet accurate neural networks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train a model (default: AC/DC 90%% on Fashion-MNIST, LeNet-5)",
        description="Train with a sparse-training method. With no arguments runs the default "
        f"recipe ({DEFAULT_RECIPE.relative_to(RECIPES.parent)}).",
    )
    train.add_argument("--recipe", help="YAML recipe (see sparsetrain/recipes/)")
    for key, kind in FLAGS.items():
        train.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=_flag_help(key))
    train.add_argument("--amp", action="store_true", default=None, help="mixed precision")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any option, e.g. --set weight_decay=1e-4 --set method_options.warmup=2",
    )
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly where it stopped")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel over N processes on this machine (launches torchrun; gloo on CPU)",
    )
    train.add_argument(
        "--comm-hook",
        dest="comm_hook",
        default=None,
        help="gradient communication: none, allreduce, fp16, qsgd, natural, masked",
    )
    bar = train.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="show a progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    evaluate = sub.add_parser("eval", help="accuracy, per-layer sparsity and FLOPs of a checkpoint")
    evaluate.add_argument("checkpoint", help="a .pt file written by sparsetrain train (or a run directory)")
    evaluate.add_argument("--data-dir", help="where the dataset is, if not where training found it")

    compare = sub.add_parser("compare", help="table and plot of accuracy against sparsity across runs")
    compare.add_argument("runs", nargs="+", help="run directories (or folders of run directories)")
    compare.add_argument("--plot", default="compare.png", help="where to write the plot (default: compare.png)")

    methods = sub.add_parser("methods", help="list the methods with their options")
    methods.add_argument("pattern", nargs="?", default="*", help="glob filter, e.g. 'g*'")
    for name in PLUGGED_COMMANDS:
        # Commands that live beside their feature (export/bench, prune) register their own subparsers.
        try:
            module = importlib.import_module(f"sparsetrain.commands.{name}")
        except ImportError:
            continue
        module.add_parsers(sub)
    return parser


def _flag_help(key: str) -> str:
    from .train.config import SCHEMA

    return SCHEMA[key][2]


# ---------------------------------------------------------------------------------------------------- train
def _train_config(args: argparse.Namespace) -> dict[str, Any]:
    from .train.config import load_recipe, parse_override, resolve

    recipe = load_recipe(args.recipe or DEFAULT_RECIPE)
    overrides: dict[str, Any] = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    if args.amp:
        overrides["amp"] = True
    if args.comm_hook is not None:
        overrides["comm_hook"] = args.comm_hook
    for text in args.set:
        key, value = parse_override(text)
        overrides[key] = value
    if "method" in overrides and overrides["method"] != recipe.get("method", "acdc") and recipe.get("method_options"):
        # A recipe's method options belong to its method; another method starts from its own defaults.
        logging.getLogger(__name__).info(
            "method changed to %s: the recipe's method_options are not used", overrides["method"]
        )
        recipe = {k: v for k, v in recipe.items() if k != "method_options"}
    return resolve(recipe, overrides)


def _choose_out_dir(config: dict[str, Any], explicit: bool) -> str:
    from .train.config import default_out_dir

    out = Path(config["out"] or default_out_dir(config))
    if out.exists() and any(out.iterdir()):
        if explicit:
            raise ConfigError(
                f"output directory {str(out)!r} already holds a run; nothing was overwritten. Continue it with "
                f"--resume {out}, or choose a new --out"
            )
        # The default name is taken: number the new run rather than touch the old one.
        n = 2
        while (out.parent / f"{out.name}-{n}").exists():
            n += 1
        out = out.parent / f"{out.name}-{n}"
    return str(out)


def launch_distributed(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with N processes (checked before any process starts)."""
    import os
    import subprocess

    cpus = os.cpu_count() or 1
    if args.nproc < 1 or args.nproc > cpus:
        raise ConfigError(f"--nproc {args.nproc}: this machine can run 1 to {cpus} processes (it has {cpus} CPUs)")
    if not args.resume:
        config = _train_config(args)  # validate everything here, once, before any process starts
        if config["batch_size"] % args.nproc:
            raise ConfigError(f"batch_size {config['batch_size']} does not divide among {args.nproc} processes")
        if config["out"] is None:
            config["out"] = _choose_out_dir(config, explicit=False)
            argv = [*argv, "--out", config["out"]]
        else:
            _choose_out_dir(config, explicit=True)
        _check_method_fits_hook(config)
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        rest.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "sparsetrain", *rest]  # fmt: skip
    threads = max(1, cpus // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(command, env=env).returncode


def _check_method_fits_hook(config: dict[str, Any]) -> None:
    import sparsetrain
    from sparsetrain.distributed import check_hook

    method = sparsetrain.get_method(config["method"]) if config["method"] in sparsetrain.list_methods() else None
    if method is None:
        raise ConfigError(f"unknown method {config['method']!r}; available: {', '.join(sparsetrain.list_methods())}")
    options = {}
    if config["comm_hook"] == "qsgd":
        options = {"levels": config["qsgd_levels"], "bucket_size": config["qsgd_bucket"], "norm": config["qsgd_norm"]}
    try:
        check_hook(config["comm_hook"], None, options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config["comm_hook"] == "masked" and "dense_gradients" in method.capabilities:
        raise ConfigError(
            f"the masked hook does not fit method {config['method']!r}: it needs dense gradients "
            "at every step; use --comm-hook none, fp16, qsgd or natural"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from .train.checkpoint import load
    from .train.config import validate
    from .train.loop import LAST, Run, describe

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / LAST).is_file():
            raise CheckpointError(f"{str(run_dir)!r} has no {LAST} to resume from; give the directory of a run")
        config = validate(load(run_dir / LAST)["config"])
        config["out"] = str(run_dir)
        if args.data_dir is not None:  # the user's path wins over the one recorded in the checkpoint
            config["data_dir"] = args.data_dir
        resume = True
    else:
        config = _train_config(args)
        explicit = config["out"] is not None
        config["out"] = _choose_out_dir(config, explicit)
        resume = False
    import os

    main_rank = os.environ.get("RANK", "0") == "0"
    progress = args.progress if args.progress is not None else sys.stderr.isatty() and main_rank
    if config["progress"] is not None and args.progress is None:
        progress = config["progress"]
    if main_rank:
        print(f"sparsetrain: {describe(config)} -> {config['out']}" + (" (resumed)" if resume else ""), flush=True)

    def on_epoch(row: dict[str, Any]) -> None:
        print(
            f"epoch {row['epoch']:3d}/{config['epochs']}  {row['phase']:6s}  loss {row['train_loss']:.4f}  "
            f"train {row['train_acc']:5.2f}  val {row['val_acc']:5.2f}  test {row['test_acc']:5.2f}  "
            f"sparsity {row['sparsity']:.3f}  lr {row['lr']:.4f}  {row['time']:6.1f}s",
            flush=True,
        )

    summary = Run(config, resume=resume, on_epoch=on_epoch, progress=progress).run()
    if main_rank:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    rows = [("model", "val acc", "test acc", "sparsity")]
    sparse = summary["sparse_model"]
    dense = summary["dense_model"]
    if summary["method"] == "dense":
        rows.append(
            ("dense (final)", f"{sparse['val_acc']:.2f}", f"{sparse['test_acc']:.2f}", f"{sparse['sparsity']:.4f}")
        )
    else:
        rows.append(
            ("sparse (final)", f"{sparse['val_acc']:.2f}", f"{sparse['test_acc']:.2f}", f"{sparse['sparsity']:.4f}")
        )
        if dense is not None:
            rows.append(
                (
                    f"dense (best, epoch {dense['epoch']:g})",
                    f"{dense['val_acc']:.2f}",
                    f"{dense['test_acc']:.2f}",
                    f"{dense['sparsity']:.4f}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [f"+{line}+"]
    for i, row in enumerate(rows):
        out.append(
            "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))) + " |"
        )
        if i == 0:
            out.append(f"+{line}+")
    out.append(f"+{line}+")
    minutes, seconds = divmod(summary["wall_time_s"], 60)
    out += [
        f"training FLOPs relative to dense: {summary['train_flops_ratio']:.3f}",
        f"sparse model forward FLOPs relative to dense: {sparse['forward_flops_ratio']:.3f}",
        f"wall time: {int(minutes)}m{seconds:04.1f}s",
        *(
            [
                f"processes: {summary['processes']}, comm hook {comm['hook']}: {comm['bits_per_coordinate']:.2f} "
                "bits per gradient coordinate sent"
            ]
            if (comm := summary.get("communication"))
            else []
        ),
        f"outputs: {summary['out']}/ ({', '.join(summary['files'])})",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .flops import FlopCounter
    from .train.checkpoint import load
    from .train.data import load_dataset
    from .train.loop import evaluate
    from .train.models import build_model

    data = load(args.checkpoint)
    config = data["config"]
    try:
        model = build_model(**data["model_spec"])
        model.load_state_dict(data["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} does not match its model spec ({str(error).splitlines()[0][:200]})"
        ) from None
    splits = load_dataset(
        config["dataset"],
        data_dir=args.data_dir or config["data_dir"],
        val_fraction=config["val_fraction"],
        seed=config["seed"],
    )
    test = evaluate(model, splits.test, 1000, torch.device("cpu"))
    print(f"{args.checkpoint}: {data.get('kind', '?')} model, {config['model']} on {config['dataset']}")
    print(f"test accuracy: {test['acc']:.2f}%   test loss: {test['loss']:.4f}")
    print(f"{'parameter':40s} {'shape':>18s} {'sparsity':>9s}")
    zeros = total = 0
    for name, tensor in data["model"].items():
        if tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        z = tensor.numel() - int(torch.count_nonzero(tensor))
        zeros, total = zeros + z, total + tensor.numel()
        print(f"{name:40s} {str(tuple(tensor.shape)):>18s} {z / tensor.numel():9.4f}")
    print(f"{'all weights (dim >= 2)':40s} {'':>18s} {zeros / max(total, 1):9.4f}")
    flops = FlopCounter(model, splits.test[:1][0]).forward()
    print(
        f"forward FLOPs per sample (multiply-adds): dense {flops.dense_total:,}, nonzero {flops.sparse_total:,} "
        f"({flops.ratio:.3f} of dense)"
    )
    return 0


# ---------------------------------------------------------------------------------------------------- compare
def _summaries(paths: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for raw in paths:
        path = Path(raw)
        candidates = (
            [path / "summary.json"] if (path / "summary.json").is_file() else sorted(path.glob("*/summary.json"))
        )
        if not candidates:
            raise ConfigError(f"{raw!r} is not a finished run (no summary.json in it or its subfolders)")
        for candidate in candidates:
            try:
                found.append((candidate.parent, json.loads(candidate.read_text())))
            except json.JSONDecodeError:
                raise CheckpointError(f"{str(candidate)!r} is not valid JSON") from None
    return found


def cmd_compare(args: argparse.Namespace) -> int:
    runs = _summaries(args.runs)
    header = (
        f"{'run':40s} {'method':10s} {'sparsity':>8s} {'sparse acc':>10s} {'dense acc':>9s} {'FLOPs':>6s} {'time':>7s}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for path, s in runs:
        sparse, dense = s["sparse_model"], s["dense_model"]
        dense_acc = f"{dense['test_acc']:.2f}" if dense else "-"
        print(
            f"{path.name[:40]:40s} {s['method']:10s} {sparse['sparsity']:8.4f} {sparse['test_acc']:10.2f} "
            f"{dense_acc:>9s} {s['train_flops_ratio']:6.3f} {s['wall_time_s']:6.0f}s"
        )
        rows.append({"method": s["method"], "sparsity": sparse["sparsity"], "test_acc": sparse["test_acc"]})
    try:
        from .train.plots import plot_compare

        print(f"plot: {plot_compare(rows, args.plot)}")
    except ImportError:
        print("(no plot: pip install matplotlib)")
    return 0


# ---------------------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> int:
    import sparsetrain

    common = set(sparsetrain.method_options("dense"))
    names = sparsetrain.list_methods(args.pattern)
    if not names:
        raise ConfigError(f"no method matches {args.pattern!r}; methods: {', '.join(sparsetrain.list_methods())}")
    for name in names:
        print(f"{name:10s} {sparsetrain.method_summary(name)}")
        own = {k: v for k, v in sparsetrain.method_options(name).items() if k not in common}
        if own:
            print(" " * 11 + "options: " + ", ".join(f"{k}={v!r}" for k, v in own.items()))
    print("\ncommon options: " + ", ".join(sorted(common - {"sparsity"})))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    from .train.data import DataError

    try:
        if args.command == "train" and getattr(args, "nproc", None):
            return launch_distributed(args, list(sys.argv[1:] if argv is None else argv))
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except SparsetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the last finished epoch is saved: continue with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
