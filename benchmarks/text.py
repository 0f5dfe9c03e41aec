"""A small GPT on the default text corpus at 90% sparsity: AC/DC, GMP and RigL against dense, at equal epochs.

Every run uses the same trainer, model, data, optimizer, learning-rate schedule and number of epochs; only the
method differs. Reported: validation and test perplexity (byte level) of the final model, AC/DC's dense twin,
and training FLOPs relative to dense training. One seed: the differences between methods are what it shows, not
their spread.

    python benchmarks/text.py                 # 4 runs of 6 epochs, about 6 minutes of CPU on one thread
    python benchmarks/text.py --seeds 0 1 2   # more seeds
    python benchmarks/text.py --epochs 2      # a smoke run

The corpus is the text dataset's default (the first bytes of the running interpreter's standard library sources,
sorted by file name; its SHA-256 is recorded with each run), so the numbers depend on the Python version.
Results go to benchmarks/results/text/ (one JSON line per run, a markdown table).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from sparsetrain.train.config import resolve
from sparsetrain.train.loop import Run

RESULTS = Path(__file__).parent / "results" / "text"
METHODS = ("dense", "acdc", "gmp", "rigl")
SPARSITY = 0.9
# A 2-layer GPT of width 64 (about 0.1M weights in its blocks) reading 64-byte windows of 1 MB of text.
SIZE = dict(
    model="gpt", model_options={"layers": 2, "heads": 4, "width": 64},
    dataset="text", dataset_options={"context": 64, "max_bytes": 1_000_000},
)  # fmt: skip
COMMON = dict(optimizer="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine", batch_size=32, threads=1,
              plots=False)  # fmt: skip


def method_options(method: str, epochs: int) -> dict:
    """Each method's schedule scaled to the run (the rule of benchmarks/accuracy.py)."""
    if method == "acdc":
        unit = max(1, epochs // 10)  # warm-up, compressed and decompressed phases 10% each, final 20% sparse
        return {"unit": "epochs", "warmup": unit, "compressed": unit, "decompressed": unit, "final": 2 * unit}
    if method == "gmp":
        return {"start": 0.1, "end": 0.7}
    if method == "rigl":
        return {"delta": 100}
    return {}


def run_one(method: str, epochs: int, seed: int, out: Path) -> dict:
    config = resolve(None, {**SIZE, **COMMON, "method": method, "sparsity": 0.0 if method == "dense" else SPARSITY,
                            "epochs": epochs, "seed": seed, "method_options": method_options(method, epochs),
                            "out": str(out)})  # fmt: skip
    start = time.process_time()
    summary = Run(config).run()
    sparse, dense = summary["sparse_model"], summary["dense_model"]
    return {
        "method": method, "seed": seed, "epochs": epochs, "sparsity": sparse["sparsity"],
        "val_ppl": sparse["val_ppl"], "test_ppl": sparse["test_ppl"],
        "dense_val_ppl": dense["val_ppl"] if dense and method == "acdc" else None,
        "dense_test_ppl": dense["test_ppl"] if dense and method == "acdc" else None,
        "train_flops_ratio": summary["train_flops_ratio"], "cpu_s": time.process_time() - start,
        "corpus_sha256": summary["data"]["sha256"], "python": summary["data"]["python"],
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| method | sparsity | val ppl | test ppl | AC/DC dense twin val / test ppl | train FLOPs | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        twin = f"{r['dense_val_ppl']:.2f} / {r['dense_test_ppl']:.2f}" if r["dense_val_ppl"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['sparsity']:.3f} | {r['val_ppl']:.2f} | {r['test_ppl']:.2f} | {twin} | "
            f"{r['train_flops_ratio']:.3f} | {r['cpu_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for method in args.methods:
                row = run_one(method, args.epochs, seed, Path(tmp) / f"{method}-{seed}")
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(RESULTS / "runs.jsonl", "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    (RESULTS / "table.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
