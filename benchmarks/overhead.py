"""Per-step cost of sparse training: wall time of one training step with each method attached, relative to the
same dense step (no sparsifier at all), median over interleaved paired runs.

Beside sparsetrain's methods, the same models sparsified with torch.ao.pruning (FakeSparsity parametrization:
the mask is applied in every forward) and torch.nn.utils.prune (a forward pre-hook recomputes weight_orig * mask)
are timed in the same run.

    python benchmarks/overhead.py                 # both models, 9 rounds
    python benchmarks/overhead.py --quick         # fewer rounds
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import sparsetrain
from sparsetrain.train.models import build_model

SPARSITY = 0.9


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def sparsetrain_variant(method: str, base: nn.Module, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # Schedules placed so the timed steps run in the sparse regime, masks enforced at every step:
    # AC/DC in a compressed phase, GMP after its last pruning step, RigL between (and across) its updates.
    options = {
        "acdc": dict(unit="steps", warmup=0, compressed=10 * steps, decompressed=steps, final=steps),
        "gmp": dict(unit="steps", start=0, end=1, frequency=1),
        "rigl": dict(delta=100),  # ERK mask enforced every step, a drop/grow update every 100 steps
        "static": {},
        "dense": {},
    }[method]
    sparsifier = sparsetrain.create(method, model, sparsity=SPARSITY, total_steps=20 * steps, **options)
    sparsifier.attach(optimizer)
    return model, optimizer


def torch_ao_variant(base: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    """torch.ao.pruning's parametrization approach with a magnitude rule (its built-in WeightNormSparsifier
    rejects 4-D conv weights with element blocks), masks computed once; the cost measured is FakeSparsity's."""
    from torch.ao.pruning import BaseSparsifier

    class MagnitudeSparsifier(BaseSparsifier):
        def update_mask(self, module, tensor_name, sparsity_level, **kwargs):
            mask = getattr(module.parametrizations, tensor_name)[0].mask
            weight = getattr(module.parametrizations, tensor_name).original
            keep = int(round((1 - sparsity_level) * weight.numel()))
            flat = torch.zeros(weight.numel(), dtype=torch.bool)
            flat[torch.topk(weight.detach().abs().flatten(), keep).indices] = True
            mask.data = flat.view_as(weight).to(mask.dtype)

    model = copy.deepcopy(base)
    config = [{"tensor_fqn": name} for name, p in model.named_parameters() if p.dim() >= 2]
    sparsifier = MagnitudeSparsifier(defaults={"sparsity_level": SPARSITY})
    sparsifier.prepare(model, config)
    sparsifier.step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, optimizer


def torch_prune_variant(base: nn.Module) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.nn.utils import prune

    model = copy.deepcopy(base)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            prune.l1_unstructured(module, "weight", amount=SPARSITY)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, optimizer


def timed(step: Callable, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def bench_model(name: str, input_shape: tuple[int, ...], batch: int, steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = build_model(name, input_shape=input_shape, num_classes=10)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, 10, (batch,))
    variants: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    dense_model = copy.deepcopy(base)
    variants["baseline"] = (
        dense_model,
        torch.optim.SGD(dense_model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4),
    )
    for method in ("dense", "static", "gmp", "rigl", "acdc"):
        variants[method] = sparsetrain_variant(method, base, steps * rounds + 10)
    variants["torch.ao.pruning"] = torch_ao_variant(base)
    variants["torch.nn.utils.prune"] = torch_prune_variant(base)
    steps_fn = {k: make_step(m, o, x, y) for k, (m, o) in variants.items()}
    for fn in steps_fn.values():  # warm-up: allocator, optimizer state, one-time masks
        timed(fn, 3)
    ratios: dict[str, list[float]] = {k: [] for k in steps_fn if k != "baseline"}
    base_times = []
    for _ in range(rounds):
        # Interleave baseline and variant so drift in machine speed hits both equally;
        # ABBA order cancels a linear drift within the pair.
        for key in ratios:
            b1 = timed(steps_fn["baseline"], steps)
            v1 = timed(steps_fn[key], steps)
            v2 = timed(steps_fn[key], steps)
            b2 = timed(steps_fn["baseline"], steps)
            ratios[key].append((v1 + v2) / (b1 + b2))
            base_times += [b1, b2]
    return {
        "model": name,
        "batch": batch,
        "dense_step_ms": 1000 * statistics.median(base_times),
        "ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
        "ratio_iqr": {k: (statistics.quantiles(v, n=4)[0], statistics.quantiles(v, n=4)[2]) for k, v in ratios.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    results = [
        bench_model("lenet5", (1, 28, 28), batch=128, steps=10 if args.quick else 40, rounds=rounds),
        bench_model("resnet20", (3, 32, 32), batch=128, steps=2 if args.quick else 4, rounds=rounds),
    ]
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    keys = list(results[0]["ratio_median"])
    print(f"{'step time / dense step (median, IQR)':38s}" + "".join(f"{r['model']:>24s}" for r in results))
    print(f"{'dense step (ms)':38s}" + "".join(f"{r['dense_step_ms']:24.1f}" for r in results))
    for key in keys:
        cells = "".join(
            f"{r['ratio_median'][key]:12.3f} [{r['ratio_iqr'][key][0]:.3f}-{r['ratio_iqr'][key][1]:.3f}]"
            for r in results
        )
        print(f"{key:38s}{cells}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
