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
# ``reshard``: 2 ranks to step TO_ONE, 1 process to TO_TWO, 2 ranks to TOTAL. AC/DC is sparse at TO_ONE (phase 3-7),
# compresses at 18 with the previous masks it was resharded with; GMP updates masks at 8, 11 and 14.
RESHARD, TO_ONE, TO_TWO = ["acdc", "acdc_packed", "acdc_nm", "gmp_uniform"], 5, 12
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
    # the gradients masked inside the optimizer's update, on each rank's rows
    "acdc_masked_sgd": ("acdc", dict(unit="steps", warmup=3, compressed=4, decompressed=4, final=6), "masked_sgd"),
    "rigl_masked_adamw": ("rigl", dict(delta=3, t_end=0.75), "masked_adamw"),
}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01),
    "masked_sgd": lambda p: sparsetrain.optim.MaskedSGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "masked_adamw": lambda p: sparsetrain.optim.MaskedAdamW(p, lr=0.01, weight_decay=0.01),
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
        run_steps(model, optimizer, sparsifier, range(step, step + 1), [rank],
                  lambda t: gather_rows(local_of(t)), [] if checks is None else checks)  # fmt: skip
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
        "masks_in_optimizer": sparsifier._masks_handed_to is not None,
    }


def batch(step: int, ranks: list[int]):
    """The batch ranks ``ranks`` draw at ``step`` (one process taking every rank's share trains as they do)."""
    parts = []
    for rank in ranks:
        g = torch.Generator().manual_seed(1000 * rank + step)
        parts.append((torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g)))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def run_steps(model, optimizer, sparsifier, steps: range, ranks: list[int], gather, checks: list) -> None:
    for step in steps:
        x, y = batch(step, ranks)

        def closure(x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        for name, param in sparsifier.params.items():
            masked = gather(param)[~gather(sparsifier.masks[name])]
            if bool((masked != 0).any()) or bool(torch.signbit(masked).any()):
                checks.append(f"step {step}: masked weights of {name} are not +0.0")


def previous_masks(sparsifier) -> dict | None:
    """AC/DC's previous compressed phase's masks (kept packed) of this rank's rows, unpacked."""
    masks = getattr(sparsifier, "_last_sparse_masks", None)
    if masks is None:
        return None
    return {n: maskops.unpack_mask(m, local_of(sparsifier.params[n]).shape) for n, m in masks.items()}


def gathered_moments(sparsifier) -> dict:
    """The second moments AC/DC keeps for pruned weights, gathered over the ranks (every rank holds the same
    names and buffers here: 2:4 masks prune weights in every row)."""
    return {n: {k: gather_rows(t) for k, t in kept.items()} for n, kept in sparsifier._second_moments.items()}


def same(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reshard(run: str) -> dict:
    """2 ranks -> 1 process -> 2 ranks. A sharded run saved at TO_ONE (full model and optimizer state, each rank's
    sparsifier state through torch.save) is loaded by an unsharded model in one process, which trains to TO_TWO and
    saves; fresh sharded objects on 2 ranks load that and train to TOTAL. Checked at each load: the weights equal
    the saved ones exactly, the masks (and AC/DC's previous masks) equal the saved ones gathered; after every step
    masked weights are +0.0; at the end the weights hold exactly the asked count of zeros."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True)
    method, options, opt_name = RUNS[run]
    checks: list[str] = []
    world = list(range(dist.get_world_size()))
    model, optimizer, sparsifier = build(method, options, opt_name)
    gather = lambda t: gather_rows(local_of(t))  # noqa: E731
    run_steps(model, optimizer, sparsifier, range(TO_ONE), [dist.get_rank()], gather, checks)
    weights = {k: v.clone() for k, v in get_model_state_dict(model, options=full).items()}
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)
    payload = io.BytesIO()
    torch.save(sparsifier.state_dict(), payload)
    files = [None] * len(world)
    dist.all_gather_object(files, payload.getvalue())
    pieces = [torch.load(io.BytesIO(f), weights_only=True) for f in files]
    saved_masks = {n: gather_rows(m) for n, m in sparsifier.masks.items()}
    saved_moments = gathered_moments(sparsifier)
    saved_previous = previous_masks(sparsifier)
    saved_previous = None if saved_previous is None else {n: gather_rows(m) for n, m in saved_previous.items()}

    # 2 -> 1: every rank plays the single process alone (the same steps, so the same result on each).
    torch.manual_seed(11)
    plain = nn.Sequential(nn.Linear(16, 28), nn.ReLU(), nn.Linear(28, 28), nn.ReLU(), nn.Linear(28, 5))
    sparsity = None if "mask_type" in options else 0.9
    one = sparsetrain.create(method, plain, sparsity=sparsity, total_steps=TOTAL, seed=3, **options)
    one_optimizer = one.wrap_optimizer(OPTIMIZERS[opt_name](plain.parameters()))
    one.attach(one_optimizer)
    set_model_state_dict(plain, weights, options=StateDictOptions(full_state_dict=True, strict=True))
    set_optimizer_state_dict(plain, one_optimizer, optim_state, options=full)
    one.load_state_dicts(pieces)
    loaded_1 = {
        "weights": all(torch.equal(plain.state_dict()[k], weights[k]) for k in weights),
        "masks": all(torch.equal(one.masks[n], saved_masks[n]) for n in saved_masks),
        "previous_masks": same(previous_masks(one), saved_previous),
        "second_moments": one._second_moments.keys() == saved_moments.keys()
                          and all(same(one._second_moments[n], saved_moments[n]) for n in saved_moments),
        "count": one.count == TO_ONE,
    }  # fmt: skip
    run_steps(plain, one_optimizer, one, range(TO_ONE, TO_TWO), world, lambda t: t, checks)
    plain_weights = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_optim = get_optimizer_state_dict(plain, one_optimizer, options=full)
    plain_state = torch.load(io.BytesIO(bytes_of(one.state_dict())), weights_only=True)
    plain_previous = previous_masks(one)

    # 1 -> 2: fresh sharded objects load the one process's state, each rank its rows.
    model, optimizer, sparsifier = build(method, options, opt_name, seed=11)
    # (a copy: loading into sharded parameters replaces the dict's values by DTensors)
    set_model_state_dict(model, dict(plain_weights), options=StateDictOptions(full_state_dict=True, strict=True))
    set_optimizer_state_dict(model, optimizer, plain_optim, options=full)
    sparsifier.load_state_dict(plain_state)
    resumed_previous = previous_masks(sparsifier)
    resumed_previous = None if resumed_previous is None else {n: gather_rows(m) for n, m in resumed_previous.items()}
    loaded_2 = {
        "weights": all(torch.equal(gather_rows(local_of(p)), plain_weights[n]) for n, p in model.named_parameters()),
        "masks": all(torch.equal(gather_rows(sparsifier.masks[n]), plain_state["masks"][n]) for n in saved_masks),
        "previous_masks": same(resumed_previous, plain_previous),
        "second_moments": gathered_moments(sparsifier).keys() == plain_state["second_moments"].keys()
                          and all(same(gathered_moments(sparsifier)[n], plain_state["second_moments"][n])
                                  for n in plain_state["second_moments"]),
        "count": sparsifier.count == TO_TWO,
    }  # fmt: skip
    run_steps(model, optimizer, sparsifier, range(TO_TWO, TOTAL), [dist.get_rank()], gather, checks)
    final = {n: gather_rows(local_of(p)) for n, p in sparsifier.params.items()}
    return {
        "checks": checks,
        "previous_masks_saved": [saved_previous is not None, plain_previous is not None],
        "second_moments_saved": [len(saved_moments), len(plain_state["second_moments"])],
        "loaded_1": loaded_1,
        "loaded_2": loaded_2,
        "zeros": sum(int((w == 0).sum()) for w in final.values()),
        "total": sum(w.numel() for w in final.values()),
        "mask_updates": [one.mask_version - int(pieces[0]["mask_version"]),
                         sparsifier.mask_version - int(plain_state["mask_version"])],  # on 1 process, then 2 ranks
    }


def local_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to_local() if hasattr(tensor, "to_local") else tensor.detach()


def bytes_of(state: dict) -> bytes:
    payload = io.BytesIO()
    torch.save(state, payload)
    return payload.getvalue()


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
    result["reshard"] = {run: reshard(run) for run in RESHARD if run in runs}
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
