"""The trainer's FSDP2 side (``--set fsdp=true``): shard the model, gather what rank 0 evaluates and saves.

The model is sharded with ``torch.distributed.fsdp.fully_shard`` (Zhao et al., "PyTorch FSDP", VLDB 2023; the
per-parameter DTensor version, FSDP2): every element of an ``nn.ModuleList`` / ``nn.Sequential`` that holds
parameters (a transformer or residual block, a layer of an MLP) is one FSDP unit, then the root takes the rest.
The sparsifier and the optimizer are built on the sharded parameters: masks, optimizer state and the method's
state are kept for this rank's rows only (:mod:`sparsetrain.core.sharding`).

Checkpoints are ordinary single files: the model's and the optimizer's full state dicts (every DTensor gathered to
rank 0's CPU) and each rank's own sparsifier state, written atomically by rank 0 like any other run's. So
``last.pt``, ``sparse_final.pt`` and ``dense_best.pt`` keep their format, ``eval``/``export``/``bench`` read them,
and a resume loads full tensors that every rank cuts to its own rows again. The sparsifier's state is per shard
(masks of this rank's rows, with the rows they are): a resume on another number of processes assembles each
rank's rows from the saved pieces (``Sparsifier.load_state_dicts``), and on one process continues unsharded,
still writing checkpoints of this form.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["check_fsdp_config", "check_fsdp_world", "shard_model", "full_model_state", "full_optimizer_state",
           "load_full_state", "gather_to_main"]  # fmt: skip


def check_fsdp_config(config: dict[str, Any]) -> None:
    """Refuse, before anything starts, what an FSDP run cannot do: a method that keeps whole-tensor state (its
    class says ``shardable = False``), channel masks, a DDP communication hook, the DDP mask check."""
    if not config.get("fsdp"):
        return
    import sparsetrain

    method = config.get("method")
    if method in sparsetrain.list_methods() and not sparsetrain.get_method(method).shardable:
        able = [m for m in sparsetrain.list_methods() if sparsetrain.get_method(m).shardable]
        raise ConfigError(
            f"method {method!r} does not support FSDP-sharded parameters (fsdp=true); methods that do: "
            f"{', '.join(able)}. Train {method} with DDP instead: --nproc N without fsdp=true"
        )
    if config.get("mask_type") == "channel":
        raise ConfigError(
            "mask_type 'channel' does not support fsdp=true (a channel group spans several layers' shards); use "
            "unstructured or N:M masks, or DDP (--nproc N without fsdp=true)"
        )
    if config.get("comm_hook", "none") != "none":
        raise ConfigError(
            f"comm_hook {config['comm_hook']!r} compresses DDP's gradient all-reduce; fsdp=true reduce-scatters "
            "gradients itself: leave comm_hook at none, or train with DDP"
        )
    if config.get("check_masks"):
        raise ConfigError(
            "check_masks compares whole masks across DDP replicas; under fsdp=true each rank holds the masks of its "
            "own rows (their agreement is exact by construction): leave check_masks out"
        )


def check_fsdp_world(config: dict[str, Any], world: int) -> None:
    """fsdp=true shards over processes: one process is a usage error, not a silent unsharded run (the trainer
    skips this check when it resumes an FSDP run on one process, which then continues unsharded)."""
    if config.get("fsdp") and world < 2:
        raise ConfigError(
            f"fsdp=true shards the model over processes, but this run has {world}; launch it with --nproc N "
            "(N >= 2) or under torchrun, or leave fsdp out"
        )


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The FSDP units below ``module``: the parameter-holding elements of its ModuleLists and Sequentials."""
    units: list[nn.Module] = []
    for child in module.children():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and any(True for _ in child.parameters()):
            units.append(child)
        else:
            units.extend(_blocks(child))
    return units


def shard_model(model: nn.Module) -> list[nn.Module]:
    """``fully_shard`` every block of ``model`` (see the module docstring), then the model itself; returns the
    blocks. Every parameter becomes a DTensor sharded on dim 0 over all processes (one 1-D mesh)."""
    from torch.distributed.fsdp import fully_shard

    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return blocks


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict on rank 0's CPU (``{}`` on the other ranks). A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}  # a snapshot: later steps do not change it


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict, keyed by parameter name, on rank 0's CPU (``{}`` elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Tensor], optim_state: dict[str, Any]
) -> None:
    """Load full state dicts (as :func:`full_model_state` / :func:`full_optimizer_state` saved them, read on every
    rank) into the sharded model and optimizer: each rank keeps its own rows."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_options(full_state_dict=True, strict=True))
    set_optimizer_state_dict(model, optimizer, optim_state, options=_options(full_state_dict=True))


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere). Collective."""
    objects: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, objects, dst=0)
    return objects
