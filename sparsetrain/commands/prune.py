"""``sparsetrain prune``: one-shot pruning of a trained checkpoint, with batch-norm re-calibration.

The post-training half of CrAM (Peste et al., ICLR 2023), usable on any checkpoint: for each sparsity, prune the
trained model once, by magnitude (default) or with OBC / ExactOBS (Frantar & Alistarh, NeurIPS 2022, arXiv
2208.11580) on calibration samples of the training set at magnitude's per-layer allocation, re-estimate its
batch-norm statistics on about 1000 training samples, print the
test accuracy (the test perplexity for a language model's run) before and after, and save the pruned model next to
the input. A command function: it prints its table. User mistakes raise ``ConfigError`` (exit code 2) or
``CheckpointError`` (exit code 1).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import ConfigError, writing
from . import prune_mfac

DEFAULT_SPARSITIES = "0.5,0.7,0.9"
DEFAULT_CALIBRATION_SAMPLES = 1000
DEFAULT_OBC_SAMPLES = 1024
METHODS = ("magnitude", "obc", "spdy", "mfac")
ALLOCATIONS = ("database", "magnitude")


def add_parsers(subparsers: Any) -> None:
    """Add the ``prune`` subcommand to the CLI's subparsers."""
    prune = subparsers.add_parser(
        "prune",
        help="one-shot pruning (magnitude or OBC) of a checkpoint at several sparsities, with batch-norm "
        "re-calibration",
        description="Prune the model of a sparsetrain checkpoint (or run directory) once at each sparsity (or to "
        "an N:M pattern), by magnitude or with OBC / ExactOBS (Frantar & Alistarh 2022), re-estimate its "
        "batch-norm running statistics on training samples, and "
        "print the test accuracy (perplexity for a language model) before and after re-calibration. Each pruned "
        "model is saved next to the input "
        "as pruned_s<SPARSITY>.pt (pruned_<N>of<M>.pt for N:M), in the checkpoint format. Meant for CrAM-trained "
        "models, and works on any.",
    )
    prune.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help="a .pt file or a run directory")
    prune.add_argument(
        "--sparsity",
        default=None,
        help=f"comma-separated sparsities in [0, 1) (default: {DEFAULT_SPARSITIES}; not used with an N:M --mask-type)",
    )
    prune.add_argument(
        "--method",
        choices=METHODS,
        default="magnitude",
        help="magnitude (default) or obc: OBC / ExactOBS solves each Linear/Conv2d layer with greedy OBS on its "
        "calibration inputs, layer by layer, at the per-layer sparsities that magnitude pruning with the same "
        "--distribution gives (default: global magnitude's allocation); spdy: per-layer sparsities from the OBC "
        "database that meet --target-speedup at --batch-size on this CPU (SPDY, Frantar & Alistarh 2022); mfac: "
        "M-FAC (Frantar, Kurtic & Alistarh 2021), OBS saliency ranked over all layers by --distribution and the "
        "exact OBS correction, block by block, from the empirical Fisher of --gradients training gradients",
    )
    from .prune_spdy import add_spdy_arguments

    add_spdy_arguments(prune)
    prune.add_argument(
        "--allocation",
        choices=ALLOCATIONS,
        default=None,
        help="--method obc: database (default): per-layer sparsities chosen from the OBC database (each layer "
        "solved at a grid of sparsities, cached next to the checkpoint as <CHECKPOINT>.obcdb.safetensors) by a "
        "dynamic program on the summed layer errors; OBC at magnitude's allocation is run too and the lower "
        "calibration loss is kept. magnitude: the per-layer sparsities of magnitude pruning with --distribution",
    )
    prune.add_argument(
        "--calibration",
        type=int,
        default=None,
        metavar="N",
        help=f"--method obc or spdy: training samples whose layer inputs give each layer's Hessian (default: "
        f"{DEFAULT_OBC_SAMPLES}); --method mfac: training samples for the --gradients gradients, split evenly "
        "(default: one sample per gradient)",
    )
    prune.add_argument(
        "--solver",
        choices=("auto", "exact", "sparsegpt"),
        default=None,
        help="--method obc: per-layer solver; auto (default): ExactOBS up to 1024 inputs per row, SparseGPT "
        "(one Cholesky factor for all rows, lazy column blocks) for wider layers",
    )
    prune_mfac.add_arguments(prune)
    prune.add_argument("--mask-type", default="unstructured", help="unstructured (default) or N:M such as 2:4")
    prune.add_argument(
        "--distribution", default="global", help="global (default: one ranking over all layers), uniform or erk"
    )
    prune.add_argument(
        "--calibrate",
        type=int,
        default=DEFAULT_CALIBRATION_SAMPLES,
        metavar="N",
        help=f"training samples for batch-norm re-calibration (default: {DEFAULT_CALIBRATION_SAMPLES}; 0: none)",
    )
    prune.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep parameters matching this glob dense (repeatable; adds to the training run's exclude)",
    )
    prune.add_argument("--data-dir", help="where the dataset is, if not where training found it")
    prune.add_argument("--out-dir", help="where to write the pruned checkpoints (default: next to the input)")
    prune.add_argument("--force", action="store_true", help="replace pruned checkpoints that exist")
    prune.set_defaults(handler=cmd_prune)


def parse_sparsities(text: str | None, mask_type: str) -> list[float | None]:
    """The sparsities to prune to: a list of numbers in [0, 1), or ``[None]`` for an N:M mask type."""
    from ..maskops import check_sparsity, nm_sparsity, parse_nm

    try:
        nm = parse_nm(mask_type)
    except ValueError as error:
        raise ConfigError(f"--mask-type: {error}") from None
    if nm is not None:
        implied = nm_sparsity(mask_type)
        if text is not None:
            values = _parse_numbers(text)
            if any(abs(v - implied) > 1e-9 for v in values):
                raise ConfigError(
                    f"--mask-type {mask_type} fixes the sparsity at {implied:g}; leave --sparsity out (got {text!r})"
                )
        return [None]
    values = _parse_numbers(text or DEFAULT_SPARSITIES)
    try:
        return [check_sparsity(v) for v in values]
    except ValueError as error:
        raise ConfigError(f"--sparsity: {error}") from None


def _parse_numbers(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--sparsity must be comma-separated numbers such as {DEFAULT_SPARSITIES}, got {text!r}"
        ) from None
    if not values:
        raise ConfigError(f"--sparsity names no sparsity; give numbers such as {DEFAULT_SPARSITIES}")
    return values


def score_keys(result: dict[str, float], metric: str, name: str) -> dict[str, float]:
    """The test scores a pruned checkpoint's metrics keep, under the trainer's keys: ``name.format("acc")`` (top-1,
    per token for a language model) and, where perplexity is the dataset's ``metric``, ``name.format("ppl")``."""
    keys = ["acc", "ppl"] if metric == "perplexity" else ["acc"]
    return {name.format(key): result[key] for key in keys}


def score_text(result: dict[str, float], metric: str, width: int = 0) -> str:
    """The dataset metric's value as the tables print it: perplexity with 3 decimals, accuracy in % with 2."""
    from ..train.evaluation import METRICS

    key = METRICS[metric]["key"]
    return f"{result[key]:{width}.3f}" if key == "ppl" else f"{result[key]:{width}.2f}"


def score_line(result: dict[str, float], metric: str, separator: str = ": ") -> str:
    """``test perplexity: 12.345`` for a language model's run, ``test accuracy: 88.42%`` otherwise."""
    return f"test {metric}{separator}{score_text(result, metric)}{'%' if metric == 'accuracy' else ''}"


def output_name(sparsity: float | None, mask_type: str) -> str:
    """``pruned_s0.9.pt`` for a sparsity, ``pruned_2of4.pt`` for an N:M pattern."""
    if sparsity is None:
        n, m = (int(x) for x in mask_type.split(":"))
        return f"pruned_{n}of{m}.pt"
    return f"pruned_s{sparsity:g}.pt"


def cmd_prune(args: argparse.Namespace) -> int:
    import torch

    from .._atomic import check_replaceable
    from ..distributions import check_distribution
    from ..maskops import parse_nm
    from ..oneshot import build_database, norm_modules, prune_obc, prune_oneshot, recalibrate_batchnorm
    from ..oneshot.obc import solver_summary
    from ..train.checkpoint import load, require, restore_model, save_atomic
    from ..train.data import iterate_batches, load_run_dataset
    from ..train.evaluation import METRICS, checkpoint_payload, evaluate, weight_sparsity
    from .prune_spdy import check_spdy_options, cmd_prune_spdy

    check_spdy_options(args)
    mfac_options = prune_mfac.options(args)  # refuses M-FAC's options with any other method, spdy included
    if args.method == "spdy":
        return cmd_prune_spdy(args)
    # Usage mistakes first, before any work.
    sparsities = parse_sparsities(args.sparsity, args.mask_type)
    try:
        check_distribution(args.distribution)
    except ValueError as error:
        raise ConfigError(f"--distribution: {error}") from None
    if args.calibrate < 0:
        raise ConfigError(f"--calibrate must be a number of samples >= 0 (0: no re-calibration), got {args.calibrate}")
    if args.calibration is not None and args.method not in ("obc", "spdy", "mfac"):
        raise ConfigError(f"--calibration is the number of OBC, SPDY or M-FAC calibration samples; it needs --method "
                          f"obc, spdy or mfac (got --method {args.method})")
    if args.solver is not None and args.method != "obc":
        raise ConfigError(f"--solver chooses OBC's per-layer solver; it needs --method obc "
                          f"(got --method {args.method})")
    if args.allocation is not None and args.method != "obc":
        raise ConfigError(f"--allocation chooses OBC's per-layer sparsities; it needs --method obc "
                          f"(got --method {args.method})")
    if args.allocation == "database" and parse_nm(args.mask_type) is not None:
        raise ConfigError(f"--allocation database needs unstructured pruning: --mask-type {args.mask_type} fixes "
                          "every layer's count (leave --allocation out)")
    allocation = args.allocation or ("database" if parse_nm(args.mask_type) is None else "magnitude")
    obc_samples = DEFAULT_OBC_SAMPLES if args.calibration is None else args.calibration
    if obc_samples < 1 and args.method == "obc":
        raise ConfigError(f"--calibration must be a number of training samples >= 1, got {obc_samples}")
    source = Path(args.checkpoint)
    out_dir = Path(args.out_dir) if args.out_dir else (source if source.is_dir() else source.parent)
    targets = [out_dir / output_name(s, args.mask_type) for s in sparsities]
    for target in targets:
        check_replaceable(target)  # --force replaces a regular file only, never a device, fifo or directory
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.force:
        raise ConfigError(f"{', '.join(existing)} exist(s); nothing was overwritten. Pass --force or choose --out-dir")

    data = load(args.checkpoint)
    require(data, args.checkpoint, "model", "model_spec", "config")
    config, spec = data["config"], data["model_spec"]

    def fresh_model() -> torch.nn.Module:
        return restore_model(data, args.checkpoint)

    exclude = config.get("exclude") or []
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    exclude += args.exclude

    database: Any = None
    report: dict[str, Any] = {}
    layer_errors: dict[str, float] = {}

    def prune(model: torch.nn.Module, sparsity: float | None, method: str = "magnitude") -> dict[str, torch.Tensor]:
        options = dict(
            mask_type=args.mask_type, distribution=args.distribution, include=config.get("include"),
            exclude=exclude or None,
        )
        if method == "mfac":  # training samples only, the same draw for every sparsity
            batches = iterate_batches(splits.train, config["batch_size"], shuffle=True, seed=0)
            return prune_mfac.prune(model, sparsity, batches, mfac_options, options, report)
        try:
            if method == "obc":
                # Training samples only, the same draw for every sparsity.
                batches = iterate_batches(splits.train, config["batch_size"], shuffle=True, seed=0)
                report.clear()
                layer_errors.clear()
                return prune_obc(model, sparsity, batches, num_samples=obc_samples, allocation=allocation,
                                 database=database, report=report, layer_errors=layer_errors,
                                 solver=args.solver or "auto", solvers=solvers, **options)
            return prune_oneshot(model, sparsity, **options)
        except ValueError as error:  # a pattern that matches nothing, an N:M that does not fit a layer, ...
            raise ConfigError(f"{error} (on the command line: --exclude PATTERN)") from None

    solvers: dict[str, tuple[str, int]] = {}
    # Options that do not fit this model fail here, before the data loads.
    pruned_weights = sum(mask.numel() for mask in prune(fresh_model(), sparsities[0]).values())
    if mfac_options:
        prune_mfac.check_block(mfac_options, pruned_weights)
    splits = load_run_dataset(config, args.data_dir)
    # A training set smaller than --calibration gives all it has: the output and metrics say how many were used.
    obc_samples = min(obc_samples, len(splits.train))
    device = torch.device("cpu")
    model = fresh_model()
    has_norms = bool(norm_modules(model))
    dense = evaluate(model, splits.test, 1000, device)
    print(f"{args.checkpoint}: {data.get('kind', '?')} model, {config['model']} on {config['dataset']}")
    # Perplexity where it is the dataset's measure (a language model's run), accuracy otherwise, as `eval` says.
    metric = splits.metric
    label = METRICS[metric]["label"]
    print(f"unpruned {score_line(dense, metric)}")
    if args.method == "obc" and allocation == "database":
        cache = (source / "obcdb.safetensors" if source.is_dir()
                 else source.with_name(source.name + ".obcdb.safetensors"))
        try:
            database = build_database(fresh_model(), iterate_batches(splits.train, config["batch_size"], shuffle=True,
                                                                     seed=0),
                                      num_samples=obc_samples, include=config.get("include"), exclude=exclude or None,
                                      cache=cache, solver=args.solver or "auto")
        except ValueError as error:
            raise ConfigError(f"{error} (on the command line: --exclude PATTERN)") from None
        print(f"method: OBC / ExactOBS on {obc_samples} training samples, per-layer sparsities from the database "
              f"({'loaded from' if database.source == 'cache' else 'built and cached in'} {cache}) or "
              f"{args.distribution} magnitude's, whichever has the lower calibration loss")
    elif args.method == "mfac":
        print(prune_mfac.describe(mfac_options))
    elif args.method == "obc":
        print(f"method: OBC / ExactOBS on {obc_samples} training samples, at {args.distribution} magnitude's "
              "per-layer sparsities")
    calibrate = args.calibrate if has_norms else 0
    if args.calibrate and not has_norms:
        print("(the model has no batch-norm layer: nothing to re-calibrate)")
    obc = args.method == "obc"
    extra = f" {'layer error':>11s} {'allocation':>10s}" if obc else ""
    header = f"{'sparsity':>8s} {'pruned ' + label:>10s} {'recalibrated ' + label:>16s}{extra}  file"
    print(header)
    print("-" * len(header))
    for sparsity, target in zip(sparsities, targets):
        model = fresh_model()
        masks = prune(model, sparsity, args.method)
        pruned = evaluate(model, splits.test, 1000, device)
        recalibrated, used = None, 0
        if calibrate:
            batches = iterate_batches(splits.train, config["batch_size"], shuffle=True, seed=0)
            used = recalibrate_batchnorm(model, batches, num_samples=calibrate)
            recalibrated = evaluate(model, splits.test, 1000, device)
        measured = weight_sparsity(model.state_dict(), masks)
        metrics = {
            "sparsity": measured,
            "mask_type": args.mask_type,
            "method": args.method,
            "distribution": args.distribution,
            "metric": metric,
            **score_keys(pruned, metric, "test_{}_pruned"),
            **score_keys(recalibrated or pruned, metric, "test_{}"),
            "calibration_samples": used,
            "obc_calibration_samples": obc_samples if args.method == "obc" else 0,
            "source": str(args.checkpoint),
            **score_keys(dense, metric, "source_test_{}"),
        }
        if obc:
            metrics.update(allocation=report["allocation"], layer_error=sum(layer_errors.values()))
        if args.method == "mfac":
            metrics["mfac"] = {key: report[key] for key in ("gradients", "samples_per_gradient", "block_size",
                                                            "damp", "steps")}
        # The source run's training state (optimizer, sparsifier, ...) means nothing for the pruned model: left out.
        with writing(target):
            save_atomic(checkpoint_payload(model, spec, config, kind="pruned", metrics=metrics), target)
        after = score_text(recalibrated, metric, 16) if recalibrated else f"{'-':>16s}"
        shown = f"{measured:.4f}"
        extra = f" {sum(layer_errors.values()):11.4g} {report['allocation']:>10s}" if obc else ""
        print(f"{shown:>8s} {score_text(pruned, metric, 10)} {after}{extra}  {target}")
    if solvers:
        print(f"solver: {solver_summary(solvers)}")
    return 0
