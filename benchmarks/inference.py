"""Deploying sparse models on CPU: file size of the export, and latency of per-layer CSR kernels against dense.

All ratios are measured side by side in one run, on this machine:

1. kernel facts: one Linear at 90% sparsity, dense against CSR (int32 and int64 indices) and COO;
2. file size of the export at 80/90/95% against the same model as a dense fp32 safetensors file;
3. end-to-end latency of a wide MLP (784-2048-2048-10) at 90% and 95%, sparse kernels chosen per layer by
   ``to_sparse_kernels`` against the best dense path (eager or TorchScript-frozen, whichever is faster);
4. LeNet-300-100 trained by ``sparsetrain train`` at 90% on real Fashion-MNIST: size, latency, and its test
   accuracy before and after export;
5. ResNet-20 at 90%: the file size gain; its convolutions run dense.

    python benchmarks/inference.py                      # everything (trains LeNet-300-100 first, ~1.5 min)
    python benchmarks/inference.py --run-dir runs/x     # use an existing sparsetrain run for part 4
    python benchmarks/inference.py --quick              # fewer repeats, smaller kernel table

The system load average is printed at the start and the end: timings taken while other processes compete for the
cores are not comparable (two torch threads on two busy cores can lose milliseconds per call waiting on each other).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsetrain
from sparsetrain import export
from sparsetrain.inference import time_paired, to_sparse_kernels
from sparsetrain.train.models import build_model

BATCHES = (1, 8, 64, 256)
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*TorchScript.*")


def prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Magnitude-prune with sparsetrain itself (one-shot, uniform per layer): zeros exactly as training leaves them."""
    sparsetrain.create("magnitude", model, sparsity=sparsity, total_steps=1, distribution="uniform")
    return model.eval()


def wide_mlp(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )
    return prune(model, sparsity)


def with_positive_zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    # -0.0 + 0.0 == +0.0 in IEEE arithmetic: the same model with every zero positive.
    return {k: (v + 0.0 if v.is_floating_point() else v) for k, v in model.state_dict().items()}


def file_sizes(model: nn.Module, directory: Path) -> dict[str, float]:
    dense = export.dense_fp32_bytes(model)
    exact = export.save(model, directory / "m.safetensors").file_bytes
    positive = export.save(with_positive_zeros(model), directory / "p.safetensors").file_bytes
    half = export.save(with_positive_zeros(model), directory / "h.safetensors", dtype="fp16").file_bytes
    return {
        "dense_fp32_bytes": dense,
        "export_bytes": exact,
        "ratio": exact / dense,
        "ratio_positive_zeros": positive / dense,
        "ratio_fp16_positive_zeros": half / dense,
    }


# ---------------------------------------------------------------------------------------------------- dense paths
def dense_paths(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """The dense candidates: eager, and TorchScript traced + frozen + optimize_for_inference when it works."""
    paths: dict[str, Any] = {"eager": model}
    try:
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(copy.deepcopy(model).eval(), x)
            paths["torchscript"] = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as error:  # TorchScript is deprecated and may be missing; eager is the reference
        print(f"  (TorchScript unavailable: {type(error).__name__})")
    return paths


def latency_row(model: nn.Module, batch: int, input_shape: tuple[int, ...], repeats: int) -> dict[str, Any]:
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
    fast, report = to_sparse_kernels(model, x, repeats=repeats)
    paths = dense_paths(model, x)
    with torch.no_grad():
        reference = model(x)
    names = list(paths)
    with torch.inference_mode():
        assert torch.allclose(fast(x), reference, rtol=1e-4, atol=1e-4)
        fns = [functools.partial(paths[n], x) for n in names] + [functools.partial(fast, x)]
        times = time_paired(fns, repeats=repeats, min_time=0.05)
    dense = dict(zip(names, times[:-1]))
    best = min(dense, key=dense.get)
    return {
        "batch": batch,
        "dense_ms": {k: v * 1e3 for k, v in dense.items()},
        "best_dense": best,
        "sparse_ms": times[-1] * 1e3,
        "speedup": dense[best] / times[-1],
        "csr_layers": report.converted,
        "layers": [
            {
                "name": c.name,
                "shape": c.shape,
                "sparsity": round(c.sparsity, 4),
                "speedup": None if c.speedup is None else round(c.speedup, 3),
                "kernel": c.kernel,
            }
            for c in report.layers
        ],
    }


def print_latency(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'batch':>5}  {'eager ms':>9}  {'script ms':>9}  {'sparse ms':>9}  {'vs best dense':>13}  CSR layers")
    for r in rows:
        script = r["dense_ms"].get("torchscript")
        print(
            f"  {r['batch']:5d}  {r['dense_ms']['eager']:9.3f}  {'-' if script is None else f'{script:9.3f}':>9}  "
            f"{r['sparse_ms']:9.3f}  {r['speedup']:12.2f}x  "
            f"{len(r['csr_layers'])}/{len(r['layers'])}: "
            + ", ".join(f"{c['name']} {c['speedup']:.2f}x" if c["speedup"] else f"{c['name']} -" for c in r["layers"])
        )


# ---------------------------------------------------------------------------------------------------- kernel facts
def kernel_facts(shapes: list[tuple[int, int]], batches: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """One 90% sparse Linear: dense against CSR int32 (what SparseLinear runs), CSR int64 and COO."""
    from sparsetrain.inference import SparseLinear

    rows = []
    for out_f, in_f in shapes:
        torch.manual_seed(0)
        layer = prune(nn.Linear(in_f, out_f), 0.9)
        csr32 = SparseLinear.from_linear(layer)
        csr64 = layer.weight.detach().to_sparse_csr()
        coo = layer.weight.detach().to_sparse_coo().coalesce()
        bias = layer.bias.detach().unsqueeze(1)
        for batch in batches:
            x = torch.randn(batch, in_f)
            with torch.inference_mode():
                times = time_paired(
                    [
                        functools.partial(layer, x),
                        functools.partial(csr32, x),
                        lambda csr64=csr64, x=x, bias=bias: torch.addmm(bias, csr64, x.t()).t(),
                        lambda coo=coo, x=x, bias=bias: torch.addmm(bias, coo, x.t()).t(),
                    ],
                    repeats=repeats,
                    min_time=0.02,
                )
            rows.append(
                {
                    "shape": f"{out_f}x{in_f}",
                    "batch": batch,
                    "dense_us": times[0] * 1e6,
                    "csr_int32": times[0] / times[1],
                    "csr_int64": times[0] / times[2],
                    "coo": times[0] / times[3],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------- LeNet-300-100
def trained_lenet(run_dir: str | None, work: Path) -> Path:
    if run_dir:
        return Path(run_dir)
    out = work / "lenet300"
    command = [sys.executable, "-m", "sparsetrain", "train", "--model", "mlp", "--sparsity", "0.9", "--no-progress"]
    command += ["--out", str(out)]
    print(f"\ntraining LeNet-300-100: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def lenet_part(run: Path, work: Path, repeats: int) -> dict[str, Any]:
    from sparsetrain.train.checkpoint import load as load_checkpoint
    from sparsetrain.train.data import load_dataset
    from sparsetrain.train.loop import evaluate

    checkpoint = load_checkpoint(run)
    config = checkpoint["config"]
    model = build_model(**checkpoint["model_spec"]).eval()
    model.load_state_dict(checkpoint["model"])
    path = work / "lenet300.safetensors"
    summary = export.save(model, path, metadata=export.checkpoint_metadata(checkpoint))
    loaded = export.load(path).eval()
    splits = load_dataset(config["dataset"], data_dir=config["data_dir"], val_fraction=config["val_fraction"])
    before = evaluate(model, splits.test, 1000, torch.device("cpu"))["acc"]
    after = evaluate(loaded, splits.test, 1000, torch.device("cpu"))["acc"]
    weights = [t for t in checkpoint["model"].values() if t.dim() >= 2]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    dense_bytes = export.dense_fp32_bytes(model)
    rows = [latency_row(loaded, b, tuple(checkpoint["model_spec"]["input_shape"]), repeats) for b in BATCHES]
    return {
        "run": str(run),
        "sparsity": sparsity,
        "test_acc_before": before,
        "test_acc_after": after,
        "file_ratio": summary.file_bytes / dense_bytes,
        "file_ratio_positive_zeros": export.save(with_positive_zeros(model), work / "p.safetensors").file_bytes
        / dense_bytes,
        "latency": rows,
    }


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="an existing LeNet-300-100 run (sparsetrain train --model mlp) for part 4")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller kernel table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 9
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_start": os.getloadavg(),
    }
    print(f"machine: {results['machine']}; load average at start {os.getloadavg()[0]:.2f}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        shapes = [(1024, 1024), (300, 784)] if args.quick else [(1024, 1024), (4096, 4096), (300, 784)]
        facts = kernel_facts(shapes, BATCHES, repeats)
        results["kernel_facts"] = facts
        print("\n1. one Linear at 90% sparsity: speedup over dense (higher is better)")
        print(f"  {'shape':>10}  {'batch':>5}  {'dense us':>9}  {'CSR int32':>9}  {'CSR int64':>9}  {'COO':>6}")
        for r in facts:
            print(
                f"  {r['shape']:>10}  {r['batch']:5d}  {r['dense_us']:9.1f}  {r['csr_int32']:8.2f}x  "
                f"{r['csr_int64']:8.2f}x  {r['coo']:5.2f}x"
            )

        print("\n2. file size against the dense fp32 safetensors file (784-2048-2048-10 MLP; ResNet-20)")
        print(f"  {'model':>10}  {'sparsity':>8}  {'dense MB':>8}  {'export':>7}  {'+0.0 zeros':>10}  {'+ fp16':>7}")
        sizes = []
        for name, sparsity in [("mlp", 0.8), ("mlp", 0.9), ("mlp", 0.95), ("resnet20", 0.9)]:
            if name == "mlp":
                model = wide_mlp(sparsity)
            else:
                torch.manual_seed(0)
                model = prune(build_model("resnet20", input_shape=(3, 32, 32), num_classes=10), sparsity)
            row = {"model": name, "sparsity": sparsity, **file_sizes(model, work)}
            sizes.append(row)
            print(
                f"  {name:>10}  {sparsity:8.2f}  {row['dense_fp32_bytes'] / 1e6:8.2f}  {row['ratio']:6.3f}x  "
                f"{row['ratio_positive_zeros']:9.3f}x  {row['ratio_fp16_positive_zeros']:6.3f}x"
            )
        results["file_size"] = sizes

        results["wide_mlp"] = {}
        for sparsity in (0.9, 0.95):
            model = wide_mlp(sparsity)
            rows = [latency_row(model, b, (1, 28, 28), repeats) for b in BATCHES]
            results["wide_mlp"][str(sparsity)] = rows
            print_latency(f"3. wide MLP 784-2048-2048-10 at {sparsity:.0%}: latency per batch", rows)

        run = trained_lenet(args.run_dir, work)
        lenet = lenet_part(run, work, repeats)
        results["lenet300"] = lenet
        print(
            f"\n4. LeNet-300-100, sparsetrain train --model mlp --sparsity 0.9 (AC/DC, Fashion-MNIST): weights "
            f"{lenet['sparsity']:.3f} sparse; file {lenet['file_ratio']:.3f}x of dense fp32 "
            f"({lenet['file_ratio_positive_zeros']:.3f}x with +0.0 zeros); test accuracy "
            f"{lenet['test_acc_before']:.2f}% before export, {lenet['test_acc_after']:.2f}% after"
        )
        print_latency("   latency per batch", lenet["latency"])

        torch.manual_seed(0)
        resnet = prune(build_model("resnet20", input_shape=(3, 32, 32), num_classes=10), 0.9)
        rows = [latency_row(resnet, b, (3, 32, 32), repeats) for b in (1, 8)]
        results["resnet20"] = {"file_ratio": sizes[-1]["ratio"], "latency": rows}
        print_latency(
            f"5. ResNet-20 at 90%: file {sizes[-1]['ratio']:.3f}x of dense fp32; its 19 convolutions run dense "
            "(no torch CPU kernel for unstructured sparse convolution), its 64x10 classifier is too small to win",
            rows,
        )
    results["load_average_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    print(f"\nload average at end {os.getloadavg()[0]:.2f}; wall time {results['wall_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
