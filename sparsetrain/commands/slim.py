"""``sparsetrain slim``: the physically smaller dense model of a group-sparse run, as one export file.

A command function: it prints its table. User mistakes raise ``ConfigError`` (exit code 2) or ``CheckpointError``
(exit code 1); ``sparsetrain.cli`` turns them into a one-line ``error:`` message.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, writing


def add_parsers(subparsers: Any) -> None:
    """Add the ``slim`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "slim",
        help="write the smaller dense model left when whole channels are zero (structured pruning)",
        description="Find the zero-invariant groups of a run's model (sparse_final.pt of a run directory, or a "
        "checkpoint), remove the channels whose group is all zero (with the following layers' inputs, batch norm "
        "and residual paths kept consistent) and write the smaller dense model as one safetensors file with its "
        "spec: sparsetrain.export.load(FILE) rebuilds it, and eval, export and bench accept it. The outputs are "
        "checked against the masked model's before the file is written.",
    )
    parser.add_argument("checkpoint", metavar="RUN_DIR", help="a run directory or a .pt checkpoint")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write (.safetensors)")
    parser.add_argument("--dtype", default=None, help="store values as fp16 or bf16 (default: as trained)")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists (a regular file only)")
    parser.set_defaults(handler=cmd_slim)


def cmd_slim(args: argparse.Namespace) -> int:
    import torch

    from .. import export
    from .._atomic import check_replaceable
    from ..flops import FlopCounter
    from ..structured import apply_keep, groups, kept_channels, slim_spec
    from ..structured.slim import SLIM_KEY
    from ..train.checkpoint import load as load_checkpoint
    from ..train.checkpoint import require, restore_model

    out = Path(args.output)
    check_replaceable(out)
    if out.exists() and not args.force:
        raise ConfigError(f"{str(out)!r} exists; nothing was overwritten. Choose another -o or pass --force")
    dtype = export.parse_dtype(args.dtype)
    data = load_checkpoint(args.checkpoint)
    require(data, args.checkpoint, "model", "model_spec")
    spec = data["model_spec"]
    if SLIM_KEY in spec:
        raise CheckpointError(f"{args.checkpoint!r} already holds a slim model")
    model = restore_model(data, args.checkpoint).eval()
    sample = torch.zeros(1, *spec["input_shape"])
    zigs = groups(model, sample)  # UnsupportedModel is a ConfigError: one error line naming the operation
    keep = kept_channels(model, zigs)
    small = apply_keep(copy.deepcopy(model), zigs, keep).eval()

    # The slim model must compute what the masked one does: checked on random inputs before anything is written.
    x = torch.randn(64, *spec["input_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), small(x)
    diff = float((expected - got).abs().max())
    if not diff <= 1e-4 * max(1.0, float(expected.abs().max())):
        raise CheckpointError(f"internal error: the slim model's outputs differ from the masked model's by {diff:.3g}")

    metadata = export.checkpoint_metadata(data)
    metadata["model_spec"] = slim_spec(spec, keep)
    if isinstance(data.get("config"), dict):
        metadata["config"] = data["config"]  # the run's data set, so that eval can evaluate the file
    with writing(out):
        summary = export.save(small, out, metadata=metadata, dtype=dtype)
    back = export.load(out)
    for name, tensor in small.state_dict().items():
        stored = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype).to(tensor.dtype)
        if not torch.equal(stored, back.state_dict()[name]):
            raise CheckpointError(f"internal error: {name!r} did not read back identical from {str(out)!r}")

    dense_flops = FlopCounter(model, sample).dense_total
    slim_flops = FlopCounter(small, sample).dense_total
    params = sum(p.numel() for p in model.parameters())
    slim_params = sum(p.numel() for p in small.parameters())
    print(f"{out}: slim {spec['name']} from {args.checkpoint}")
    rows = [("channel set", "channels", "kept")]
    rows += [(s.name, str(s.width), str(len(keep[s.name]))) for s in zigs.sets]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    removed = sum(s.width - len(keep[s.name]) for s in zigs.sets)
    print(f"groups: {len(zigs)} in {len(zigs.sets)} channel sets, {removed} all-zero removed")
    print(f"parameters: {params:,} -> {slim_params:,} ({slim_params / params:.3f})")
    print(f"forward FLOPs per sample: {dense_flops:,} -> {slim_flops:,} ({slim_flops / max(1, dense_flops):.3f})")
    print(f"outputs against the masked model: max abs difference {diff:.2e} (64 random inputs)")
    print(f"file: {summary.file_bytes:,} bytes; load with: sparsetrain.export.load({str(out)!r})")
    return 0
