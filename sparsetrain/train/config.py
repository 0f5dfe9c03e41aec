"""The trainer's configuration: defaults, YAML recipes (safe loader), command-line overrides, validation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..distributed.hooks import HOOK_REGISTRY, QSGD_NORMS
from ..errors import ConfigError
from ..models import MODEL_REGISTRY, check_model_name, model_options
from .data import DATASET_REGISTRY, dataset_options
from .fsdp import check_fsdp_config
from .lr_schedules import LR_SCHEDULES

# key -> (default, allowed types, one-line help). None is allowed wherever the default is None.
SCHEMA: dict[str, tuple[Any, tuple[type, ...], str]] = {
    "dataset": ("fashion-mnist", (str,), DATASET_REGISTRY.help_text()),
    "data_dir": (None, (str,), "where the dataset's files are (default: search the usual places)"),
    "val_fraction": (0.1, (float, int), "fraction of the training set held out for validation"),
    "limit_train": (None, (int,), "use only this many training samples (quick runs)"),
    "classes": (None, (str, list), "keep only these classes, relabelled 0..k-1 in order: '5-9', '0,2,4' or [5, 6]"),
    "dataset_options": ({}, (dict,), "the dataset's own options, e.g. {context: 64} for text"),
    "model": ("lenet5", (str,), ", ".join(MODEL_REGISTRY) + ", torchvision:NAME or timm:NAME"),
    "model_options": ({}, (dict,), "the model's own options, e.g. {layers: 4, width: 128} for gpt"),
    "method": ("acdc", (str,), "sparse-training method (see `sparsetrain methods`)"),
    "sparsity": (0.9, (float, int), "target sparsity in [0, 1)"),
    "distribution": (None, (str,), "global, uniform or erk (default: the method's)"),
    "mask_type": ("unstructured", (str,), "unstructured, N:M such as 2:4, or channel (whole channels)"),
    "include": (None, (list, str), "glob patterns of parameters to sparsify"),
    "exclude": (None, (list, str), "glob patterns of parameters to keep dense"),
    "method_options": ({}, (dict,), "method-specific options, e.g. {warmup: 3, unit: epochs}"),
    "init_from": (None, (str,), "start from this checkpoint's weights (same model; --method transfer keeps its zeros)"),
    "epochs": (30, (int,), "training epochs"),
    "batch_size": (128, (int,), "training batch size"),
    "eval_batch_size": (1000, (int,), "evaluation batch size"),
    "optimizer": ("sgd", (str,), "sgd, adam, adamw, or masked_sgd / masked_adamw (SGD / AdamW that mask "
                  "gradients inside their compiled update, for large models)"),
    "lr": (0.05, (float, int), "peak learning rate"),
    "momentum": (0.9, (float, int), "SGD momentum"),
    "nesterov": (True, (bool,), "Nesterov momentum for SGD"),
    "weight_decay": (5e-4, (float, int), "weight decay"),
    "schedule": ("cosine", (str,), LR_SCHEDULES.help_text()),
    "warmup_epochs": (0.0, (float, int), "linear learning-rate warm-up (not onecycle: it has its own)"),
    "milestones": ([0.5, 0.75], (list,), "step schedule: fractions of training where lr is multiplied by gamma"),
    "gamma": (0.1, (float, int), "step schedule factor"),
    "grad_clip": (None, (float, int), "clip the gradient norm to this value"),
    "amp": (False, (bool,), "mixed precision (bfloat16 autocast on CPU, float16 with a GradScaler on CUDA)"),
    "device": ("auto", (str,), "auto, cpu or cuda"),
    "seed": (0, (int,), "seed for the weights, the data split and order, and the method"),
    "threads": (None, (int,), "torch CPU threads (default: torch's choice)"),
    "sparse_kernels": ("off", (str,), "auto: masked Linear layers train on CSR kernels where timed faster (CPU); off"),
    "slim_training": ("off", (str,), "auto: channel-masked models (mask_type channel, oto, variational) train and "
                      "evaluate as the narrower network their masks leave (single process); off"),
    "out": (None, (str,), "output directory (default: runs/<method>-<model>-<dataset>-s<sparsity>-seed<seed>)"),
    "progress": (None, (bool,), "progress bar (default: when the terminal is interactive)"),
    "plots": (True, (bool,), "write training.png at the end of the run"),
    "comm_hook": ("none", (str,), "data-parallel gradient communication: " + HOOK_REGISTRY.help_text()),
    "fsdp": (False, (bool,), "shard the model with FSDP2 (fully_shard) over the --nproc / torchrun processes"),
    "qsgd_levels": (7, (int,), "QSGD levels s (7: 4-bit codes, up to 127: 8-bit codes)"),
    "qsgd_bucket": (512, (int,), "QSGD bucket size d (values sharing one norm)"),
    "qsgd_norm": ("l2", (str,), "QSGD scaling: " + " or ".join(QSGD_NORMS)),
    "check_masks": (False, (bool,), "data-parallel: check every epoch that masks are bit-identical on all ranks"),
}

CHOICES = {
    "optimizer": ("sgd", "adam", "adamw", "masked_sgd", "masked_adamw"),
    "schedule": tuple(LR_SCHEDULES),
    "device": ("auto", "cpu", "cuda"),
    "comm_hook": tuple(HOOK_REGISTRY),
    "qsgd_norm": QSGD_NORMS,
    "sparse_kernels": ("auto", "off"),
    "slim_training": ("auto", "off"),
}


def defaults() -> dict[str, Any]:
    return {key: copy.deepcopy(default) for key, (default, _, _) in SCHEMA.items()}


def _check_type(key: str, value: Any) -> Any:
    default, types, _ = SCHEMA[key]
    if value is None:
        if default is None or key in ("distribution",):
            return None
        raise ConfigError(f"option {key!r} cannot be empty (null); expected {' or '.join(t.__name__ for t in types)}")
    # bool is an int in Python; an int option must not silently take True.
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"option {key!r} expects {' or '.join(t.__name__ for t in types)}, got {value!r}")
    if not isinstance(value, types):
        raise ConfigError(
            f"option {key!r} expects {' or '.join(t.__name__ for t in types)}, got {value!r} ({type(value).__name__})"
        )
    if float in types and isinstance(value, int):
        value = float(value)
    return value


def validate(config: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(config) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"unknown option {', '.join(map(repr, unknown))}; known options: {', '.join(sorted(SCHEMA))}")
    out = {key: _check_type(key, value) for key, value in config.items()}
    try:  # unknown names fail here, before any data loads, with the registry's list of choices
        if "dataset" in out:
            DATASET_REGISTRY.entry(out["dataset"])
        if "model" in out:
            check_model_name(out["model"])
            model_options(out["model"], out.get("model_options"))
        if "dataset" in out:
            dataset_options(out["dataset"], out.get("dataset_options"))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for key, choices in CHOICES.items():
        if key in out and out[key] not in choices:
            raise ConfigError(f"option {key!r} must be one of {', '.join(choices)}; got {out[key]!r}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if key in out and out[key] <= 0:
            raise ConfigError(f"option {key!r} must be a positive integer, got {out[key]!r}")
    if "val_fraction" in out and not 0 <= out["val_fraction"] < 1:
        raise ConfigError(f"option 'val_fraction' must be in [0, 1), got {out['val_fraction']!r}")
    if "lr" in out and out["lr"] <= 0:
        raise ConfigError(f"option 'lr' must be positive, got {out['lr']!r}")
    # None means "default" for these two; 0 or a negative count is a mistake, not a default.
    for key, meaning in (("threads", "torch CPU threads"), ("limit_train", "training samples")):
        if out.get(key) is not None and out[key] < 1:
            raise ConfigError(f"option {key!r} is a number of {meaning} and must be at least 1, got {out[key]!r}")
    if out.get("classes") is not None:
        from .data import parse_classes

        try:
            parse_classes(out["classes"])
        except ValueError as error:
            raise ConfigError(str(error)) from None
    if "milestones" in out:
        numbers = all(isinstance(m, (int, float)) and not isinstance(m, bool) for m in out["milestones"])
        if not numbers or not all(0 <= m <= 1 for m in out["milestones"]):
            raise ConfigError(
                "option 'milestones' takes fractions of training in [0, 1] such as [0.5, 0.75]; "
                f"got {out['milestones']!r}"
            )
    if out.get("slim_training") == "auto" and out.get("sparse_kernels") == "auto":
        raise ConfigError(
            "options slim_training=auto and sparse_kernels=auto cannot be combined (slim training runs channel-masked "
            "models narrower; sparse kernels run unstructured-masked Linear layers on CSR): set one of them to off"
        )
    _check_method_options(out)
    check_fsdp_config({**defaults(), **out})
    return out


def _check_method_options(out: dict[str, Any]) -> None:
    """The method name, sparsity, mask type and distribution: checked here, before any data loads."""
    import sparsetrain

    from ..distributions import check_distribution
    from ..maskops import check_sparsity, parse_nm

    if "method" in out and out["method"] not in sparsetrain.list_methods():
        raise ConfigError(f"unknown method {out['method']!r}; available: {', '.join(sparsetrain.list_methods())}")
    try:
        if "sparsity" in out:
            check_sparsity(out["sparsity"])
        nm = parse_nm(out["mask_type"]) if out.get("mask_type", "channel") != "channel" else None
        if out.get("distribution") is not None:
            check_distribution(out["distribution"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    channel_flag = sparsetrain.Capability.CHANNEL
    if out.get("mask_type") == "channel" and "method" in out:
        if channel_flag not in sparsetrain.get_method(out["method"]).capabilities:
            able = [n for n in sparsetrain.list_methods() if channel_flag in sparsetrain.get_method(n).capabilities]
            raise ConfigError(
                f"method {out['method']!r} does not support channel masks (mask_type 'channel'); methods that do: "
                f"{', '.join(able)}"
            )
    nm_flag = sparsetrain.Capability.NM
    if nm is not None and "method" in out and nm_flag not in sparsetrain.get_method(out["method"]).capabilities:
        able = [name for name in sparsetrain.list_methods() if nm_flag in sparsetrain.get_method(name).capabilities]
        raise ConfigError(
            f"method {out['method']!r} does not support N:M masks (mask_type {out['mask_type']!r}); "
            f"methods that do: {', '.join(able)}"
        )


# YAML 1.2 numbers. PyYAML follows YAML 1.1, where a float needs a dot (``1e-6`` would be a string) and
# ``2:4`` is a base-60 integer (124): both bite recipes (``lam: 1e-6``, ``mask_type: 2:4``).
_BOOL = r"^(?:true|True|TRUE|false|False|FALSE)$"
_INT = r"^[-+]?(?:0|[1-9][0-9_]*)$|^0x[0-9a-fA-F_]+$|^0o[0-7_]+$"
_FLOAT = (
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 numbers and booleans: ``1e-5`` is a float, ``2:4`` a string, and only
    true/false are booleans (YAML 1.1 also reads yes/no/on/off as booleans, which would turn the option value
    ``sparse_kernels: off`` into ``False``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    redefined = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in redefined]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_INT), list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(_BOOL), list("tTfF"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader subclass: no arbitrary objects


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe with the safe loader and validate its keys and types."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; recipes ship in the recipes/ folder")
    try:
        data = yaml_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {error}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of option: value, got {type(data).__name__}")
    try:
        return validate(data)
    except ConfigError as error:
        raise ConfigError(f"recipe {str(path)!r}: {error}") from None


# Options that are dicts of their own, set one entry at a time with ``--set GROUP.KEY=VALUE``.
_NESTED = ("method_options.", "model_options.", "dataset_options.")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (so 0.9 is a float, [a, b] a list, true a bool)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if key.startswith(_NESTED):
        return key, value
    if key not in SCHEMA:
        raise ConfigError(f"unknown option {key!r} in --set; known options: {', '.join(sorted(SCHEMA))}")
    return key, value


def resolve(recipe: dict[str, Any] | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """defaults <- recipe <- overrides; ``method_options.X`` overrides merge into method_options (and so for
    ``model_options.X`` and ``dataset_options.X``)."""
    config = defaults()
    config.update(recipe or {})
    nested = {prefix[:-1]: dict(config.get(prefix[:-1]) or {}) for prefix in _NESTED}
    for key, value in overrides.items():
        if key.startswith(_NESTED):
            group, option = key.split(".", 1)
            nested[group][option] = value
        elif key in nested:
            nested[key].update(value or {})
        else:
            config[key] = value
    config.update(nested)
    config = validate(config)
    _fix_nm_sparsity(config, recipe or {}, overrides)
    return config


def _fix_nm_sparsity(config: dict[str, Any], recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    """An N:M mask type fixes the sparsity at 1 - N/M: a sparsity given beside it must agree (as in the library
    and ``sparsetrain prune``); the config then records the sparsity really trained at."""
    from ..maskops import nm_sparsity, parse_nm

    nm = None if config["mask_type"] == "channel" else parse_nm(config["mask_type"])
    if nm is None:
        return
    implied = nm_sparsity(config["mask_type"])
    # A sparsity is given beside the mask type when the same level (or a higher one) sets it: a recipe's
    # sparsity does not bind a mask type chosen on the command line.
    given = "sparsity" in overrides or ("sparsity" in recipe and "mask_type" not in overrides)
    if given and abs(config["sparsity"] - implied) > 1e-9:
        raise ConfigError(
            f"mask_type {config['mask_type']} fixes the sparsity at {implied:g}, but sparsity {config['sparsity']:g} "
            "was given too; leave the sparsity out or make it agree"
        )
    config["sparsity"] = implied


def default_out_dir(config: Mapping[str, Any]) -> str:
    return f"runs/{config['method']}-{config['model']}-{config['dataset']}-s{config['sparsity']:g}-seed{config['seed']}"


def describe(config: Mapping[str, Any]) -> str:
    """One line naming the run: method and target, model, dataset, epochs."""
    target = config["mask_type"] if config["mask_type"] != "unstructured" else f"{config['sparsity']:g}"
    return f"{config['method']} {target} - {config['model']} on {config['dataset']} - {config['epochs']} epochs"


@dataclass(frozen=True)
class TrainConfig:
    """A validated run configuration: one typed field per option of :data:`SCHEMA` (same names, same order).

    Built once from the YAML/recipe form with :meth:`from_dict`; :meth:`to_dict` gives that form back, the one
    ``config.yaml`` and checkpoints store, so saved files keep their format and old checkpoints still load.
    """

    dataset: str
    data_dir: str | None
    val_fraction: float
    limit_train: int | None
    classes: list[int] | str | None
    dataset_options: dict[str, Any]
    model: str
    model_options: dict[str, Any]
    method: str
    sparsity: float
    distribution: str | None
    mask_type: str
    include: list[str] | str | None
    exclude: list[str] | str | None
    method_options: dict[str, Any]
    init_from: str | None
    epochs: int
    batch_size: int
    eval_batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    warmup_epochs: float
    milestones: list[float]
    gamma: float
    grad_clip: float | None
    amp: bool
    device: str
    seed: int
    threads: int | None
    sparse_kernels: str
    slim_training: str
    out: str | None
    progress: bool | None
    plots: bool
    comm_hook: str
    fsdp: bool
    qsgd_levels: int
    qsgd_bucket: int
    qsgd_norm: str
    check_masks: bool

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> TrainConfig:
        """Validate ``config`` (option: value, as in a recipe or a checkpoint) and build the typed config.

        Options it leaves out take their defaults (a checkpoint written before an option existed still loads);
        an unknown option, a wrong type or a value out of range raises :class:`~sparsetrain.errors.ConfigError`.
        """
        return cls(**validate({**defaults(), **config}))

    def to_dict(self) -> dict[str, Any]:
        """The plain option: value form, in :data:`SCHEMA` order (what ``config.yaml`` and checkpoints hold)."""
        return {key: copy.deepcopy(getattr(self, key)) for key in SCHEMA}

    def describe(self) -> str:
        return describe(self.to_dict())

    @property
    def target_sparsity(self) -> float | None:
        """The sparsity to reach, or None when an N:M mask type fixes it instead."""
        return self.sparsity if self.mask_type in ("unstructured", "channel") else None


def as_train_config(config: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    """``config`` itself, or the typed config built from its dict form."""
    return config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
