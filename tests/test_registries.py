"""The registries a run is assembled from (datasets, models, LR schedules, comm hooks), tested over every entry.

A new entry is picked up here from its registration alone: its name is accepted by the config validation and
offered in the CLI's help, and it works (a model builds and runs, a schedule gives factors in range, a hook
validates its options). Then the rules that have one home: checkpoint-to-model loading, atomic text and figure
writes, DataError in the error hierarchy, comm hook options.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import pytest
import torch

from sparsetrain._registry import Registry
from sparsetrain.cli import _parser, main
from sparsetrain.distributed.hooks import HOOK_REGISTRY, check_hook, hook_options, list_comm_hooks
from sparsetrain.errors import CheckpointError, ConfigError, SparsetrainError
from sparsetrain.models import list_models
from sparsetrain.train.config import SCHEMA, defaults, validate
from sparsetrain.train.data import DataError, list_datasets
from sparsetrain.train.lr_schedules import LR_SCHEDULES, list_lr_schedules, lr_factor


def _train_help() -> str:
    sub = next(a for a in _parser()._actions if a.dest == "command")
    return sub.choices["train"].format_help()


# ---------------------------------------------------------------------------------------------------- the mechanism
def test_registry_registers_lists_and_refuses_clearly() -> None:
    things: Registry = Registry("thing")

    @things.register("b-thing")
    def b() -> None:
        """The b thing.

        More text that is not the help."""

    things.register("a-thing", help="an a")(len)
    assert things.names() == ["b-thing", "a-thing"]  # registration order
    assert things.names("a*") == ["a-thing"]
    assert things.get("b-thing") is b and things.entry("b-thing").help == "The b thing."
    assert things.help_text() == "b-thing or a-thing"
    things.register("a-thing", help="again")(len)  # the same object again: harmless
    with pytest.raises(ValueError, match="thing 'a-thing' is already registered"):
        things.register("a-thing")(print)
    with pytest.raises(ValueError, match="lower-case"):
        things.register("Big")
    with pytest.raises(ValueError, match="unknown thing 'c'; choose one of: b-thing, a-thing"):
        things.get("c")


# ---------------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_is_accepted_by_the_config_and_offered_in_the_help(name: str) -> None:
    assert validate({"dataset": name}) == {"dataset": name}
    assert name in SCHEMA["dataset"][2]
    assert name in " ".join(_train_help().split())


def test_an_unknown_dataset_is_refused_by_the_config_naming_every_choice() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"dataset": "imagenet"})
    assert all(name in str(info.value) for name in list_datasets())


def test_data_error_is_in_the_package_error_hierarchy() -> None:
    error = DataError("no data")
    assert isinstance(error, SparsetrainError) and isinstance(error, ValueError)
    assert error.exit_code == 1
    from sparsetrain import errors

    assert errors.DataError is DataError  # one class, importable from both places


def test_missing_data_is_one_error_line_with_exit_code_1(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nothing.npz"
    code = main(["train", "--dataset", "npz", "--data-dir", str(missing), "--model", "mlp", "--epochs", "1",
                 "--no-progress", "--out", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error:") and "Traceback" not in err and str(missing) in err, err


# ---------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", list_models())
def test_every_model_is_accepted_by_the_config_and_offered_in_the_help(name: str) -> None:
    assert validate({"model": name}) == {"model": name}
    assert name in " ".join(_train_help().split())


def test_an_unknown_model_is_refused_by_the_config_before_any_data_loads() -> None:
    with pytest.raises(ConfigError) as info:
        validate({"model": "vgg-42"})
    assert "unknown model 'vgg-42'" in str(info.value)
    assert all(name in str(info.value) for name in list_models())
    assert validate({"model": "torchvision:resnet18"}) == {"model": "torchvision:resnet18"}


# ---------------------------------------------------------------------------------------------------- LR schedules
@pytest.mark.parametrize("name", list_lr_schedules())
def test_every_lr_schedule_is_accepted_offered_and_stays_in_range(name: str) -> None:
    assert validate({"schedule": name}) == {"schedule": name}
    assert name in SCHEMA["schedule"][2] and name in " ".join(_train_help().split())
    config = {**defaults(), "schedule": name, "warmup_epochs": 1}
    factors = [lr_factor(step, 100, 10, config) for step in range(100)]
    assert all(0 < f <= 1 for f in factors), factors
    assert factors == [lr_factor(step, 100, 10, config) for step in range(100)]  # a pure function of time
    if LR_SCHEDULES.entry(name).meta["warmup"]:
        assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # the run's linear warm-up


def test_the_built_in_lr_schedules_by_hand() -> None:
    config = {**defaults(), "warmup_epochs": 0}
    assert list_lr_schedules()[:4] == ["cosine", "step", "onecycle", "constant"]
    cosine = {**config, "schedule": "cosine"}
    assert [lr_factor(s, 100, 10, cosine) for s in (0, 50, 75)] == pytest.approx(
        [1.0, 0.5, (1 + math.cos(0.75 * math.pi)) / 2]
    )
    step = {**config, "schedule": "step", "milestones": [0.5, 0.75], "gamma": 0.1}
    assert [lr_factor(s, 100, 10, step) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    onecycle = {**config, "schedule": "onecycle", "warmup_epochs": 5}  # its own rise: the warm-up is not used
    assert [lr_factor(s, 100, 10, onecycle) for s in (0, 15, 30)] == pytest.approx([0.04, 0.52, 1.0])
    assert lr_factor(99, 100, 10, onecycle) == pytest.approx(
        1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * 69 / 70))
    )
    assert lr_factor(5, 100, 10, {**config, "schedule": "constant", "warmup_epochs": 1}) == pytest.approx(0.6)
    assert lr_factor(50, 100, 10, {**config, "schedule": "constant"}) == 1.0


# ---------------------------------------------------------------------------------------------------- comm hooks
@pytest.mark.parametrize("name", list_comm_hooks())
def test_every_comm_hook_is_a_cli_choice_and_validates_its_config_options(name: str) -> None:
    assert name in SCHEMA["comm_hook"][2] and name in " ".join(_train_help().split())
    assert validate({"comm_hook": name}) == {"comm_hook": name}
    options = hook_options(name, defaults())
    assert set(options) == set(HOOK_REGISTRY.get(name).state.OPTIONS)
    check_hook(name, None, options)  # the defaults are valid for every hook


def test_comm_hook_options_are_checked_with_clear_errors() -> None:
    assert hook_options("qsgd", {**defaults(), "qsgd_levels": 15}) == {"levels": 15, "bucket_size": 512, "norm": "l2"}
    with pytest.raises(ValueError, match="comm hook 'qsgd' has no option bits; its options: levels, bucket_size"):
        check_hook("qsgd", None, {"bits": 4})  # was a TypeError from the state's constructor
    with pytest.raises(ValueError, match="takes no options"):
        check_hook("fp16", None, {"levels": 4})
    with pytest.raises(ValueError, match="levels must be in"):
        check_hook("qsgd", None, {"levels": 500})


# ---------------------------------------------------------------------------------------------------- checkpoints
def _checkpoint(tmp_path: Path, **changes) -> Path:
    from sparsetrain.models import build_model, model_spec
    from sparsetrain.train import checkpoint

    spec = model_spec("mlp", (4,), 3)
    data = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model_spec": spec, "config": {},
            "model": build_model(**spec).state_dict(), **changes}  # fmt: skip
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "x.pt"
    torch.save(data, path)
    return path


def test_one_checkpoint_to_model_rule_for_every_command(tmp_path: Path) -> None:
    from sparsetrain.commands.deploy import _load_model
    from sparsetrain.train.checkpoint import load, restore_model

    model = restore_model(load(_checkpoint(tmp_path)), "x.pt")
    assert model(torch.zeros(2, 4)).shape == (2, 3)
    # bench's loader: a checkpoint without a spec was a KeyError traceback.
    with pytest.raises(CheckpointError, match=r"holds no model spec; is it a sparsetrain checkpoint\?"):
        _load_model(str(_checkpoint(tmp_path, model_spec=None)))
    wrong = {"name": "mlp", "input_shape": [5], "num_classes": 3}
    with pytest.raises(CheckpointError, match=r"checkpoint '.*x.pt' does not match its model spec \(Error"):
        _load_model(str(_checkpoint(tmp_path, model_spec=wrong)))


@pytest.mark.parametrize("command", [["eval"], ["prune"], ["export", "-o", "OUT"], ["bench"]])
def test_every_command_reports_a_checkpoint_without_model_state_alike(command, tmp_path: Path, capsys) -> None:
    path = _checkpoint(tmp_path, model=None)
    args = [a.replace("OUT", str(tmp_path / "m.safetensors")) for a in command]
    code = main([args[0], str(path), *args[1:]])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "holds no model state" in err and "is it a sparsetrain checkpoint" in err, err


# ---------------------------------------------------------------------------------------------------- atomic writes
def test_text_and_figures_are_written_by_the_one_atomic_writer(tmp_path: Path) -> None:
    from sparsetrain._atomic import write_text_atomic
    from sparsetrain.train import loop

    assert loop.write_text_atomic is write_text_atomic
    summary = tmp_path / "summary.json"
    summary.write_text("old")
    os.chmod(summary, 0o640)
    write_text_atomic(summary, "{}")
    # The replaced file keeps its permissions, as checkpoints and exports do (a private temporary file did not).
    assert summary.read_text() == "{}" and stat.S_IMODE(summary.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    plots = pytest.importorskip("sparsetrain.train.plots")
    import matplotlib.pyplot as plt

    image = tmp_path / "plot.png"
    image.write_bytes(b"old")
    os.chmod(image, 0o640)
    plots.save_figure(plt.figure(), image)
    assert image.read_bytes()[:4] == b"\x89PNG" and stat.S_IMODE(image.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "summary.json"]
