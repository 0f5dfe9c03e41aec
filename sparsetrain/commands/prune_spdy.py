"""``sparsetrain prune --method spdy``: a per-layer profile that meets a measured speed-up target.

SPDY (Frantar & Alistarh, ICML 2022, arXiv 2201.13096) on the OBC database: ``sparsetrain.oneshot.prune_spdy``
picks each layer's sparsity so that the model is predicted to run ``--target-speedup`` times faster than dense at
``--batch-size`` on this CPU, with the least calibration loss; this command prints the profile, the predicted and
measured speed-up and the test accuracy (perplexity for a language model) before/after batch-norm
re-calibration, and saves the pruned model as ``pruned_spdy<TARGET>x_b<BATCH>.pt`` in the checkpoint format
(``eval``, ``export`` and ``bench`` take it).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, writing

DEFAULT_CANDIDATES = 100


def add_spdy_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--method spdy`` on the ``prune`` parser."""
    parser.add_argument(
        "--target-speedup",
        type=float,
        default=None,
        metavar="X",
        help="--method spdy: the speed-up over the dense model to reach (> 1, e.g. 2.0), predicted from per-layer "
        "timings of the CPU inference engine and then measured",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="--method spdy: the batch size the model will serve, which the timings are taken at (default: 1)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=None,
        metavar="N",
        help=f"--method spdy: the search's budget of per-layer error weightings, each a profile scored by its "
        f"calibration loss (default: {DEFAULT_CANDIDATES})",
    )


def check_spdy_options(args: argparse.Namespace) -> None:
    """Usage mistakes of the SPDY options, before any work: ConfigError (exit code 2)."""
    given = [f"--{name.replace('_', '-')}" for name in ("target_speedup", "batch_size", "candidates")
             if getattr(args, name) is not None]
    if args.method != "spdy":
        if given:
            raise ConfigError(f"{', '.join(given)} belong(s) to --method spdy (got --method {args.method})")
        return
    if args.target_speedup is None:
        raise ConfigError("--method spdy needs --target-speedup X, the speed-up over dense to reach (e.g. 2.0)")
    if not (math.isfinite(args.target_speedup) and args.target_speedup > 1):
        raise ConfigError(f"--target-speedup must be a number > 1 (e.g. 2.0 for twice as fast), got "
                          f"{args.target_speedup:g}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be a number of samples >= 1, got {args.batch_size}")
    if args.candidates is not None and args.candidates < 1:
        raise ConfigError(f"--candidates must be >= 1, got {args.candidates}")
    if args.calibration is not None and args.calibration < 1:
        raise ConfigError(f"--calibration must be a number of training samples >= 1, got {args.calibration}")
    for option, value, default in (("--sparsity", args.sparsity, None), ("--allocation", args.allocation, None),
                                   ("--solver", args.solver, None), ("--mask-type", args.mask_type, "unstructured"),
                                   ("--distribution", args.distribution, "global")):
        if value != default:
            raise ConfigError(f"{option} does not apply to --method spdy: the target speed-up chooses every "
                              "layer's sparsity (leave it out)")


def output_name(target: float, batch_size: int) -> str:
    """``pruned_spdy2x_b1.pt`` for a 2x target at batch 1."""
    return f"pruned_spdy{target:g}x_b{batch_size}.pt"


def cmd_prune_spdy(args: argparse.Namespace) -> int:
    import torch

    from .._atomic import check_replaceable
    from ..oneshot import build_database, norm_modules, prune_spdy, recalibrate_batchnorm
    from ..train.checkpoint import load, require, restore_model, save_atomic
    from ..train.data import iterate_batches, load_run_dataset
    from ..train.evaluation import checkpoint_payload, evaluate, weight_sparsity
    from .prune import DEFAULT_OBC_SAMPLES, score_keys, score_line

    if args.calibrate < 0:
        raise ConfigError(f"--calibrate must be a number of samples >= 0 (0: no re-calibration), got {args.calibrate}")
    batch_size = args.batch_size or 1
    candidates = args.candidates or DEFAULT_CANDIDATES
    samples = args.calibration or DEFAULT_OBC_SAMPLES
    source = Path(args.checkpoint)
    out_dir = Path(args.out_dir) if args.out_dir else (source if source.is_dir() else source.parent)
    target = out_dir / output_name(args.target_speedup, batch_size)
    check_replaceable(target)
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; nothing was overwritten. Pass --force or choose --out-dir")

    data = load(args.checkpoint)
    require(data, args.checkpoint, "model", "model_spec", "config")
    config, spec = data["config"], data["model_spec"]
    exclude = config.get("exclude") or []
    exclude = ([exclude] if isinstance(exclude, str) else list(exclude)) + args.exclude
    splits = load_run_dataset(config, args.data_dir)
    samples = min(samples, len(splits.train))  # all a smaller training set has: what the output says was used
    device = torch.device("cpu")
    progress = sys.stderr.isatty()

    def batches() -> Any:  # training samples only, the same draw each time
        return iterate_batches(splits.train, config["batch_size"], shuffle=True, seed=0)

    model = restore_model(data, args.checkpoint)
    dense = evaluate(model, splits.test, 1000, device)
    print(f"{args.checkpoint}: {data.get('kind', '?')} model, {config['model']} on {config['dataset']}")
    metric = splits.metric  # perplexity for a language model's run, accuracy otherwise
    print(f"unpruned {score_line(dense, metric)}")
    # Next to the checkpoint (CHECKPOINT.obcdb.safetensors), or inside a run directory, as `prune --method obc`.
    def cached(name: str) -> Path:
        return source / name if source.is_dir() else source.with_name(f"{source.name}.{name}")

    cache = cached("obcdb.safetensors")
    times_cache = cached(f"spdy-times-b{batch_size}.json")
    report: dict[str, Any] = {}
    try:
        database = build_database(model, batches(), num_samples=samples, include=config.get("include"),
                                  exclude=exclude or None, cache=cache, solver="auto", progress=progress)
        print(f"database: {len(database.names)} layers at {len(database.grid)} sparsities on {samples} training "
              f"samples ({'loaded from' if database.source == 'cache' else 'built and cached in'} {cache})")
        masks = prune_spdy(model, args.target_speedup, batches(), batch_size=batch_size, num_samples=samples,
                           include=config.get("include"), exclude=exclude or None, database=database,
                           timings=times_cache, candidates=candidates, progress=progress, report=report)
    except ValueError as error:  # an unreachable target, a pattern that matches nothing, no prunable layer, ...
        raise ConfigError(f"{error}") from None
    pruned = evaluate(model, splits.test, 1000, device)
    recalibrated, used = None, 0
    if args.calibrate and norm_modules(model):
        used = recalibrate_batchnorm(model, batches(), num_samples=args.calibrate)
        recalibrated = evaluate(model, splits.test, 1000, device)
    measured_sparsity = weight_sparsity(model.state_dict(), masks)
    params = dict(model.named_parameters())
    # level: the database's sparsity chosen; sparsity: the zeros the layer holds (more where it had them before).
    rows = [("layer", "shape", "level", "sparsity", "kernel", "time us", "layer error")]
    for name, level in report["levels"].items():
        rows.append((name, "x".join(str(s) for s in params[name].shape), f"{level:g}",
                     f"{report['sparsity'][name]:.4f}", report["kernels"][name],
                     f"{report['times'][name] * 1e6:.1f}", f"{report['layer_errors'][name]:.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"SPDY profile for {args.target_speedup:g}x at batch {batch_size} ({report['candidates']} candidates, "
          f"timings {'from ' + str(times_cache) if report['timings'] == 'cache' else 'measured'}):")
    for i, row in enumerate(rows):
        print("  " + "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if i == 0:
            print("  " + "-" * (sum(widths) + 2 * (len(widths) - 1)))
    measured = report["measured_speedup"]
    calibration = report["calibration"]
    if calibration is not None:
        print(f"calibration on the measured speed-up (window {calibration['window'][0]:g}-"
              f"{calibration['window'][1]:.3g}x; * = kept): {calibration['outcome']}")
        table = [("step", "asked", "budget", "profile", "predicted", "measured", "loss")]
        for i, step in enumerate(calibration["steps"]):
            refined = step.get("refined", False)  # bisected between two measured profiles: no search, no budget
            table.append((f"{step['step']}{'*' if i == calibration['chosen'] else ''}",
                          "between" if refined else f"{step['asked']:.3g}x",
                          "-" if refined else f"x{step['budget_scale']:.3f}",
                          "/".join(f"{v:g}" for v in step["levels"].values()),
                          f"{step['predicted']:.2f}x", f"{step['measured']:.2f}x", f"{step['loss']:.4g}"))
        cols = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for row in table:
            print("  " + "  ".join(c.rjust(w) for c, w in zip(row, cols)))
    print(f"speed-up: target {args.target_speedup:g}x, predicted {report['predicted_speedup']:.2f}x, measured "
          f"{measured:.2f}x (most reachable {report['max_speedup']:.2f}x; timings are of this machine now)")
    after = f", after batch-norm re-calibration {score_line(recalibrated, metric, ' ')}" if recalibrated else ""
    print(f"sparsity {measured_sparsity:.4f}: {score_line(pruned, metric, ' ')}{after}")
    metrics = {
        "sparsity": measured_sparsity,
        "mask_type": "unstructured",
        "method": "spdy",
        "target_speedup": args.target_speedup,
        "batch_size": batch_size,
        "predicted_speedup": report["predicted_speedup"],
        "measured_speedup": measured,
        "calibration": calibration,
        "profile": report["levels"],
        "layer_sparsity": report["sparsity"],
        "metric": metric,
        **score_keys(pruned, metric, "test_{}_pruned"),
        **score_keys(recalibrated or pruned, metric, "test_{}"),
        "calibration_samples": used,
        "obc_calibration_samples": samples,
        "source": str(args.checkpoint),
        **score_keys(dense, metric, "source_test_{}"),
    }
    with writing(target):
        save_atomic(checkpoint_payload(model, spec, config, kind="pruned", metrics=metrics), target)
    print(f"saved {target}")
    return 0
