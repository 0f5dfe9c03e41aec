"""Global magnitude top-k over a ResNet-50-sized set of tensors (25.5M weights): time and peak extra memory.

Compared in the same run, each in a fresh subprocess so its peak memory is its own:
- naive: concatenate the scores and sort them all (what a straightforward implementation does);
- torch.topk: concatenate and one ``torch.topk`` (the reference the target is stated against);
- sparsetrain: ``sparsetrain.maskops.global_topk_masks`` (sample-bracketed threshold, no concatenation).
Each produces the boolean masks (exact count). Time: median of 5 calls; memory: peak RSS above the scores.

    python benchmarks/topk.py [--sparsity 0.9]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Weight shapes of torchvision's ResNet-50 (convolutions and the classifier), written out."""
    shapes = [(64, 3, 7, 7)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width, width, 3, 3), (width * 4, width, 1, 1)]
            if b == 0:
                shapes.append((width * 4, in_ch, 1, 1))  # projection shortcut
            in_ch = width * 4
    shapes.append((1000, 2048))
    return shapes


def make_scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(s, generator=g).abs() for i, s in enumerate(resnet50_shapes())}


def naive(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = round((1 - sparsity) * flat.numel())
    order = torch.sort(flat, descending=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:keep]] = True
    return dict(zip(scores, mask.split([s.numel() for s in scores.values()])))


def topk_reference(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    keep = round((1 - sparsity) * flat.numel())
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return dict(zip(scores, mask.split([s.numel() for s in scores.values()])))


def ours(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    from sparsetrain.maskops import global_topk_masks

    return global_topk_masks(scores, sparsity)


VARIANTS = {"naive concat + sort": naive, "concat + torch.topk": topk_reference, "sparsetrain": ours}


def child(name: str, sparsity: float) -> None:
    torch.set_num_threads(2)
    scores = make_scores()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = VARIANTS[name]
    masks = fn(scores, sparsity)  # first call: its peak memory
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kept = sum(int(m.sum()) for m in masks.values())
    del masks
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn(scores, sparsity)
        times.append(time.perf_counter() - start)
    total = sum(s.numel() for s in scores.values())
    print(json.dumps({"name": name, "seconds": statistics.median(times), "extra_mb": (peak - before) / 1024,
                      "scores_mb": 4 * total / 2**20, "kept": kept, "total": total}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.sparsity)
        return
    rows = []
    for name in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--sparsity", str(args.sparsity)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        rows.append(json.loads(out.strip().splitlines()[-1]))
    reference = next(r for r in rows if r["name"] == "concat + torch.topk")
    print(
        f"{rows[0]['total'] / 1e6:.1f}M scores ({rows[0]['scores_mb']:.0f} MB float32), sparsity {args.sparsity}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'method':22s} {'time (s)':>9s} {'vs topk':>8s} {'peak extra (MB)':>16s} {'in score copies':>16s} "
        f"{'kept':>10s}"
    )
    for r in rows:
        print(
            f"{r['name']:22s} {r['seconds']:9.3f} {r['seconds'] / reference['seconds']:8.2f} {r['extra_mb']:16.0f} "
            f"{r['extra_mb'] / r['scores_mb']:16.2f} {r['kept']:10d}"
        )


if __name__ == "__main__":
    main()
