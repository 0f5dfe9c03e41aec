"""Run under torchrun with 2 processes (gloo, CPU) by tests/test_scale.py: sparse training on FSDP2 shards.

For every method: a model whose Linear layers and root are ``fully_shard``-ed trains TOTAL steps, each rank on its
own data. After every step the gathered weights are +0.0 wherever the gathered masks are 0; at every mask
computation the gathered masks equal the single-process masks of the gathered scores (one global mask, whatever
the split); at the end the gathered weights hold exactly the asked count of zeros. A second run saves at SPLIT,
a fresh model, optimizer and sparsifier load the states, and the resumed run must end bit-identical. Rank 0 writes
a JSON report.
"""

import copy
import io
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import sparsetrain
from sparsetrain import maskops
from sparsetrain.distributions import layer_sparsities

TOTAL, SPLIT = 24, 9
RUNS = {
    # name: (method, options, optimizer)
    "acdc": ("acdc", dict(unit="steps", warmup=3, compressed=4, decompressed=4, final=6), "sgd"),
    "acdc_nm": ("acdc", dict(unit="steps", warmup=3, compressed=4, decompressed=4, final=6, mask_type="2:4"), "adam"),
    "gmp_uniform": ("gmp", dict(unit="steps", start=2, end=14, frequency=3, distribution="uniform"), "adam"),
    "magnitude": ("magnitude", dict(unit="steps", at=4), "adamw"),
    "static": ("static", {}, "sgd"),
    "rigl": ("rigl", dict(delta=3, t_end=0.75), "adamw"),
    "set": ("set", dict(delta=3, t_end=0.75, grow_init="random"), "sgd"),
    "gap": ("gap", dict(unit="steps", groups=3, rounds=2, period=3), "sgd"),
    "imp": ("imp", dict(unit="steps", rounds=2, pretrain=6), "sgd"),
    # masks a bit per weight on each rank's rows
    "acdc_packed": ("acdc", dict(unit="steps", warmup=3, compressed=4, decompressed=4, final=6, mask_storage="packed"),
                    "sgd"),
    "rigl_packed": ("rigl", dict(delta=3, t_end=0.75, mask_storage="packed"), "adamw"),
}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
}


def build(method: str, options: dict, opt_name: str, seed: int = 0):
    torch.manual_seed(seed)
    # 28, 28 and 5 rows: the last layer splits unevenly (3 + 2); inputs are multiples of 4 for 2:4 masks.
    model = nn.Sequential(nn.Linear(16, 28), nn.ReLU(), nn.Linear(28, 28), nn.ReLU(), nn.Linear(28, 5))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    sparsity = None if "mask_type" in options else 0.9
    sparsifier = sparsetrain.create(method, model, sparsity=sparsity, total_steps=TOTAL, seed=3, **options)
    optimizer = sparsifier.wrap_optimizer(OPTIMIZERS[opt_name](model.parameters()))
    sparsifier.attach(optimizer)
    return model, optimizer, sparsifier


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.detach().cpu())
    return torch.cat(parts)


def expected_masks(sparsifier, sparsity: float, scores: dict) -> dict:
    """The single-process masks of the gathered scores (what an unsharded run computes)."""
    if sparsifier.nm is not None:
        return {n: maskops.nm_mask(s, *sparsifier.nm) for n, s in scores.items()}
    per_layer = layer_sparsities(sparsifier.distribution, {n: tuple(s.shape) for n, s in scores.items()}, sparsity)
    if per_layer is None:
        return maskops.global_topk_masks(scores, sparsity)
    return {n: maskops.topk_mask(s, per_layer[n]) for n, s in scores.items()}


def train(run: str, stop: int = TOTAL, state: dict | None = None, checks: list | None = None):
    method, options, opt_name = RUNS[run]
    model, optimizer, sparsifier = build(method, options, opt_name, seed=0 if state is None else 11)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        buffer = io.BytesIO(state["sparsifier"])
        sparsifier.load_state_dict(torch.load(buffer, weights_only=True))
        start = sparsifier.count
    if checks is not None:
        compute = sparsifier.compute_masks

        def checked(sparsity, scores, *, among_active=False):
            masks = compute(sparsity, scores, among_active=among_active)
            full = {n: gather_rows(s) for n, s in scores.items()}
            if among_active:
                full = {n: torch.where(gather_rows(sparsifier.masks[n]), s.float(), torch.full_like(s, -1.0))
                        for n, s in full.items()}  # fmt: skip
            reference = expected_masks(sparsifier, sparsity, full)
            got = {n: gather_rows(m) for n, m in masks.items()}
            if not all(torch.equal(got[n], reference[n]) for n in got):
                checks.append(f"step {sparsifier.count}: gathered masks differ from the single-process masks")
            return masks

        sparsifier.compute_masks = checked
    saved = None
    rank = dist.get_rank()
    for step in range(start, stop):
        if step == SPLIT and state is None:
            payload = io.BytesIO()
            torch.save(sparsifier.state_dict(), payload)
            saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                     "sparsifier": payload.getvalue()}  # fmt: skip
        g = torch.Generator().manual_seed(1000 * rank + step)
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)

        def closure(x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        if checks is not None:
            for name, param in sparsifier.params.items():
                weights, mask = gather_rows(param.to_local()), gather_rows(sparsifier.masks[name])
                masked = weights[~mask]
                if bool((masked != 0).any()) or bool(torch.signbit(masked).any()):
                    checks.append(f"step {step}: masked weights of {name} are not +0.0")
    return model, sparsifier, saved


def report(run: str) -> dict:
    checks: list[str] = []
    model, sparsifier, saved = train(run, checks=checks)
    weights = {n: gather_rows(p.to_local()) for n, p in sparsifier.params.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    resumed_model, resumed, _ = train(run, state=saved)
    same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed_model.parameters()))
    same_masks = all(torch.equal(sparsifier.masks[n], resumed.masks[n]) for n in sparsifier.masks)
    return {
        "checks": checks,
        "zeros": zeros,
        "total": total,
        "per_layer_zeros": {n: int((w == 0).sum()) for n, w in weights.items()},
        "shapes": {n: list(w.shape) for n, w in weights.items()},
        "report_sparsity": sparsifier.sparsity().overall,
        "mask_updates": sparsifier.mask_version,
        "resume_bit_identical": bool(same and same_masks and resumed.history == sparsifier.history),
        "memory_bytes_per_parameter": sparsifier.memory_bytes().bytes_per_parameter,
    }


def refused(method: str) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 28), nn.ReLU(), nn.Linear(28, 5))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    try:
        sparsifier = sparsetrain.create(method, model, sparsity=0.9, total_steps=TOTAL)
        optimizer = sparsifier.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.05))
        sparsifier.attach(optimizer)
    except ValueError as error:
        return str(error)
    return ""


def main() -> None:
    out = sys.argv[1]
    runs = sys.argv[2].split(",") if len(sys.argv) > 2 else list(RUNS)
    dist.init_process_group("gloo")
    result = {run: report(run) for run in runs}
    result["refused"] = {m: refused(m) for m in ("rda", "cram", "mfac", "pgap")}
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(result, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip the interpreter's teardown (see distributed_worker.py)
