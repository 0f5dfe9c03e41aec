"""The reference training loop behind ``sparsetrain train``: one sitting to read, top to bottom.

It is a client of the library like any user's loop: it creates a sparsifier and attaches it to the optimizer.
On top it adds what a run needs: data, a learning-rate schedule, evaluation, the sparse-dense pair (AC/DC),
atomic checkpoints with exact resume, metrics, plots and a summary. Read :meth:`Run.run`, :meth:`Run.train_epoch`
and :meth:`Run._step` for the loop; set-up, resume and outputs follow.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import sparsetrain

from ..core.sharding import UnsplittableState
from ..core.sharding import local as sharding_local
from ..distributed import check_masks_consistent
from ..distributed.hooks import check_hook, hook_options, register_hook
from ..errors import CheckpointError, ConfigError, TrainingDiverged, first_line, writing
from ..flops import FlopCounter, TrainingFlops
from ..models import build_model, model_spec
from ..optim.groups import weight_decay_groups
from ..optim.masked import MaskedAdamW, MaskedSGD
from ..structured.slim_training import SlimTraining
from . import checkpoint, fsdp
from .config import TrainConfig, as_train_config, default_out_dir, describe
from .data import Splits, iterate_batches, load_dataset, num_batches
from .evaluation import (
    METRICS,
    batch_loss,
    checkpoint_payload,
    count_correct,
    cpu_state,
    evaluate,
    perplexity,
    weight_sparsity,
)
from .lr_schedules import lr_factor
from .outputs import (
    DENSE,
    EARLY_FILES,
    LAST,
    RESUME_KEYS,
    SPARSE,
    SUMMARY,
    append_metrics,
    clear_unstarted,
    folder_state,
    listed_files,
    remove_stale_temporaries,
    truncate_metrics,
    write_config,
    write_text_atomic,
)

# The names this module has always offered; the helpers now live in evaluation.py, outputs.py and config.py.
__all__ = ["DENSE", "EARLY_FILES", "LAST", "RESUME_KEYS", "SPARSE", "Run", "append_metrics", "checkpoint_payload",
           "clear_unstarted", "create_sparsifier", "describe", "evaluate", "folder_state", "lr_factor",
           "make_optimizer", "remove_stale_temporaries", "truncate_metrics", "weight_sparsity", "write_config",
           "write_text_atomic"]  # fmt: skip

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, config: TrainConfig | Mapping[str, Any]) -> torch.optim.Optimizer:
    """The run's optimizer: SGD (momentum, Nesterov), Adam or AdamW over ``model``'s parameters, weights decayed,
    biases and norms not.

    It takes torch's multi-tensor implementation (``foreach=True``), which torch uses by default on CUDA only; on
    CPU the default is a Python loop over parameters with a temporary per operation, a few milliseconds more per
    step on a model of a few million weights. ``foreach`` gives bit-identical weights to the loop (SGD, Adam,
    AdamW; tests/test_trainer.py), so runs reproduce the ones made before it, and it works on FSDP2's sharded
    parameters, so FSDP2 and DDP runs stay equal bit for bit. torch's ``fused=True`` kernels are faster still but
    differ from the loop in the last bits and have no sharding rule for FSDP2's parameters. ``masked_sgd`` and
    ``masked_adamw`` (:mod:`sparsetrain.optim.masked`) are SGD and AdamW with the attached sparsifier's gradient
    masking inside one compiled update per weight: on large models it saves the separate masking pass; the
    update may round differently from ``sgd`` / ``adamw`` in the last bits.
    """
    c = as_train_config(config)
    groups = weight_decay_groups(model.parameters(), c.weight_decay)  # weights decay, biases and norms do not
    if c.optimizer in ("sgd", "masked_sgd"):
        nesterov = c.nesterov and c.momentum > 0
        sgd = MaskedSGD if c.optimizer == "masked_sgd" else torch.optim.SGD
        return sgd(groups, lr=c.lr, momentum=c.momentum, nesterov=nesterov, foreach=True)
    if c.optimizer == "adam":
        return torch.optim.Adam(groups, lr=c.lr, foreach=True)
    if c.optimizer == "masked_adamw":
        return MaskedAdamW(groups, lr=c.lr, foreach=True)
    return torch.optim.AdamW(groups, lr=c.lr, foreach=True)


def create_sparsifier(
    model: nn.Module,
    config: TrainConfig | Mapping[str, Any],
    steps_per_epoch: int,
    example_input: torch.Tensor | None = None,
) -> sparsetrain.Sparsifier:
    c = as_train_config(config)
    options = dict(c.method_options)
    for key in ("distribution", "include", "exclude"):
        if getattr(c, key) is not None:
            options.setdefault(key, getattr(c, key))
    if c.mask_type != "unstructured":
        options.setdefault("mask_type", c.mask_type)
    # Methods that prune whole groups only (oto, variational) find them on the example input whatever the mask type.
    group_only = getattr(sparsetrain.get_method(c.method), "needs_example_input", False)
    if (options.get("mask_type") == "channel" or group_only) and example_input is not None:
        options.setdefault("example_input", example_input)  # channel masks find the model's groups on it
    try:
        return sparsetrain.create(
            c.method,
            model,
            sparsity=c.target_sparsity,
            total_epochs=c.epochs,
            steps_per_epoch=steps_per_epoch,
            seed=c.seed,
            **options,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None


class Run:
    """One training run in ``out``: build everything from ``config``, train, write outputs.

    ``config`` is a :class:`~sparsetrain.train.config.TrainConfig` or its dict form (validated here, once).
    """

    def __init__(
        self,
        config: TrainConfig | Mapping[str, Any],
        *,
        resume: bool = False,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.config = as_train_config(config)
        self.out = Path(self.config.out or default_out_dir(self.config.to_dict()))
        self.on_epoch = on_epoch
        self.progress = progress
        self.resume = resume
        self._config_dict: dict[str, Any] | None = None  # the plain form of the config, for the LR schedules

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        self.setup()
        if self.resume:
            self._restore_last()
        elif self.is_main:
            with writing(self.out / "config.yaml"):
                self.out.mkdir(parents=True, exist_ok=True)
                write_config(self.config.to_dict(), self.out / "config.yaml")
        try:
            while self.epoch < self.config.epochs:
                self._epoch()
            summary = self.finish() if self.is_main else {}
            if self.world > 1:
                dist.barrier()  # no rank tears the group down while rank 0 still writes the run's files
            return summary
        finally:
            if self.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _epoch(self) -> None:
        """Train one epoch; rank 0 evaluates it, logs its row and saves ``last.pt``."""
        start = time.perf_counter()
        phase = self.sparsifier.phase
        train = self.train_epoch()
        self.epoch += 1
        self._gather()  # FSDP: rank 0's full copy of the weights and the run's state (every rank takes part)
        if self.is_main:
            val = evaluate(self.view, self.data.val, self.config.eval_batch_size, self.device)
            test = evaluate(self.view, self.data.test, self.config.eval_batch_size, self.device)
            self.elapsed += time.perf_counter() - start
            self._record_epoch(phase, train, val, test)
        else:
            self.elapsed += time.perf_counter() - start
        if self.world > 1:
            dist.barrier()  # last.pt is complete before any rank moves on (a resume reads it on every rank)

    def train_epoch(self) -> dict[str, float]:
        """One pass over this process's share of the training set: its loss, accuracy and last learning rate."""
        config, sparsifier = self.config, self.sparsifier
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        batches, bar = self._batches()
        for x, y in batches:
            x, y = x.to(self.device), y.to(self.device)
            # The learning rate is a function of the step (IMP replaces it in its rounds): nothing to resume.
            lr = config.lr * sparsifier.lr_factor(sparsifier.count, self._base_lr_factor)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.hook_state is not None:
                self.hook_state.step = sparsifier.count  # seeds the communication hooks' stochastic rounding
            phase = sparsifier.phase
            loss, logits = self._step(x, y)  # the sparsifier's hooks run inside: a phase may end, masks change
            if sparsifier.phase != phase:
                self._phase_ended(phase)
            total_loss += float(loss) * y.numel()  # the batch's mean loss, weighted by what it averaged over
            hits, count = count_correct(logits, y)  # per sample, or per token of a language model
            correct, seen = correct + hits, seen + count
            if bar is not None:
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                                phase=sparsifier.phase, sparsity=f"{sparsifier.target_sparsity:.2f}")  # fmt: skip
        if bar is not None:
            bar.close()
        if self.world > 1:  # the epoch's training metrics over every rank's share
            totals = torch.tensor([total_loss, correct, seen], dtype=torch.float64)
            dist.all_reduce(totals)
            total_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            if config.check_masks and sparsifier.synchronize_gradients():  # (refused with fsdp)
                check_masks_consistent(sparsifier.masks)
        loss = total_loss / seen
        return {"loss": loss, "acc": 100.0 * correct / seen, "ppl": perplexity(loss), "lr": lr}

    def _step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One optimizer step on the batch; returns the loss and logits of its first forward pass.

        One path for every optimizer: the forward/backward pass (clipped, counted in training FLOPs) is a closure,
        run before a plain optimizer's step, or by the step itself for optimizers that need one (CrAM: twice).
        """
        # Parallel GaP trains replicas apart: no gradient all-reduce while its rounds last.
        apart = self.world > 1 and not self.sparsifier.synchronize_gradients()
        passes: list[tuple[Tensor, Tensor]] = []

        def forward_backward() -> Tensor:
            with self.train_model.no_sync() if apart else contextlib.nullcontext():
                loss, logits = self._forward_backward(x, y)
            if self.config.grad_clip:
                # Unscaled fp16 gradients are clipped; a closure never runs with the scaler on (set-up refuses
                # amp on cuda for it), so this unscale happens once per step.
                self.scaler.unscale_(self.optimizer)
                self._clip_gradients()
            self._count_flops(len(y), repeat=bool(passes))
            passes.append((loss.detach(), logits.detach()))  # the first pass is the clean one: the step's metrics
            return loss

        if self.uses_closure:
            self.scaler.step(self.optimizer, forward_backward)
        else:
            forward_backward()
            self.scaler.step(self.optimizer)  # skipped by the scaler on inf/NaN gradients: then no step counts
        self.scaler.update()
        return passes[0]

    def _phase_ended(self, phase: str) -> None:
        """The step just taken ended ``phase``. When it was a decompressed phase of the sparse-dense pair (AC/DC),
        its last dense weights are a candidate dense twin: chosen on the validation metric (accuracy, or perplexity
        for language modelling), never test. The dense warm-up is not a decompressed phase."""
        weights, self._dense_weights = self._dense_weights, None
        if self.fsdp and not self.is_main:
            return  # the gathered dense weights are on rank 0, which alone evaluates and keeps them
        if phase == "dense" and self.sparsifier.count > self._warmup_end():
            self._consider_dense(self.sparsifier.count, weights)

    def _keep_dense_weights(self, event: dict[str, Any]) -> None:
        # The one thing done inside optimizer.step(): the step that ends a dense phase also compresses the model
        # (the method's boundary runs in the optimizer's post-step hook), so the loop, acting after the step, would
        # only see the pruned weights. The sparsifier's phase_end event comes after the update and before the masks
        # change: copy the dense weights there; _phase_ended evaluates them after the step, in the loop.
        if event["event"] == "phase_end" and event["phase"] == "dense":
            # FSDP: gathered to rank 0 (every rank's hook takes part in the collective).
            self._dense_weights = fsdp.full_model_state(self.model) if self.fsdp else cpu_state(self.model)

    def _warmup_end(self) -> int:
        timeline = self.sparsifier.timeline()
        return timeline[0].end if timeline and timeline[0].kind == "dense" else 0

    def _consider_dense(self, step: int, weights: dict[str, Tensor]) -> None:
        if self._twin is None:
            self._twin = copy.deepcopy(self.view)  # evaluated in place of the (now pruned) model; no RNG drawn
        self._twin.load_state_dict(weights)
        val = evaluate(self._twin, self.data.val, self.config.eval_batch_size, self.device)
        key = METRICS[self.data.metric]["key"]
        log.info("dense phase ending at step %d: val %s %.2f", step, key, val[key])
        if self.best_dense is None or self._better(val[key], self.best_dense[f"val_{key}"]):
            self.best_dense = {**self._scores(val, "val"), "step": step, "epoch": step / self.steps_per_epoch,
                               "model": weights}  # fmt: skip

    def _better(self, value: float, best: float) -> bool:
        return value > best if METRICS[self.data.metric]["higher_is_better"] else value < best

    def _scores(self, result: dict[str, float], split: str) -> dict[str, float]:
        """``{split}_acc`` (top-1, per token for a language model), and ``{split}_ppl`` where perplexity is the
        dataset's metric."""
        scores = {f"{split}_acc": result["acc"]}
        if self.data.metric == "perplexity":
            scores[f"{split}_ppl"] = result["ppl"]
        return scores

    def _batches(self) -> tuple[Any, Any]:
        """This epoch's training batches of this rank (a function of seed and epoch), and the progress bar over
        them when one is shown (else None)."""
        batches = iterate_batches(self.data.train, self.batch_per_rank, shuffle=True, seed=self.config.seed,
                                  epoch=self.epoch, drop_last=True, rank=self.rank, world_size=self.world)  # fmt: skip
        if not self.progress:
            return batches, None
        from tqdm import tqdm

        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   leave=False, dynamic_ncols=True)  # fmt: skip
        return bar, bar

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Zeroed gradients, then the loss of the batch and its backward pass (scaled when fp16 amp is on)."""
        config = self.config
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=config.amp):
            logits = self.train_model(x)
            loss = batch_loss(logits, y)
        if not torch.isfinite(loss):
            saved = (
                f"the last good checkpoint is {self.out / LAST}"
                if (self.out / LAST).is_file()
                else "no epoch had finished, so no checkpoint was saved"
            )
            raise TrainingDiverged(
                f"the loss became {float(loss.detach())} at epoch {self.epoch + 1}, step {self.sparsifier.count}; "
                f"lower the learning rate (lr={config.lr}) or set grad_clip; {saved}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss, logits

    def _clip_gradients(self) -> None:
        # Clip the gradient the step applies: masked weights' gradients are zeroed first (the pre-step hook would
        # zero them after the clip, so the clip would measure a norm the step never applies). A step that reads
        # them (RigL's update) keeps them, and clips the dense gradient it reads.
        if not self.sparsifier.needs_dense_gradients():
            self.sparsifier.mask_gradients()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)

    def _base_lr_factor(self, step: int) -> float:
        # The schedules read their options from the plain form; built once, the config is frozen.
        if self._config_dict is None:
            self._config_dict = self.config.to_dict()
        return lr_factor(step, self.total_steps, self.steps_per_epoch, self._config_dict)

    def _count_flops(self, samples: int, repeat: bool = False) -> None:
        version = self.sparsifier.masks_key()
        if self._forward_flops_version != version:
            nonzeros = self._sharded_nonzeros() if self.fsdp else None
            self._forward_flops = self.flop_counter.forward(self.sparsifier.masks, nonzeros).sparse_total
            self._forward_flops_version = version
        # A step that reads the gradients of masked weights (RigL's updates, RDA before its prune) pays for the
        # dense weight gradient: the method says so, the tracker charges 2 f_S + f_D for it.
        dense_gradients = self.sparsifier.needs_dense_gradients()
        self.train_flops.add(samples, forward_flops=self._forward_flops, repeat=repeat, dense_gradients=dense_gradients)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self._setup_devices()
        torch.manual_seed(config.seed)
        self.data: Splits = load_dataset(config.dataset, data_dir=config.data_dir, val_fraction=config.val_fraction,
                                         seed=config.seed, limit_train=config.limit_train,
                                         classes=config.classes,
                                         options=config.dataset_options)  # fmt: skip
        try:
            self.spec = model_spec(config.model, self.data.input_shape, self.data.num_classes, config.model_options)
            self.model = build_model(**self.spec).to(self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if config.init_from:
            # Before the sparsifier is built: methods read the weights they start from (transfer: its zeros).
            checkpoint.init_from(self.model, self.spec, config.init_from)
        self.view = self.model  # what rank 0 evaluates and saves (FSDP: a full copy, see _gather)
        if self.fsdp:
            self._setup_fsdp()
        self.steps_per_epoch = num_batches(
            len(self.data.train), self.batch_per_rank, drop_last=True, world_size=self.world
        )
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} is larger than the training set ({len(self.data.train)} samples)"
            )
        self.total_steps = self.steps_per_epoch * config.epochs
        example = self.data.train[:1][0].to(self.device)
        self.sparsifier = create_sparsifier(self.model, config, self.steps_per_epoch, example)
        # Methods that are optimizers (rda) or wrap one (cram) supply the optimizer the run steps.
        self.optimizer = self.sparsifier.wrap_optimizer(make_optimizer(self.model, config))
        self.uses_closure = sparsetrain.Capability.CLOSURE in self.sparsifier.capabilities
        if self.uses_closure and config.amp and self.device.type == "cuda":
            raise ConfigError(
                f"method {config.method!r} steps with a closure, which fp16 gradient scaling (amp on cuda) does "
                "not support; run it without --amp"
            )
        self.sparsifier.attach(self.optimizer)
        self.sparsifier.subscribe(self._keep_dense_weights)
        self.kernels = self._sparse_kernels()
        self._setup_data_parallel()
        sample = self.data.train[:2][0].to(self.device)
        self.flop_counter = FlopCounter(self.model, sample)
        self.slim = self._slim_training(example)
        self.train_flops = TrainingFlops(self.flop_counter)
        self._forward_flops_version: Hashable = None
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp and self.device.type == "cuda")
        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.best_dense: dict[str, Any] | None = None  # {"val_acc", "val_ppl" (text), "step", "epoch", "model"}
        self._dense_weights: dict[str, Tensor] | None = None  # the weights a dense phase ended with
        self._twin: nn.Module | None = None  # holds them while they are evaluated
        self.elapsed = 0.0

    def _sparse_kernels(self) -> sparsetrain.SparseKernels | None:
        """With ``sparse_kernels: auto`` on CPU, masked Linear layers train on CSR kernels where timed faster."""
        if self.config.sparse_kernels == "off":
            return None
        if self.device.type != "cpu":
            log.info("sparse_kernels=auto: the CSR training kernels are CPU only; training dense on %s", self.device)
            return None
        try:
            return sparsetrain.SparseKernels(self.sparsifier)
        except ValueError as error:
            log.warning("sparse_kernels=auto: %s; training dense", error)
            return None

    def _slim_training(self, example: Tensor) -> SlimTraining | None:
        """With ``slim_training: auto``, a method masking whole channels (``mask_type: channel``, oto,
        variational) in a single process trains and evaluates the narrower network its masks leave."""
        if self.config.slim_training == "off":
            return None
        # A warning, not an error: the run is still valid, and the user who asked for auto sees (on stderr, at the
        # CLI's default verbosity) that it trains at full width.
        if self.sparsifier.channel_groups is None:
            log.warning("slim_training=auto has no effect: method %s with mask_type %s does not mask whole channels "
                        "(mask_type channel, oto and variational do); training at full width",
                        self.config.method, self.config.mask_type)  # fmt: skip
            return None
        if self.world > 1:
            log.warning("slim_training=auto has no effect: single-process runs only; training at full width on %d "
                        "processes", self.world)  # fmt: skip
            return None
        return SlimTraining(self.sparsifier, example)

    def _setup_devices(self) -> None:
        """The device, and the process group when launched by torchrun (or ``sparsetrain train --nproc N``)."""
        config = self.config
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA device is available; use --device cpu")
        use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        # Data-parallel: gloo on CPU, nccl on GPU.
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
        if config.batch_size % self.world:
            raise ConfigError(
                f"batch_size {config.batch_size} is the global batch and must divide evenly among "
                f"{self.world} processes"
            )
        self.batch_per_rank = config.batch_size // self.world
        if not self.resume or self.world > 1:  # an FSDP run may continue on one process, unsharded (see restore)
            fsdp.check_fsdp_world(config.to_dict(), self.world)
        # fsdp: the model is sharded over this run's processes. fsdp_checkpoints: last.pt has the FSDP form (full
        # state dicts by parameter name, one sparsifier state per saving rank), kept when the run goes on unsharded.
        self.fsdp = config.fsdp and self.world > 1
        self.fsdp_checkpoints = config.fsdp
        self._fsdp_state: dict[str, Any] = {}

    def _setup_data_parallel(self) -> None:
        """DDP around the model and the gradient communication hook, when there is more than one process."""
        config = self.config
        self.train_model: nn.Module = self.model
        self.hook_state = None
        try:
            check_hook(config.comm_hook, self.sparsifier, self._hook_options())
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.world > 1 and not self.fsdp:  # FSDP: the sharded model reduce-scatters its gradients itself
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self.hook_state = register_hook(self.train_model, config.comm_hook, sparsifier=self.sparsifier,
                                            seed=config.seed, **self._hook_options())  # fmt: skip
        elif config.comm_hook != "none":
            log.warning("comm_hook %s has no effect in a single process", config.comm_hook)

    def _setup_fsdp(self) -> None:
        """Shard the model (before the sparsifier and the optimizer are built on its parameters); rank 0 keeps a
        plain model of the same architecture to evaluate and save the gathered weights."""
        rng = torch.get_rng_state()  # the copy's own initialisation must not move rank 0's RNG
        view = build_model(**self.spec).to(self.device) if self.is_main else None
        torch.set_rng_state(rng)
        fsdp.shard_model(self.model)
        self.view = view  # type: ignore[assignment]

    def _gather(self) -> None:
        """FSDP (a collective, every rank calls it): the full weights into rank 0's plain model; the optimizer's
        full state and every rank's sparsifier state to rank 0, for last.pt. An FSDP run continued on one process
        keeps that form (its one sparsifier state holds every row). Nothing otherwise."""
        if not self.fsdp_checkpoints:
            return
        if not self.fsdp:
            self._fsdp_state = {"optimizer": fsdp.full_optimizer_state(self.model, self.optimizer),
                                "sparsifier": [self.sparsifier.state_dict()]}  # fmt: skip
            return
        weights = fsdp.full_model_state(self.model)
        self._fsdp_state = {"optimizer": fsdp.full_optimizer_state(self.model, self.optimizer),
                            "sparsifier": fsdp.gather_to_main(self.sparsifier.state_dict())}  # fmt: skip
        if self.is_main:
            self.view.load_state_dict(weights)

    def _sharded_nonzeros(self) -> dict[str, int]:
        """FSDP: every weight's nonzeros (its mask's where it has one), summed over the ranks (collective)."""
        masks = self.sparsifier.masks
        names = [n for n, p in self.model.named_parameters() if p.dim() >= 2]
        local = [int(torch.count_nonzero(masks[n] if n in masks else sharding_local(self.model.get_parameter(n))))
                 for n in names]  # fmt: skip
        return dict(zip(names, self.sparsifier.sum_over_ranks(local)))

    def _sparsity_report(self) -> Any:
        """The sparsity report of the model rank 0 holds: the sparsifier's, or under FSDP counted on the gathered
        weights (the sparsifier's own report is a collective, and only rank 0 asks)."""
        if not self.fsdp:
            return self.sparsifier.sparsity()
        weights = {n: self.view.get_parameter(n) for n in self.sparsifier.params}
        zeros = {n: int((w == 0).sum()) for n, w in weights.items()}
        total = sum(w.numel() for w in weights.values())
        return sparsetrain.SparsityReport(overall=sum(zeros.values()) / total, zeros=sum(zeros.values()), total=total,
                              layers={n: zeros[n] / weights[n].numel() for n in weights})  # fmt: skip

    def _hook_options(self) -> dict[str, Any]:
        return hook_options(self.config.comm_hook, self.config.to_dict())

    @property
    def is_main(self) -> bool:
        """Only rank 0 evaluates for the logs, writes files and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ resume
    def state(self) -> dict[str, Any]:
        # FSDP: the full weights and optimizer state, and one sparsifier state per rank (masks of its rows).
        sharded = {"fsdp_world": self.world} if self.fsdp_checkpoints else {}
        return checkpoint_payload(
            self.view,
            self.spec,
            self.config,
            kind="last",
            epoch=self.epoch,
            optimizer=self._fsdp_state["optimizer"] if self.fsdp_checkpoints else self.optimizer.state_dict(),
            sparsifier=self._fsdp_state["sparsifier"] if self.fsdp_checkpoints else self.sparsifier.state_dict(),
            **sharded,
            scaler=self.scaler.state_dict(),
            train_flops=self.train_flops.state_dict(),
            metrics=self.metrics,
            best_dense=self.best_dense,
            elapsed=self.elapsed,
            rng=torch.get_rng_state(),
        )

    def restore(self, state: dict[str, Any]) -> None:
        if self.fsdp_checkpoints:
            # Full model and optimizer state: every rank keeps its rows of them, however many ranks saved them.
            # The sparsifier's states are per saving rank: each rank assembles its rows from them (any number of
            # ranks, one process included) or the sparsifier says in one line why it cannot.
            saved, pieces = state.get("fsdp_world"), state.get("sparsifier")
            if not isinstance(pieces, list) or len(pieces) != saved:
                held = len(pieces) if isinstance(pieces, list) else "no list of"
                raise CheckpointError(
                    f"{str(self.out / LAST)!r} holds {held} per-rank sparsifier states for the {saved} processes "
                    "of an FSDP run (fsdp=true) that it says saved it; it was not written by that run"
                )
            fsdp.load_full_state(self.model, self.optimizer, dict(state["model"]), state["optimizer"])
            try:
                self.sparsifier.load_state_dicts(pieces)
            except UnsplittableState as error:
                if saved == self.world:
                    raise
                raise CheckpointError(
                    f"{str(self.out / LAST)!r} was saved by an FSDP run on {saved} processes, this run has "
                    f"{self.world}: {first_line(error)}; resume it with --nproc {saved}"
                ) from None
            if self.fsdp and self.is_main:  # a run resumed after its last epoch goes straight to finish()
                self.view.load_state_dict(state["model"])
        else:
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

    def _restore_last(self) -> None:
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

    # ------------------------------------------------------------------ outputs
    def _record_epoch(self, phase: str, train: dict[str, float], val: dict[str, float], test: dict[str, float]) -> None:
        """The epoch's metrics row: to metrics.jsonl/csv, tensorboard and the callback; then ``last.pt``."""
        row = {
            "epoch": self.epoch,
            "step": self.sparsifier.count,
            "lr": train["lr"],
            "phase": phase,
            "train_loss": train["loss"],
            **self._scores(train, "train"),
            "val_loss": val["loss"],
            **self._scores(val, "val"),
            "test_loss": test["loss"],
            **self._scores(test, "test"),
            "sparsity": self._sparsity_report().overall,
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

    def _save(self, payload: dict[str, Any], name: str) -> None:
        with writing(self.out / name):
            checkpoint.save_atomic(payload, self.out / name)

    def finish(self) -> dict[str, Any]:
        """The run's outputs after the last epoch: the sparse model, its dense counterpart, plots, summary.json."""
        pruned_after = sparsetrain.Capability.PRUNE_AFTER_TRAINING in self.sparsifier.capabilities
        trained_dense = self._prune_after_training() if pruned_after else None
        sparse_info = self._save_sparse_model()
        dense_info = self._save_dense_model(sparse_info, trained_dense)
        timeline = [{"start_epoch": p.start / self.steps_per_epoch, "end_epoch": p.end / self.steps_per_epoch,
                     "kind": p.kind} for p in self.sparsifier.timeline()]  # fmt: skip
        self._plot(timeline)
        summary = self._summary(sparse_info, dense_info, timeline)
        write_text_atomic(self.out / SUMMARY, json.dumps(summary, indent=2))
        return summary

    def _prune_after_training(self) -> dict[str, Any]:
        """For methods that train dense for later one-shot pruning (cram): the trained dense model's record and
        state; then the model pruned in place to the target and its batch-norm statistics re-estimated."""
        from ..oneshot import prune_oneshot, recalibrate_batchnorm

        config, data = self.config, self.data
        dense_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        dense_info = {
            "sparsity": weight_sparsity(dense_state, self.sparsifier.params),
            **self._scores(evaluate(self.model, data.val, config.eval_batch_size, self.device), "val"),
            **self._scores(evaluate(self.model, data.test, config.eval_batch_size, self.device), "test"),
            "epoch": self.epoch,
            "step": self.sparsifier.count,
        }
        prune_oneshot(self.model, config.target_sparsity, mask_type=config.mask_type,
                      include=list(self.sparsifier.params))  # fmt: skip
        batches = iterate_batches(data.train, config.batch_size, shuffle=True, seed=config.seed, epoch=-1)
        recalibrate_batchnorm(self.model, batches, num_samples=1000)
        return {"info": dense_info, "state": dense_state}

    def _save_sparse_model(self) -> dict[str, Any]:
        """The final model, evaluated and saved as sparse_final.pt; returns its record for the summary."""
        config, data = self.config, self.data
        val = evaluate(self.view, data.val, config.eval_batch_size, self.device)
        test = evaluate(self.view, data.test, config.eval_batch_size, self.device)
        report = self._sparsity_report()
        if self.fsdp:  # counted on rank 0's full copy: the sharded counter's counts are collectives
            forward = FlopCounter(self.view, self.data.train[:2][0].to(self.device)).forward()
        else:
            forward = self.flop_counter.forward()
        info = {
            **self._scores(val, "val"),
            **self._scores(test, "test"),
            "sparsity": report.overall,
            "layers": report.layers,
            "forward_flops": forward.sparse_total,
            "forward_flops_ratio": forward.ratio,
        }
        self._save(checkpoint_payload(self.view, self.spec, config, kind="sparse_final", metrics=info), SPARSE)
        return info

    def _save_dense_model(self, sparse: dict[str, Any], trained_dense: dict[str, Any] | None) -> dict[str, Any] | None:
        """The dense model of the pair, saved as dense_best.pt: AC/DC's best dense twin, or the dense model a
        method that prunes after training trained. A run whose final model is dense is its own dense model
        (nothing more saved); other runs have none. Returns its record for the summary."""
        if self.best_dense is not None:
            best = self.best_dense
            model = self._model_holding(best["model"])
            info = {
                "sparsity": weight_sparsity(best["model"], self.sparsifier.params),
                **{k: v for k, v in best.items() if k.startswith("val_")},
                **self._scores(evaluate(model, self.data.test, self.config.eval_batch_size, self.device), "test"),
                "epoch": best["epoch"],
                "step": best["step"],
            }
            kind = "dense_best"
        elif trained_dense is not None:
            info, model, kind = trained_dense["info"], self._model_holding(trained_dense["state"]), "dense_final"
        elif sparse["sparsity"] == 0 or sparsetrain.Capability.SPARSE not in self.sparsifier.capabilities:
            scores = {k: v for k, v in sparse.items() if k.startswith(("val_", "test_"))}
            return {"sparsity": sparse["sparsity"], **scores, "epoch": self.epoch, "step": self.sparsifier.count}
        else:
            return None
        self._save(checkpoint_payload(model, self.spec, self.config, kind=kind, metrics=info), DENSE)
        return info

    def _model_holding(self, state: dict[str, Tensor]) -> nn.Module:
        model = build_model(**self.spec).to(self.device)
        model.load_state_dict(state)
        return model

    def _plot(self, timeline: list[dict[str, Any]]) -> None:
        if not self.config.plots:
            return
        try:
            from .plots import plot_run
        except ImportError:
            log.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        else:
            plot_run(self.metrics, timeline, self.out / "training.png", title=self.config.describe())

    def _summary(
        self, sparse: dict[str, Any], dense: dict[str, Any] | None, timeline: list[dict[str, Any]]
    ) -> dict[str, Any]:
        config = self.config
        communication = None
        if self.hook_state is not None:
            stats = self.hook_state.stats
            communication = {"hook": config.comm_hook, "bits_per_coordinate": stats.bits_per_coordinate,
                             "bytes_sent_rank0": stats.bytes_sent}  # fmt: skip
        return {
            "method": config.method,
            "model": config.model,
            "dataset": config.dataset,
            "metric": self.data.metric,
            "data": self.data.info,
            "target_sparsity": config.target_sparsity,
            "mask_type": config.mask_type,
            "epochs": config.epochs,
            "seed": config.seed,
            "sparse_model": sparse,
            "dense_model": dense,
            "train_flops_ratio": self.train_flops.ratio,
            "wall_time_s": self.elapsed,
            "timeline": timeline,
            "events": [e for e in self.sparsifier.history if e["event"] in ("compress", "phase_start")],
            "processes": self.world,
            "fsdp": self.fsdp,
            "communication": communication,
            "sparse_kernels": None if self.kernels is None else self.kernels.summary(),
            "slim_training": None if self.slim is None else self.slim.summary(),
            "out": str(self.out),
            "files": sorted({*listed_files(self.out), SUMMARY}),  # summary.json is written next, with this list
        }
