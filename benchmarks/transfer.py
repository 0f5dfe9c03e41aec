"""Sparse transfer (Iofinova et al., CVPR 2022): how well do sparse upstream models transfer to new classes?

Upstream: LeNet-5 trained on Fashion-MNIST classes 0-4 (T-shirt, trouser, pullover, dress, coat) dense and at
90% with AC/DC, GMP and RigL. Downstream: classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), starting from
each upstream model with method ``transfer``: the upstream zeros stay a fixed mask (a dense upstream model stays
dense: ``--sparsity 0``), either full fine-tuning or linear probing (``freeze=backbone``). Every run is a
``sparsetrain train`` run (the trainer's defaults: SGD, cosine LR, batch 128), so each row can be rerun alone:

    sparsetrain train --method gmp --set classes=0-4 --epochs 4 --out up/gmp
    sparsetrain train --method transfer --init-from up/gmp/sparse_final.pt --set classes=5-9 --epochs 2 \\
        [--set method_options.freeze=backbone]

    python benchmarks/transfer.py                              # 3 seeds, 10 upstream and 5 downstream epochs
    python benchmarks/transfer.py --seeds 0 --up-epochs 4 --down-epochs 2

Results go to benchmarks/results/transfer/ (one JSON line per run and a markdown table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from sparsetrain.train.config import resolve
from sparsetrain.train.loop import Run

RESULTS = Path(__file__).parent / "results" / "transfer"
UPSTREAM = ("dense", "acdc", "gmp", "rigl")
MODES = {"full": {}, "linear": {"freeze": "backbone"}}


def run(settings: dict, out: Path) -> dict:
    """One ``sparsetrain train`` run into ``out`` (reused when it already finished); returns its summary."""
    summary = out / "summary.json"
    if not summary.exists():
        Run(resolve(None, {**settings, "out": str(out), "plots": False, "progress": False})).run()
    return json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--up-epochs", type=int, default=10)
    parser.add_argument("--down-epochs", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/transfer-benchmark")
    args = parser.parse_args()

    out, rows = Path(args.out), []
    RESULTS.mkdir(parents=True, exist_ok=True)
    common = {"model": args.model, "dataset": "fashion-mnist", "threads": args.threads}
    started = time.perf_counter()
    for seed in args.seeds:
        for method in UPSTREAM:
            up_dir = out / f"up-{method}-seed{seed}"
            up = run({**common, "method": method, "sparsity": args.sparsity, "classes": "0-4", "seed": seed,
                      "epochs": args.up_epochs}, up_dir)  # fmt: skip
            for mode, options in MODES.items():
                down = run({**common, "method": "transfer", "init_from": str(up_dir / "sparse_final.pt"),
                            "sparsity": 0.0 if method == "dense" else args.sparsity, "classes": "5-9", "seed": seed,
                            "epochs": args.down_epochs, "method_options": options},
                           out / f"down-{method}-{mode}-seed{seed}")  # fmt: skip
                row = {"upstream": method, "mode": mode, "seed": seed,
                       "upstream_test_acc": up["sparse_model"]["test_acc"],
                       "upstream_sparsity": up["sparse_model"]["sparsity"],
                       "test_acc": down["sparse_model"]["test_acc"],
                       "sparsity": down["sparse_model"]["sparsity"]}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(RESULTS / "rows.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")

    def mean(values: list[float]) -> str:
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{spread}"

    lines = [
        f"{args.model}, Fashion-MNIST 0-4 -> 5-9; {args.up_epochs} upstream / {args.down_epochs} downstream epochs; "
        f"seeds {', '.join(map(str, args.seeds))}; {time.perf_counter() - started:.0f} s",
        "",
        "| upstream | sparsity | upstream test acc (0-4) | full fine-tuning (5-9) | linear probing (5-9) |",
        "|---|---|---|---|---|",
    ]
    for method in UPSTREAM:
        mine = [r for r in rows if r["upstream"] == method]
        full = [r["test_acc"] for r in mine if r["mode"] == "full"]
        linear = [r["test_acc"] for r in mine if r["mode"] == "linear"]
        up_acc = [r["upstream_test_acc"] for r in mine if r["mode"] == "full"]
        sparsity = statistics.mean(r["sparsity"] for r in mine)
        lines.append(f"| {method} | {sparsity:.3f} | {mean(up_acc)} | {mean(full)} | {mean(linear)} |")
    table = "\n".join(lines)
    (RESULTS / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
