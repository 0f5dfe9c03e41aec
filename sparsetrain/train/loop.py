"""The reference training loop behind ``sparsetrain train``: one sitting to read, top to bottom.

It is a client of the library like any user's loop: it creates a sparsifier, attaches it to the optimizer and
listens to its phase events. On top it adds what a run needs: data, a learning-rate schedule, evaluation,
the sparse-dense pair (AC/DC), atomic checkpoints with exact resume, metrics, plots and a summary.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import sparsetrain

from ..distributed import check_masks_consistent
from ..distributed.hooks import check_hook, register_hook
from ..errors import CheckpointError, ConfigError, TrainingDiverged, first_line, writing
from ..flops import FlopCounter, TrainingFlops
from . import checkpoint
from .config import default_out_dir
from .data import Splits, iterate_batches, load_dataset, num_batches
from .models import build_model, model_spec

log = logging.getLogger(__name__)

# The run's files; everything a resume needs is in last.pt.
LAST, SPARSE, DENSE = "last.pt", "sparse_final.pt", "dense_best.pt"
# What a run writes before its first checkpoint: a folder holding only these stopped in its first epoch.
EARLY_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "tensorboard")
# What restore() reads from last.pt.
RESUME_KEYS = ("model", "model_spec", "config", "epoch", "optimizer", "sparsifier", "train_flops", "metrics",
               "best_dense", "elapsed", "rng")  # fmt: skip


def lr_factor(step: int, total: int, steps_per_epoch: int, config: dict[str, Any]) -> float:
    """Learning-rate multiplier at ``step``: a pure function of time, so a resumed run needs no scheduler state."""
    warmup = int(round(config["warmup_epochs"] * steps_per_epoch))
    schedule = config["schedule"]
    if schedule == "onecycle":
        # Linear rise over the first 30% from lr/25, then cosine annealing to lr/1e4 (Smith & Topin 2019).
        peak = max(1, int(0.3 * total))
        if step < peak:
            return 1 / 25 + (1 - 1 / 25) * step / peak
        progress = (step - peak) / max(1, total - peak)
        return 1e-4 + (1 - 1e-4) * sparsetrain.schedules.half_cosine(progress)
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return sparsetrain.schedules.half_cosine(progress)
    if schedule == "step":
        return config["gamma"] ** sum(step >= m * total for m in config["milestones"])
    return 1.0


def make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying biases and norm scales does not help and hurts small nets.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(
            groups, lr=config["lr"], momentum=config["momentum"], nesterov=config["nesterov"] and config["momentum"] > 0
        )
    if config["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=config["lr"])
    return torch.optim.AdamW(groups, lr=config["lr"])


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``dataset`` (model put in eval mode and restored)."""
    was_training = model.training
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    for x, y in iterate_batches(dataset, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    if seen == 0:
        return {"loss": float("nan"), "acc": float("nan")}
    return {"loss": total_loss / seen, "acc": 100.0 * correct / seen}


def weight_sparsity(state: dict[str, torch.Tensor], names) -> float:
    """Fraction of exact zeros over the named tensors of a state dict (the sparsified weights)."""
    zeros = sum(sparsetrain.maskops.count_zeros(state[n]) for n in names)
    return zeros / max(1, sum(state[n].numel() for n in names))


def create_sparsifier(model: nn.Module, config: dict[str, Any], steps_per_epoch: int) -> sparsetrain.Sparsifier:
    options = dict(config["method_options"])
    for key in ("distribution", "include", "exclude"):
        if config[key] is not None:
            options.setdefault(key, config[key])
    if config["mask_type"] != "unstructured":
        options.setdefault("mask_type", config["mask_type"])
    sparsity = None if config["mask_type"] != "unstructured" else config["sparsity"]
    try:
        return sparsetrain.create(
            config["method"],
            model,
            sparsity=sparsity,
            total_epochs=config["epochs"],
            steps_per_epoch=steps_per_epoch,
            seed=config["seed"],
            **options,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


def checkpoint_payload(model: nn.Module, spec: dict, config: dict, **extra: Any) -> dict[str, Any]:
    return {
        "format": checkpoint.FORMAT,
        "version": checkpoint.VERSION,
        "model_spec": spec,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": config,
        **extra,
    }


class Run:
    """One training run in ``out``: build everything from ``config``, train, write outputs."""

    def __init__(
        self,
        config: dict[str, Any],
        *,
        resume: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.config = config
        self.out = Path(config["out"] or default_out_dir(config))
        self.on_epoch = on_epoch
        self.progress = progress
        self.resume = resume

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        config = self.config
        if config["threads"]:
            torch.set_num_threads(config["threads"])
        if config["device"] == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
        use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        # Data-parallel when launched by torchrun (or `sparsetrain train --nproc N`): gloo on CPU, nccl on GPU.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        if config["batch_size"] % self.world:
            raise ConfigError(
                f"batch_size {config['batch_size']} is the global batch and must divide evenly among "
                f"{self.world} processes"
            )
        self.batch_per_rank = config["batch_size"] // self.world
        torch.manual_seed(config["seed"])
        self.data: Splits = load_dataset(
            config["dataset"],
            data_dir=config["data_dir"],
            val_fraction=config["val_fraction"],
            seed=config["seed"],
            limit_train=config["limit_train"],
        )
        try:
            self.spec = model_spec(config["model"], self.data.input_shape, self.data.num_classes)
            self.model = build_model(**self.spec).to(self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.steps_per_epoch = num_batches(
            len(self.data.train), self.batch_per_rank, drop_last=True, world_size=self.world
        )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {config['batch_size']} is larger than the training set ({len(self.data.train)} samples)"
            )
        self.total_steps = self.steps_per_epoch * config["epochs"]
        self.sparsifier = create_sparsifier(self.model, config, self.steps_per_epoch)
        # Methods that are optimizers (rda) or wrap one (cram) supply the optimizer the run steps.
        self.optimizer = self.sparsifier.wrap_optimizer(make_optimizer(self.model, config))
        self.uses_closure = sparsetrain.Capability.CLOSURE in self.sparsifier.capabilities
        if self.uses_closure and config["amp"] and self.device.type == "cuda":
            raise ConfigError(
                f"method {config['method']!r} steps with a closure, which fp16 gradient scaling (amp on cuda) does "
                "not support; run it without --amp"
            )
        self.sparsifier.attach(self.optimizer)
        self.sparsifier.subscribe(self._on_event)
        self.train_model: nn.Module = self.model
        self.hook_state = None
        try:
            check_hook(config["comm_hook"], self.sparsifier, self._hook_options())
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.world > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.hook_state = register_hook(
                self.train_model,
                config["comm_hook"],
                sparsifier=self.sparsifier,
                seed=config["seed"],
                **self._hook_options(),
            )
        elif config["comm_hook"] != "none":
            log.warning("comm_hook %s has no effect in a single process", config["comm_hook"])
        sample = self.data.train[:2][0].to(self.device)
        self.flop_counter = FlopCounter(self.model, sample)
        self.train_flops = TrainingFlops(self.flop_counter)
        self._forward_flops_version: Hashable = None
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config["amp"] and self.device.type == "cuda")
        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.best_dense: dict[str, Any] | None = None  # {"val_acc", "epoch", "step", "model"}
        self.elapsed = 0.0

    def _hook_options(self) -> dict[str, Any]:
        config = self.config
        if config["comm_hook"] != "qsgd":
            return {}
        return {"levels": config["qsgd_levels"], "bucket_size": config["qsgd_bucket"], "norm": config["qsgd_norm"]}

    @property
    def is_main(self) -> bool:
        """Only rank 0 evaluates for the logs, writes files and prints."""
        return self.rank == 0

    def _on_event(self, event: dict[str, Any]) -> None:
        # AC/DC's pair: when a decompressed phase ends (before the masks change) the model is the dense twin.
        # Choose it on validation accuracy, never test. The warm-up is not a decompressed phase.
        if event["event"] == "phase_end" and event["phase"] == "dense" and event["step"] > self._warmup_end():
            self._consider_dense(event["step"])

    def _warmup_end(self) -> int:
        timeline = self.sparsifier.timeline()
        return timeline[0].end if timeline and timeline[0].kind == "dense" else 0

    def _consider_dense(self, step: int) -> None:
        val = evaluate(self.model, self.data.val, self.config["eval_batch_size"], self.device)
        log.info("dense phase ending at step %d: val acc %.2f", step, val["acc"])
        if self.best_dense is None or val["acc"] > self.best_dense["val_acc"]:
            self.best_dense = {
                "val_acc": val["acc"],
                "step": step,
                "epoch": step / self.steps_per_epoch,
                "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            }

    # ------------------------------------------------------------------ resume
    def state(self) -> dict[str, Any]:
        return checkpoint_payload(
            self.model,
            self.spec,
            self.config,
            kind="last",
            epoch=self.epoch,
            optimizer=self.optimizer.state_dict(),
            sparsifier=self.sparsifier.state_dict(),
            scaler=self.scaler.state_dict(),
            train_flops=self.train_flops.state_dict(),
            metrics=self.metrics,
            best_dense=self.best_dense,
            elapsed=self.elapsed,
            rng=torch.get_rng_state(),
        )

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sparsifier.load_state_dict(state["sparsifier"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.train_flops.load_state_dict(state["train_flops"])
        self.metrics = list(state["metrics"])
        self.best_dense = state["best_dense"]
        self.elapsed = float(state["elapsed"])
        self.epoch = int(state["epoch"])
        torch.set_rng_state(state["rng"])

    # ------------------------------------------------------------------ training
    def train_epoch(self) -> dict[str, float]:
        config, model, optimizer = self.config, self.model, self.optimizer
        model.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches = iterate_batches(
            self.data.train,
            self.batch_per_rank,
            shuffle=True,
            seed=config["seed"],
            epoch=self.epoch,
            drop_last=True,
            rank=self.rank,
            world_size=self.world,
        )
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(
                batches,
                total=self.steps_per_epoch,
                desc=f"epoch {self.epoch + 1}/{config['epochs']}",
                leave=False,
                dynamic_ncols=True,
            )
            batches = bar
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            lr = config["lr"] * self.sparsifier.lr_factor(self.sparsifier.count, self._base_lr_factor)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # Parallel GaP trains replicas apart: no gradient all-reduce while its rounds last.
            apart = self.world > 1 and not self.sparsifier.synchronize_gradients()
            if self.hook_state is not None:
                self.hook_state.step = self.sparsifier.count  # seeds the hooks' stochastic rounding
            if self.uses_closure:
                loss, logits = self._closure_step(x, y)
            else:
                with self.train_model.no_sync() if apart else contextlib.nullcontext():
                    loss, logits = self._forward_backward(x, y)
                if config["grad_clip"]:
                    self.scaler.unscale_(optimizer)
                    self._clip_gradients()
                self._count_flops(len(y))  # the density in force for this step, before a boundary may change it
                self.scaler.step(optimizer)  # the sparsifier's hooks run inside
                self.scaler.update()
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{total_loss / seen:.3f}",
                    acc=f"{100 * correct / seen:.1f}",
                    phase=self.sparsifier.phase,
                    sparsity=f"{self.sparsifier.target_sparsity:.2f}",
                )
        if bar is not None:
            bar.close()
        if self.world > 1:  # the epoch's training metrics over every rank's share
            totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
            dist.all_reduce(totals)
            total_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            if self.config["check_masks"] and self.sparsifier.synchronize_gradients():
                check_masks_consistent(self.sparsifier.masks)
        return {"loss": total_loss / seen, "acc": 100.0 * correct / seen, "lr": lr}

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed gradients, then the loss of the batch and its backward pass (scaled when fp16 amp is on)."""
        config = self.config
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=config["amp"]):
            logits = self.train_model(x)
            loss = nn.functional.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            saved = (
                f"the last good checkpoint is {self.out / LAST}"
                if (self.out / LAST).is_file()
                else "no epoch had finished, so no checkpoint was saved"
            )
            raise TrainingDiverged(
                f"the loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {self.sparsifier.count}; "
                f"lower the learning rate (lr={config['lr']}) or set grad_clip; {saved}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def _closure_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``optimizer.step(closure)`` for optimizers that evaluate the loss themselves (CrAM: twice).

        The first evaluation is the clean one: its loss and logits are the step's training metrics. Training
        FLOPs count the forward/backward passes the closure really ran.
        """
        first: list[tuple[torch.Tensor, torch.Tensor]] = []

        def closure() -> torch.Tensor:
            loss, logits = self._forward_backward(x, y)
            if self.config["grad_clip"]:
                self._clip_gradients()
            self._count_flops(len(y), repeat=bool(first))
            if not first:
                first.append((loss.detach(), logits.detach()))
            return loss

        self.optimizer.step(closure)  # the sparsifier's hooks run inside
        return first[0]

    def _tensorboard(self, row: dict[str, Any]) -> None:
        """Scalars to ``out/tensorboard`` when the tensorboard package is installed (optional)."""
        if not hasattr(self, "_tb_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb_writer = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tb_writer = None
        if self._tb_writer is None:
            return
        for key, value in row.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self._tb_writer.add_scalar(key, value, row["epoch"])
        self._tb_writer.flush()

    def _clip_gradients(self) -> None:
        # Clip the gradient the step applies: masked weights' gradients are zeroed first (the pre-step hook would
        # zero them after the clip, so the clip would measure a norm the step never applies). A step that reads
        # them (RigL's update) keeps them, and clips the dense gradient it reads.
        if not self.sparsifier.needs_dense_gradients():
            self.sparsifier.mask_gradients()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config["grad_clip"])

    def _base_lr_factor(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.steps_per_epoch, self.config)

    def _count_flops(self, samples: int, repeat: bool = False) -> None:
        version = self.sparsifier.masks_key()
        if self._forward_flops_version != version:
            self._forward_flops = self.flop_counter.forward(self.sparsifier.masks).sparse_total
            self._forward_flops_version = version
        # A step that reads the gradients of masked weights (RigL's updates, RDA before its prune) pays for the
        # dense weight gradient: the method says so, the tracker charges 2 f_S + f_D for it.
        dense_gradients = self.sparsifier.needs_dense_gradients()
        self.train_flops.add(samples, forward_flops=self._forward_flops, repeat=repeat, dense_gradients=dense_gradients)

    def run(self) -> dict[str, Any]:
        self.setup()
        if self.resume:
            try:
                self.restore(checkpoint.load(self.out / LAST))
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise CheckpointError(
                    f"cannot resume from {str(self.out / LAST)!r}: it does not fit the run it describes "
                    f"({type(error).__name__}: {first_line(error)})"
                ) from None
            if self.is_main:
                truncate_metrics(self.out, self.epoch)
            log.info("resumed %s at epoch %d", self.out, self.epoch)
        elif self.is_main:
            with writing(self.out / "config.yaml"):
                self.out.mkdir(parents=True, exist_ok=True)
                write_config(self.config, self.out / "config.yaml")
        config = self.config
        try:
            while self.epoch < config["epochs"]:
                self._epoch()
            summary = self.finish() if self.is_main else {}
            if self.world > 1:
                dist.barrier()  # no rank tears the group down while rank 0 still writes the run's files
            return summary
        finally:
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _epoch(self) -> None:
        config = self.config
        start = time.perf_counter()
        phase = self.sparsifier.phase
        train = self.train_epoch()
        self.epoch += 1
        if self.is_main:
            val = evaluate(self.model, self.data.val, config["eval_batch_size"], self.device)
            test = evaluate(self.model, self.data.test, config["eval_batch_size"], self.device)
            self.elapsed += time.perf_counter() - start
            row = {
                "epoch": self.epoch,
                "step": self.sparsifier.count,
                "lr": train["lr"],
                "phase": phase,
                "train_loss": train["loss"],
                "train_acc": train["acc"],
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "test_loss": test["loss"],
                "test_acc": test["acc"],
                "sparsity": self.sparsifier.sparsity().overall,
                "train_flops_ratio": self.train_flops.ratio,
                "time": self.elapsed,
            }
            self.metrics.append(row)
            with writing(self.out / "metrics.jsonl"):
                append_metrics(row, self.out)
            self._tensorboard(row)
            self._save(self.state(), LAST)
            if self.on_epoch:
                self.on_epoch(row)
        else:
            self.elapsed += time.perf_counter() - start
        if self.world > 1:
            dist.barrier()  # last.pt is complete before any rank moves on (a resume reads it on every rank)

    # ------------------------------------------------------------------ outputs
    def _prune_after_training(self) -> dict[str, Any]:
        """For methods that train dense for later one-shot pruning (cram): the trained dense model's record and
        state; then the model pruned in place to the target and its batch-norm statistics re-estimated."""
        from ..oneshot import prune_oneshot, recalibrate_batchnorm

        config, data = self.config, self.data
        dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dense_info = {
            "sparsity": weight_sparsity(dense_state, self.sparsifier.params),
            "val_acc": evaluate(self.model, data.val, config["eval_batch_size"], self.device)["acc"],
            "test_acc": evaluate(self.model, data.test, config["eval_batch_size"], self.device)["acc"],
            "epoch": self.epoch,
            "step": self.sparsifier.count,
        }
        prune_oneshot(
            self.model,
            None if config["mask_type"] != "unstructured" else config["sparsity"],
            mask_type=config["mask_type"],
            include=list(self.sparsifier.params),
        )
        batches = iterate_batches(data.train, config["batch_size"], shuffle=True, seed=config["seed"], epoch=-1)
        recalibrate_batchnorm(self.model, batches, num_samples=1000)
        return {"info": dense_info, "state": dense_state}

    def _save(self, payload: dict[str, Any], name: str) -> None:
        with writing(self.out / name):
            checkpoint.save_atomic(payload, self.out / name)

    def finish(self) -> dict[str, Any]:
        config, data = self.config, self.data
        pruned_after = sparsetrain.Capability.PRUNE_AFTER_TRAINING in self.sparsifier.capabilities
        trained_dense = self._prune_after_training() if pruned_after else None
        final_val = evaluate(self.model, data.val, config["eval_batch_size"], self.device)
        final_test = evaluate(self.model, data.test, config["eval_batch_size"], self.device)
        report = self.sparsifier.sparsity()
        forward = self.flop_counter.forward()
        sparse_info = {
            "val_acc": final_val["acc"],
            "test_acc": final_test["acc"],
            "sparsity": report.overall,
            "layers": report.layers,
            "forward_flops": forward.sparse_total,
            "forward_flops_ratio": forward.ratio,
        }
        self._save(checkpoint_payload(self.model, self.spec, config, kind="sparse_final", metrics=sparse_info), SPARSE)
        dense_info = None
        if self.best_dense is not None:
            dense_model = build_model(**self.spec).to(self.device)
            dense_model.load_state_dict(self.best_dense["model"])
            dense_test = evaluate(dense_model, data.test, config["eval_batch_size"], self.device)
            dense_info = {
                "sparsity": weight_sparsity(self.best_dense["model"], self.sparsifier.params),
                "val_acc": self.best_dense["val_acc"],
                "test_acc": dense_test["acc"],
                "epoch": self.best_dense["epoch"],
                "step": self.best_dense["step"],
            }
            self._save(checkpoint_payload(dense_model, self.spec, config, kind="dense_best", metrics=dense_info), DENSE)
        elif trained_dense is not None:
            dense_info = trained_dense["info"]
            dense_model = build_model(**self.spec).to(self.device)
            dense_model.load_state_dict(trained_dense["state"])
            self._save(
                checkpoint_payload(dense_model, self.spec, config, kind="dense_final", metrics=dense_info), DENSE
            )
        elif report.overall == 0 or sparsetrain.Capability.SPARSE not in self.sparsifier.capabilities:
            dense_info = {
                "sparsity": report.overall,
                "val_acc": final_val["acc"],
                "test_acc": final_test["acc"],
                "epoch": self.epoch,
                "step": self.sparsifier.count,
            }
        spe = self.steps_per_epoch
        summary = {
            "method": config["method"],
            "model": config["model"],
            "dataset": config["dataset"],
            "target_sparsity": config["sparsity"] if config["mask_type"] == "unstructured" else None,
            "mask_type": config["mask_type"],
            "epochs": config["epochs"],
            "seed": config["seed"],
            "sparse_model": sparse_info,
            "dense_model": dense_info,
            "train_flops_ratio": self.train_flops.ratio,
            "wall_time_s": self.elapsed,
            "timeline": [
                {"start_epoch": p.start / spe, "end_epoch": p.end / spe, "kind": p.kind}
                for p in self.sparsifier.timeline()
            ],
            "events": [e for e in self.sparsifier.history if e["event"] in ("compress", "phase_start")],
            "processes": self.world,
            "communication": None
            if self.hook_state is None
            else {
                "hook": config["comm_hook"],
                "bits_per_coordinate": self.hook_state.stats.bits_per_coordinate,
                "bytes_sent_rank0": self.hook_state.stats.bytes_sent,
            },
            "out": str(self.out),
            "files": sorted(p.name for p in self.out.iterdir() if not p.name.startswith(".")),
        }
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        if config["plots"]:
            try:
                from .plots import plot_run
            except ImportError:
                log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
            else:
                plot_run(self.metrics, summary["timeline"], self.out / "training.png", title=describe(config))
        summary["files"] = sorted(p.name for p in self.out.iterdir() if not p.name.startswith("."))
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def describe(config: dict[str, Any]) -> str:
    target = config["mask_type"] if config["mask_type"] != "unstructured" else f"{config['sparsity']:g}"
    return f"{config['method']} {target} - {config['model']} on {config['dataset']} - {config['epochs']} epochs"


def write_config(config: dict[str, Any], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(copy.deepcopy(config), sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is always either the old file or the complete new one (a full disk leaves
    the old one), raising :class:`~sparsetrain.errors.WriteError` that names ``path`` when it cannot."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def folder_state(out: Path) -> str:
    """What an output folder holds: ``"empty"`` (or missing), ``"run"`` (a run's ``last.pt``: resume it),
    ``"unstarted"`` (only what a run writes before its first checkpoint: it stopped in its first epoch and
    can be reused), or ``"other"`` (files that are not a run's)."""
    if not out.is_dir():
        return "empty"
    entries = list(out.iterdir())
    if not entries:
        return "empty"
    if (out / LAST).is_file():
        return "run"
    if all(e.name in EARLY_FILES or _temporary(e.name) for e in entries):
        return "unstarted"
    return "other"


def _temporary(name: str) -> bool:
    # The atomic writers' temporary files: ".<name>.<random>.tmp".
    return name.startswith(".") and name.endswith(".tmp")


def clear_unstarted(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what a run that stopped before its first checkpoint left (its config, partial metrics, ...)."""
    for entry in out.iterdir():
        if (entry.name in EARLY_FILES or _temporary(entry.name)) and entry.name not in keep:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def remove_stale_temporaries(out: Path) -> list[str]:
    """Temporary files of writes a killed run never finished; they are never read, only in the way."""
    stale = sorted(e.name for e in out.iterdir() if _temporary(e.name) and e.is_file())
    for name in stale:
        (out / name).unlink()
    return stale


def append_metrics(row: dict[str, Any], out: Path) -> None:
    """One JSON line and one CSV row per epoch (the CSV header written with the first row)."""
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    csv_path = out / "metrics.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_metrics(out: Path, epochs: int) -> None:
    """On resume, drop metric rows written after the checkpoint (an epoch that was interrupted mid-write)."""
    for name in ("metrics.jsonl", "metrics.csv"):
        path = out / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        keep = epochs + (1 if name.endswith(".csv") and lines else 0)
        path.write_text("".join(lines[:keep]))
