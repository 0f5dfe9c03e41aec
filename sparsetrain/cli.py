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

from .errors import CheckpointError, ConfigError, SparsetrainError, WriteError, first_line, writing

RECIPES = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = RECIPES / "fashion_mnist" / "lenet5_acdc_s90.yaml"

PLUGGED_COMMANDS = ("deploy", "prune", "slim")

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
    "init_from": str,
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
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run exactly where it stopped (one stopped before its first checkpoint starts "
        "again from the beginning)",
    )
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
        help=_flag_help("comm_hook"),
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
    for axis in ("model", "dataset"):  # likewise a recipe's model and dataset options belong to its model, dataset
        if axis in overrides and overrides[axis] != recipe.get(axis) and recipe.get(f"{axis}_options"):
            recipe = {k: v for k, v in recipe.items() if k != f"{axis}_options"}
    return resolve(recipe, overrides)


def _choose_out_dir(config: dict[str, Any], explicit: bool, prepare: bool = True) -> str:
    """The run's folder, checked (and created, when ``prepare``) before anything is loaded.

    A folder that holds only what a run writes before its first checkpoint (its config, metrics of an epoch that
    never finished, temporary files) is a run that never started: it is cleared and reused.
    """
    from .train.config import default_out_dir
    from .train.outputs import clear_unstarted, folder_state

    out = Path(config["out"] or default_out_dir(config))
    _check_folder_path(out, "--out")
    state = folder_state(out)
    if state in ("run", "other"):
        if explicit:
            if state == "run":
                raise ConfigError(
                    f"output directory {str(out)!r} already holds a run; nothing was overwritten. Continue it with "
                    f"--resume {out}, or choose a new --out"
                )
            raise ConfigError(
                f"output directory {str(out)!r} holds files that are not a sparsetrain run; nothing was "
                "overwritten. Choose a new or empty --out"
            )
        # The default name is taken: number the new run rather than touch the old one.
        n = 2
        while folder_state(out.parent / f"{out.name}-{n}") in ("run", "other"):
            n += 1
        out = out.parent / f"{out.name}-{n}"
        _check_folder_path(out, "--out")
        state = folder_state(out)
    if prepare:
        with writing(out):
            if state == "unstarted":
                logging.getLogger(__name__).info("%s: a run that stopped before its first checkpoint; reused", out)
                clear_unstarted(out)
            out.mkdir(parents=True, exist_ok=True)  # unwritable places fail here, before any data loads
    return str(out)


def _check_folder_path(path: Path, option: str) -> None:
    """A folder path whose own name or a parent's names an existing file is a usage error."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "is" if part == path else f"is inside {str(part)!r}, which is"
                raise ConfigError(f"{option} {str(path)!r} {what} a file, not a folder; choose a folder")
            return


def launch_distributed(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with N processes (checked before any process starts)."""
    import os
    import subprocess

    from .train.fsdp import check_fsdp_world

    cpus = os.cpu_count() or 1
    if args.nproc < 1 or args.nproc > cpus:
        raise ConfigError(f"--nproc {args.nproc}: this machine can run 1 to {cpus} processes (it has {cpus} CPUs)")
    if not args.resume:
        config = _train_config(args)  # validate everything here, once, before any process starts
        if config["batch_size"] % args.nproc:
            raise ConfigError(f"batch_size {config['batch_size']} does not divide among {args.nproc} processes")
        _check_method_fits_hook(config)
        check_fsdp_world(config, args.nproc)
        # Last: it creates the run's folder, which a usage error must not leave behind.
        if config["out"] is None:
            config["out"] = _choose_out_dir(config, explicit=False)
            argv = [*argv, "--out", config["out"]]
        else:
            _choose_out_dir(config, explicit=True)
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
    from sparsetrain.distributed.hooks import check_hook, hook_options

    try:  # the same check the trainer makes, here before any process starts
        method = sparsetrain.get_method(config["method"])
        check_hook(config["comm_hook"], method, hook_options(config["comm_hook"], config))
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _resume_config(run_dir: Path, main_rank: bool) -> tuple[dict[str, Any], bool, str]:
    """The config of the run in ``run_dir`` and whether it resumes from ``last.pt`` (False: the run stopped
    before its first checkpoint and starts again from the beginning with its saved config)."""
    from .train.checkpoint import load
    from .train.config import validate, yaml_load
    from .train.outputs import LAST, RESUME_KEYS, clear_unstarted, folder_state, remove_stale_temporaries

    state = folder_state(run_dir)
    if state == "unstarted" and (run_dir / "config.yaml").is_file():
        # Stopped (Ctrl-C, kill, crash) before the first epoch finished: nothing to continue, so start it afresh.
        try:
            config = yaml_load((run_dir / "config.yaml").read_text())
        except Exception as error:  # noqa: BLE001 - any unreadable config is the same dead end for the user
            raise CheckpointError(f"{str(run_dir / 'config.yaml')!r} could not be read ({first_line(error)})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{str(run_dir / 'config.yaml')!r} is not a run's config (not a mapping)")
        config = validate(config)
        if main_rank:  # config.yaml stays: the other ranks of a data-parallel run read it too
            with writing(run_dir):
                clear_unstarted(run_dir, keep=("config.yaml",))
        config["out"] = str(run_dir)
        return config, False, " (no epoch had finished: started again from the beginning)"
    if not (run_dir / LAST).is_file():
        raise CheckpointError(f"{str(run_dir)!r} has no {LAST} to resume from; give the directory of a run")
    if (run_dir / LAST).stat().st_size == 0:  # never written by sparsetrain (its writes are atomic): a bad copy
        raise CheckpointError(f"{str(run_dir / LAST)!r} is empty (0 bytes); there is nothing to resume from")
    data = load(run_dir / LAST)
    missing = [key for key in RESUME_KEYS if key not in data]
    if data.get("kind") != "last" or missing:
        raise CheckpointError(
            f"{str(run_dir / LAST)!r} is a {data.get('kind') or 'sparsetrain'} checkpoint, not the state of a run "
            f"in progress (it lacks {', '.join(missing) or 'the last-epoch state'}); --resume needs the {LAST} "
            "that sparsetrain train writes"
        )
    if not isinstance(data["config"], dict):
        raise CheckpointError(f"{str(run_dir / LAST)!r} holds no run config (config is {data['config']!r})")
    try:
        config = validate(data["config"])
    except ConfigError as error:
        raise CheckpointError(f"{str(run_dir / LAST)!r} holds a config this version cannot use: {error}") from None
    if main_rank:
        with writing(run_dir):
            stale = remove_stale_temporaries(run_dir)
        if stale:
            logging.getLogger(__name__).info("removed unfinished temporary files: %s", ", ".join(stale))
    config["out"] = str(run_dir)
    return config, True, " (resumed)"


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train.config import describe
    from .train.fsdp import check_fsdp_world
    from .train.outputs import LAST

    main_rank = os.environ.get("RANK", "0") == "0"
    if args.resume:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise CheckpointError(f"{str(run_dir)!r} is not a folder; --resume takes the directory of a run")
        config, resume, note = _resume_config(run_dir, main_rank)
        if args.data_dir is not None:  # the user's path wins over the one recorded in the checkpoint
            config["data_dir"] = args.data_dir
    else:
        config = _train_config(args)
        check_fsdp_world(config, int(os.environ.get("WORLD_SIZE", "1")))  # before the run's folder is made
        explicit = config["out"] is not None
        # Under torchrun the launcher (and rank 0) prepared the folder; the other ranks only read the path.
        config["out"] = _choose_out_dir(config, explicit, prepare=main_rank)
        resume, note = False, ""
    progress = args.progress if args.progress is not None else sys.stderr.isatty() and main_rank
    if config["progress"] is not None and args.progress is None:
        progress = config["progress"]
    if main_rank:
        print(f"sparsetrain: {describe(config)} -> {config['out']}{note}", flush=True)
    out = Path(config["out"])
    try:
        return _train(config, resume, progress, main_rank)
    except KeyboardInterrupt:
        if main_rank:
            print("\ninterrupted; " + _saved_advice(out, LAST), file=sys.stderr)
        return 130
    except WriteError as error:
        if (out / LAST).is_file():
            raise WriteError(f"{error}. {_saved_advice(out, LAST)} once it can be written") from None
        raise


def _saved_advice(out: Path, last: str) -> str:
    """What is left to continue from: said only when it is true."""
    if (out / last).is_file():
        return f"the last finished epoch is saved in {out / last}: continue with --resume {out}"
    return (
        f"no epoch had finished, so nothing was saved; run the same command again (it reuses {out}) "
        f"or --resume {out} (which starts it from the beginning)"
    )


def _train(config: dict[str, Any], resume: bool, progress: bool, main_rank: bool) -> int:
    from .train.loop import Run

    def on_epoch(row: dict[str, Any]) -> None:
        key = "ppl" if "val_ppl" in row else "acc"  # perplexity where the dataset reports it (text)
        print(
            f"epoch {row['epoch']:3d}/{config['epochs']}  {row['phase']:6s}  loss {row['train_loss']:.4f}  "
            f"{key}: train {row[f'train_{key}']:5.2f}  val {row[f'val_{key}']:5.2f}  test {row[f'test_{key}']:5.2f}  "
            f"sparsity {row['sparsity']:.3f}  lr {row['lr']:.4f}  {row['time']:6.1f}s",
            flush=True,
        )

    summary = Run(config, resume=resume, on_epoch=on_epoch, progress=progress).run()
    if main_rank:
        print(format_summary(summary))
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    # Accuracy, or perplexity for language modelling (summaries written before the metric existed: accuracy).
    key = "ppl" if summary.get("metric") == "perplexity" else "acc"
    rows = [("model", f"val {key}", f"test {key}", "sparsity")]
    sparse = summary["sparse_model"]
    dense = summary["dense_model"]
    import sparsetrain

    def row(label: str, record: dict[str, Any]) -> tuple[str, str, str, str]:
        return (label, f"{record[f'val_{key}']:.2f}", f"{record[f'test_{key}']:.2f}", f"{record['sparsity']:.4f}")

    makes_sparse = sparsetrain.Capability.SPARSE | sparsetrain.Capability.PRUNE_AFTER_TRAINING
    if not sparsetrain.get_method(summary["method"]).capabilities & makes_sparse:  # the dense baseline
        rows.append(row("dense (final)", sparse))
    else:
        rows.append(row("sparse (final)", sparse))
        if dense is not None:
            rows.append(row(f"dense (best, epoch {dense['epoch']:g})", dense))
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
        *([kernels["report"]] if (kernels := summary.get("sparse_kernels")) else []),
        *(
            [
                f"slim training: {slim['rebuilds']} slim structures built over {slim['mask_changes']} mask changes; "
                "channels at the end: " + ", ".join(f"{name} {kept}" for name, kept in slim["widths"].items())
            ]
            if (slim := summary.get("slim_training"))
            else []
        ),
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
    from .maskops import count_zeros
    from .train.checkpoint import load, require, restore_model
    from .train.data import load_run_dataset
    from .train.evaluation import evaluate

    if Path(args.checkpoint).is_file() and Path(args.checkpoint).suffix != ".pt":
        data = _export_file_as_checkpoint(args.checkpoint)  # an export file, e.g. from `sparsetrain slim`
        model = data.pop("module")
    else:
        data = load(args.checkpoint)
        require(data, args.checkpoint, "model", "model_spec", "config")
        model = restore_model(data, args.checkpoint)
    config = data["config"]
    splits = load_run_dataset(config, args.data_dir)
    test = evaluate(model, splits.test, 1000, torch.device("cpu"))
    print(f"{args.checkpoint}: {data.get('kind', '?')} model, {config['model']} on {config['dataset']}")
    if splits.metric == "perplexity":
        print(f"test perplexity: {test['ppl']:.3f}   test loss: {test['loss']:.4f} per token")
    else:
        print(f"test accuracy: {test['acc']:.2f}%   test loss: {test['loss']:.4f}")
    print(f"{'parameter':40s} {'shape':>18s} {'sparsity':>9s}")
    zeros = total = 0
    for name, tensor in data["model"].items():
        if tensor.dim() < 2 or not tensor.is_floating_point():
            continue
        z = count_zeros(tensor)
        zeros, total = zeros + z, total + tensor.numel()
        print(f"{name:40s} {str(tuple(tensor.shape)):>18s} {z / tensor.numel():9.4f}")
    print(f"{'all weights (dim >= 2)':40s} {'':>18s} {zeros / max(total, 1):9.4f}")
    flops = FlopCounter(model, splits.test[:1][0]).forward()
    print(
        f"forward FLOPs per sample (multiply-adds): dense {flops.dense_total:,}, nonzero {flops.sparse_total:,} "
        f"({flops.ratio:.3f} of dense)"
    )
    return 0


def _export_file_as_checkpoint(path: str) -> dict[str, Any]:
    """An export file that keeps its run's config (``sparsetrain slim`` writes one) in the form eval reads."""
    from . import export
    from .train.config import validate

    exported = export.read(path)
    config = exported.metadata.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{path!r} is an export file without its run's config, so eval does not know its data set; evaluate "
            "the run's checkpoint instead, or a file written by `sparsetrain slim`"
        )
    try:
        config = validate(config)
    except ConfigError as error:
        raise CheckpointError(f"{path!r} holds a config this version cannot use: {error}") from None
    model = export.load(path)
    kind = (exported.metadata.get("run") or {}).get("kind") or "exported"
    slim = " slim" if "slim" in (exported.model_spec or {}) else ""
    return {"module": model, "model": model.state_dict(), "config": config, "kind": f"{kind}{slim}"}


# ---------------------------------------------------------------------------------------------------- compare
# Config keys that do not change what is learned (where files go, how it ran), and the seed and sparsity, which a
# comparison varies: runs that differ only in these are the same task. The method's own settings form the line.
NOT_TASK = ("seed", "sparsity", "out", "data_dir", "device", "threads", "progress", "plots", "check_masks", "fsdp",
            "eval_batch_size", "method", "method_options", "distribution")  # fmt: skip
METHOD_SIDE = ("method_options", "distribution")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    return float(value)


def _read_run(folder: Path, summary: Any) -> dict[str, Any]:
    """One run's comparable record from its summary.json (and config.yaml when there); ValueError if foreign."""
    from .train.config import yaml_load

    if not isinstance(summary, dict):
        raise ValueError("not a JSON object")
    try:
        sparse, dense = summary["sparse_model"], summary["dense_model"]
        method = summary["method"]
        if not isinstance(method, str) or not isinstance(sparse, dict) or not isinstance(dense, (dict, type(None))):
            raise ValueError("method or sparse_model has the wrong type")
        run = {
            "folder": folder,
            "method": method,
            "sparsity": _number(sparse["sparsity"], "sparse_model.sparsity"),
            "test_acc": _number(sparse["test_acc"], "sparse_model.test_acc"),
            "dense_acc": None if dense is None else _number(dense["test_acc"], "dense_model.test_acc"),
            "flops": _number(summary["train_flops_ratio"], "train_flops_ratio"),
            "time": _number(summary["wall_time_s"], "wall_time_s"),
            "seed": summary.get("seed"),
        }
        task = {key: summary[key] for key in ("dataset", "model", "epochs")}
        task["mask_type"] = summary.get("mask_type", "unstructured")
    except KeyError as error:
        raise ValueError(f"no {error.args[0]!r}") from None
    except TypeError as error:
        raise ValueError(first_line(error)) from None
    side: dict[str, Any] = {}
    config_path = folder / "config.yaml"
    if config_path.is_file():
        try:
            config = yaml_load(config_path.read_text())
        except Exception:  # noqa: BLE001 - an unreadable config leaves the summary's own fields
            config = None
        if isinstance(config, dict):
            # The dataset's files are its identity for the data sets read from a user's folder.
            own_data = config.get("dataset") in ("npz", "imagefolder")
            task.update({k: v for k, v in config.items() if k not in NOT_TASK or (own_data and k == "data_dir")})
            side = {k: config.get(k) for k in METHOD_SIDE}
    run["task"] = json.dumps(task, sort_keys=True, default=str)
    run["side"] = json.dumps(side, sort_keys=True, default=str)
    return run


def _summaries(paths: list[str]) -> list[dict[str, Any]]:
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
                found.append(_read_run(candidate.parent, json.loads(candidate.read_text())))
            except (ValueError, OSError) as error:  # json.JSONDecodeError is a ValueError
                print(f"warning: skipping {candidate}: not a sparsetrain run summary ({first_line(error)})",
                      file=sys.stderr)  # fmt: skip
    if not found:
        raise ConfigError(f"no usable run summary in {', '.join(map(repr, paths))}; nothing to compare")
    return found


def _differing(records: list[dict[str, Any]]) -> set[str]:
    keys = {k for r in records for k in r}
    return {k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in records}) > 1}


def _describe_task(task: dict[str, Any], differing: set[str]) -> str:
    text = f"{task.get('model')} on {task.get('dataset')}, {task.get('epochs')} epochs"
    extra = sorted(differing - {"model", "dataset", "epochs"})
    return text + "".join(f", {key}={task.get(key)}" for key in extra)


def group_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over the seeds of each (task, method, sparsity): never over different tasks.

    A task is everything that changes what is learned except the seed and the sparsity: dataset, model, epochs,
    mask type and the rest of the recipe. A line is one method (with its own options) on one task.
    """
    import statistics

    tasks = {r["task"]: json.loads(r["task"]) for r in runs}
    task_text = {key: _describe_task(task, _differing(list(tasks.values()))) for key, task in tasks.items()}
    lines: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        lines.setdefault((run["task"], run["method"], run["side"]), []).append(run)
    rows = []
    for (task, method, side), members in lines.items():
        # Two lines of one method on one task differ in the method's own options: name what differs.
        siblings = [json.loads(s) for (t, m, s) in lines if t == task and m == method]
        line = method + "".join(f", {k}={json.loads(side).get(k)}" for k in sorted(_differing(siblings)))
        label = f"{line} - {task_text[task]}" if len(tasks) > 1 else line
        points: dict[float, list[dict[str, Any]]] = {}
        for run in members:
            points.setdefault(round(run["sparsity"], 3), []).append(run)
        for sparsity, group in sorted(points.items()):
            accs = [r["test_acc"] for r in group]
            dense = [r["dense_acc"] for r in group if r["dense_acc"] is not None]
            rows.append({
                "label": label, "line": line, "task": task_text[task], "method": method, "sparsity": sparsity,
                "n": len(group),
                "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "dense_mean": statistics.mean(dense) if dense else None,
                "flops": statistics.mean(r["flops"] for r in group), "time": statistics.mean(r["time"] for r in group),
                "seeds": sorted({r["seed"] for r in group}, key=str),
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["task"], r["label"], r["sparsity"]))


def cmd_compare(args: argparse.Namespace) -> int:
    try:
        from .train.plots import plot_compare, plot_formats
    except ImportError:
        plot_compare = plot_formats = None
    if plot_formats is not None:
        suffix = Path(args.plot).suffix[1:].lower()
        if suffix and suffix not in plot_formats():
            raise ConfigError(
                f"--plot {args.plot!r}: unknown image type {suffix!r}; use one of {', '.join(plot_formats())}"
            )
    rows = group_runs(_summaries(args.runs))
    width = max(len("task"), *(len(r["task"]) for r in rows))
    label_width = max(len("method"), *(len(r["line"]) for r in rows))
    header = (
        f"{'task':{width}s}  {'method':{label_width}s} {'sparsity':>8s} {'n':>3s} {'sparse acc':>14s} "
        f"{'dense acc':>9s} {'FLOPs':>6s} {'time':>7s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        acc = f"{r['mean']:.2f}" + (f" +- {r['std']:.2f}" if r["n"] > 1 else "")
        dense = f"{r['dense_mean']:.2f}" if r["dense_mean"] is not None else "-"
        print(
            f"{r['task']:{width}s}  {r['line']:{label_width}s} {r['sparsity']:8.3f} {r['n']:3d} "
            f"{acc:>14s} {dense:>9s} {r['flops']:6.3f} {r['time']:6.0f}s"
        )
    print("n: runs averaged (seeds of the same task); sparse acc: mean +- standard deviation over them")
    if plot_compare is None:
        print("(no plot: pip install matplotlib)")
    else:
        print(f"plot: {plot_compare(rows, args.plot)}")
    return 0


# ---------------------------------------------------------------------------------------------------- methods
def cmd_methods(args: argparse.Namespace) -> int:
    import sparsetrain

    common = set(sparsetrain.core.common_options())
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
    try:
        if args.command == "train" and getattr(args, "nproc", None):
            return launch_distributed(args, list(sys.argv[1:] if argv is None else argv))
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return handler(args)
    except SparsetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # `train` says itself what was saved
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as error:
        # A file system failure outside the writers that name their file (those raise WriteError above).
        where = f" ({error.filename})" if error.filename else ""
        print(f"error: {error.strerror or first_line(error)}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
