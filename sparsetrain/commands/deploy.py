"""``sparsetrain export`` and ``sparsetrain bench``: the small model file, and what sparse kernels buy on this CPU.

These are command functions: they print their tables. User mistakes raise ``ConfigError`` (exit code 2) or
``CheckpointError`` (exit code 1); ``sparsetrain.cli`` turns them into a one-line ``error:`` message.
"""

from __future__ import annotations

import argparse
import functools
import platform
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, writing

DEFAULT_BATCH_SIZES = "1,8,64,256"


def add_parsers(subparsers: Any) -> None:
    """Add the ``export`` and ``bench`` subcommands to the CLI's subparsers."""
    export = subparsers.add_parser(
        "export",
        help="write a trained model as one small safetensors file (sparse tensors compressed), or as ONNX",
        description="Write the model of a sparsetrain checkpoint (or run directory: its sparse_final.pt) as one "
        "safetensors file. Mostly-zero tensors are stored as a bitmask plus the nonzero values (or CSR with int32 "
        "indices where that is smaller); the file keeps the model spec, the run's method and its accuracies, so "
        "sparsetrain.export.load(FILE) rebuilds the model. Prints a per-tensor size table and the ratio to the "
        "same model as a dense fp32 file. With --format onnx: an ONNX graph (weights dense, zeros included) for any "
        "ONNX runtime, checked against torch with onnxruntime.",
    )
    export.add_argument(
        "checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help="a .pt file, a run directory or an export file"
    )
    export.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="the file to write (.safetensors, or .onnx)"
    )
    export.add_argument(
        "--format", default="safetensors", choices=("safetensors", "onnx"),
        help="safetensors (compressed, default) or onnx (needs the onnx package; checked with onnxruntime)",
    )  # fmt: skip
    export.add_argument(
        "--dtype", default=None, help="store values as fp16 or bf16 (default: as trained, fp32); halves the file again"
    )
    export.add_argument("--force", action="store_true", help="replace FILE if it exists (a regular file only)")
    export.set_defaults(handler=cmd_export)

    bench = subparsers.add_parser(
        "bench",
        help="CPU latency per batch size: dense against per-layer sparse kernels",
        description="Time the model of a checkpoint, run directory or export file on random inputs of its input "
        "shape: the dense model against the same model with each nn.Linear on CSR int32 kernels where measured "
        "faster (sparsetrain.inference.to_sparse_kernels), for each batch size. Convolutions always run dense: "
        "torch has no CPU kernel that exploits their unstructured sparsity. A slim model (from sparsetrain slim) is "
        "also timed against the full-width model its spec names, beside the FLOP ratio.",
    )
    bench.add_argument("model", metavar="CHECKPOINT_OR_FILE", help="a .pt file, a run directory or an export file")
    bench.add_argument(
        "--batch-sizes", default=DEFAULT_BATCH_SIZES, help=f"comma-separated (default: {DEFAULT_BATCH_SIZES})"
    )
    bench.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    bench.add_argument("--repeats", type=int, default=7, help="timing repeats; the median is reported (default: 7)")
    bench.set_defaults(handler=cmd_bench)


# ---------------------------------------------------------------------------------------------------- export
def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def cmd_export(args: argparse.Namespace) -> int:
    from .. import export
    from .._atomic import check_replaceable
    from ..train.checkpoint import load as load_checkpoint
    from ..train.checkpoint import require

    out = Path(args.output)
    check_replaceable(out)  # --force replaces a regular file only, never a device, fifo or directory
    if out.exists() and not args.force:
        raise ConfigError(f"{str(out)!r} exists; nothing was overwritten. Choose another -o or pass --force")
    dtype = export.parse_dtype(args.dtype)  # before any work: an unknown dtype is a usage error
    if args.format == "onnx":
        return _export_onnx(args, out)
    given = Path(args.checkpoint)
    if given.is_file() and given.suffix != ".pt":
        # An export file (a slim model from `sparsetrain slim`, or an earlier export): written again, e.g. in fp16.
        exported = export.read(given)
        state, metadata = exported.state_dict, exported.metadata
        data = {"kind": (metadata.get("run") or {}).get("kind")}
    else:
        data = load_checkpoint(args.checkpoint)
        require(data, args.checkpoint, "model", "model_spec")
        state, metadata = data["model"], export.checkpoint_metadata(data)
    with writing(out):
        summary = export.save(state, out, metadata=metadata, dtype=dtype)

    # Read the file back and compare bit for bit: the file is only announced once it is known to be right.
    back = export.read(out, max_bytes=None).state_dict  # the file just written: no cap on its size
    for name, tensor in state.items():
        expected = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype).to(tensor.dtype)
        if not _same_bits(expected, back[name]):
            raise CheckpointError(f"internal error: {name!r} did not read back identical from {str(out)!r}")
    dense_bytes = export.dense_fp32_bytes(state)

    run = metadata.get("run") or {}
    source = f"{data.get('kind') or 'model'} of {run.get('method')} {run.get('model')} on {run.get('dataset')}"
    print(f"{out}: {source}" + (f", values stored as {args.dtype}" if dtype is not None else ""))
    rows = [("tensor", "shape", "sparsity", "stored as", "bytes", "fp32 bytes", "ratio")]
    for t in summary.tensors:
        rows.append(
            (
                t.name,
                "x".join(str(s) for s in t.shape) or "scalar",
                f"{t.sparsity:.4f}",
                t.encoding if t.encoding == "dense" else f"{t.encoding} {t.dtype}",
                f"{t.stored_bytes:,}",
                f"{t.fp32_bytes:,}",
                f"{t.stored_bytes / max(1, t.fp32_bytes):.3f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j in (0, 3) else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"file: {summary.file_bytes:,} bytes ({_human(summary.file_bytes)}); dense fp32 safetensors: "
        f"{dense_bytes:,} bytes ({_human(dense_bytes)}); ratio {summary.file_bytes / dense_bytes:.3f}"
    )
    if run.get("test_ppl") is not None:  # a language model: perplexity is its measure
        acc = f"test perplexity {run['test_ppl']:.3f} (as trained), "
    else:
        acc = f"test accuracy {run['test_acc']:.2f}% (as trained), " if run.get("test_acc") is not None else ""
    print(f"{acc}read back: {len(state)} tensors bit-identical" + (" to their cast values" if dtype else ""))
    print(f"load with: sparsetrain.export.load({str(out)!r})")
    return 0


def _export_onnx(args: argparse.Namespace, out: Path) -> int:
    """``export --format onnx``: trace the checkpoint's model, write it, and compare onnxruntime with torch."""
    import torch

    from ..models import sample_input
    from ..onnx_export import MissingOnnx, check_onnx, export_onnx, require_onnx

    if args.dtype is not None:
        raise ConfigError("--dtype applies to the safetensors format; an ONNX export keeps the weights as trained")
    require_onnx("onnx")  # before loading anything: a missing package is said first
    # A checkpoint, a run directory or an export file (a slim model from `sparsetrain slim`), as bench takes them.
    model, spec, _, run = _load_model(args.checkpoint)
    generator = torch.Generator().manual_seed(0)

    def batch(size: int) -> torch.Tensor:
        return sample_input(spec["name"], spec["input_shape"], spec["num_classes"], size, generator)

    with writing(out):
        size = export_onnx(model, out, batch(2))
    source = f"{run.get('kind') or 'model'} of {run.get('method')} {run.get('model')} on {run.get('dataset')}"
    print(f"{out}: ONNX, {source}")
    fp32 = sum(p.numel() * 4 for p in model.parameters())  # a tied weight once, as ONNX stores it
    print(f"file: {size:,} bytes ({_human(size)}); the parameters as dense fp32: {fp32:,} bytes ({_human(fp32)})")
    try:
        check = check_onnx(out, model, [batch(1), batch(3)])
    except MissingOnnx as error:
        print(f"not checked: {error}")
        return 0
    print(
        f"weights (dim >= 2) stored dense: {check.zero_fraction:.4f} of their values are zeros; for a compressed "
        "file use the default safetensors format"
    )
    sizes = ", ".join(map(str, check.batch_sizes))
    print(f"onnxruntime: outputs allclose to torch at batch sizes {sizes} (largest difference "
          f"{check.max_abs_diff:.2e})")  # fmt: skip
    return 0


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- bench
def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--batch-sizes must be positive integers separated by commas, e.g. 1,8,64; got {text!r}")
    return sizes


def _load_model(path_text: str) -> tuple[Any, dict[str, Any], str, dict[str, Any]]:
    """The model, its spec, a one-line description and the run's metadata (``kind``: which of its models), from a
    checkpoint, a run directory or an export file."""
    from .. import export
    from ..train.checkpoint import load as load_checkpoint
    from ..train.checkpoint import restore_model

    path = Path(path_text)
    if not path.exists():
        raise CheckpointError(f"{path_text!r} does not exist; give a checkpoint, a run directory or an export file")
    if path.is_dir() or path.suffix == ".pt":
        data = load_checkpoint(path)
        model = restore_model(data, path_text)
        spec = data["model_spec"]
        run = export.checkpoint_metadata(data)["run"]
    else:
        exported = export.read(path)
        spec = exported.model_spec
        if spec is None:
            raise CheckpointError(
                f"{path_text!r} holds no model spec, so its model cannot be built; export it from a "
                "sparsetrain checkpoint, or time your own model with sparsetrain.inference.to_sparse_kernels"
            )
        model = export.load(path)
        run = exported.metadata.get("run") or {}
    sparsity = run.get("sparsity")
    if isinstance(sparsity, float):
        sparsity = f"{sparsity:.4g}"  # a group sparsity from a FLOPs target is no round number (0.3437500007)
    what = f"{spec['name']}" + (f", {run['method']} {sparsity}" if run.get("method") else "")
    return model.eval(), spec, what, run


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from ..inference import time_paired, to_sparse_kernels
    from ..maskops import count_zeros
    from ..models import sample_input

    sizes = _parse_batch_sizes(args.batch_sizes)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be positive, got {args.repeats}")
    model, spec, what, _ = _load_model(args.model)
    weights = [p for p in model.parameters() if p.dim() >= 2]
    zeros = sum(count_zeros(p) for p in weights)
    sparsity = zeros / max(1, sum(p.numel() for p in weights))
    convs = sum(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())
    print(
        f"{args.model}: {what}; weights {sparsity:.3f} sparse; input {tuple(spec['input_shape'])}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}"
    )
    generator = torch.Generator().manual_seed(0)
    results = []
    for batch in sizes:
        x = sample_input(spec["name"], spec["input_shape"], spec["num_classes"], batch, generator)
        fast, report = to_sparse_kernels(model, x, repeats=args.repeats)
        with torch.inference_mode():
            dense_time, sparse_time = time_paired(
                [functools.partial(model, x), functools.partial(fast, x)], repeats=args.repeats, min_time=0.02
            )
            if not torch.allclose(model(x), fast(x), rtol=1e-4, atol=1e-4):
                raise CheckpointError("internal error: the sparse-kernel model's outputs differ from the dense model's")
        results.append((batch, dense_time, sparse_time, report))

    print(f"{'batch':>5}  {'dense ms':>9}  {'sparse ms':>9}  {'speedup':>7}  layers on CSR")
    for batch, dense_time, sparse_time, report in results:
        on = len(report.converted)
        print(
            f"{batch:5d}  {dense_time * 1e3:9.3f}  {sparse_time * 1e3:9.3f}  {dense_time / sparse_time:6.2f}x  "
            f"{on} of {len(report.layers)}"
        )
    layers = results[0][3].layers
    if layers:
        print("per-layer choice (speedup of CSR over dense at each batch size; * = CSR chosen):")
        head = f"  {'layer':24s} {'shape':>10s} {'sparsity':>8s}" + "".join(f"{'b=' + str(b):>10s}" for b in sizes)
        print(head)
        for i, layer in enumerate(layers):
            cells = []
            for _, _, _, report in results:
                choice = report.layers[i]
                if choice.speedup is None:
                    cells.append(f"{'dense':>10s}")
                else:
                    cells.append(f"{choice.speedup:8.2f}x" + ("*" if choice.kernel == "csr" else " "))
            shape = "x".join(str(s) for s in layer.shape)
            print(f"  {layer.name[:24]:24s} {shape:>10s} {layer.sparsity:8.3f}" + "".join(cells))
        untimed = {c.reason for _, _, _, r in results for c in r.layers if c.speedup is None}
        if untimed:
            print(f"  dense without timing: {'; '.join(sorted(untimed))}")
    else:
        print("no nn.Linear layer: the model runs dense at every batch size")
    if convs:
        print(
            f"{convs} convolution layers run dense: no torch CPU kernel exploits unstructured sparsity in "
            "convolutions (the export still stores them compressed)"
        )
    from ..structured import SLIM_KEY

    if SLIM_KEY in spec:
        _bench_slim_against_full_width(model, spec, sizes, args.repeats)
    return 0


def _bench_slim_against_full_width(model: Any, spec: dict[str, Any], sizes: list[int], repeats: int) -> None:
    """A slim model (``sparsetrain slim``): its time against the full-width model its spec names, at each batch
    size, beside the FLOP ratio. The full-width model gets a fresh init: a dense pass takes the same time whatever
    its values, so the pair times what removing the channels buys on this CPU."""
    import torch

    from ..flops import FlopCounter
    from ..inference import time_paired
    from ..models import sample_input
    from ..structured import SLIM_KEY, build_from_spec

    full = build_from_spec({k: v for k, v in spec.items() if k != SLIM_KEY}).eval()
    generator = torch.Generator().manual_seed(1)
    one = sample_input(spec["name"], spec["input_shape"], spec["num_classes"], 1, generator)
    full_flops, slim_flops = FlopCounter(full, one).dense_total, FlopCounter(model, one).dense_total
    print(
        f"slim model against its full-width {spec['name']}: forward FLOPs per sample {full_flops:,} -> "
        f"{slim_flops:,} ({full_flops / max(1, slim_flops):.2f}x fewer)"
    )
    print(f"{'batch':>5}  {'full ms':>9}  {'slim ms':>9}  {'speedup':>7}")
    for batch in sizes:
        x = sample_input(spec["name"], spec["input_shape"], spec["num_classes"], batch, generator)
        with torch.inference_mode():
            full_time, slim_time = time_paired(
                [functools.partial(full, x), functools.partial(model, x)], repeats=repeats, min_time=0.02
            )
        print(f"{batch:5d}  {full_time * 1e3:9.3f}  {slim_time * 1e3:9.3f}  {full_time / slim_time:6.2f}x")
