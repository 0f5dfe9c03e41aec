"""The reference trainer's structure: a typed config, no evaluation inside optimizer.step(), one summary write,
and commands that read checkpoints without importing the training loop."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from sparsetrain.errors import ConfigError
from sparsetrain.train import loop
from sparsetrain.train.config import SCHEMA, TrainConfig, defaults, resolve

ACDC_STEPS = {"unit": "steps", "warmup": 6, "compressed": 6, "decompressed": 6, "final": 8}


def _config(tmp_path, method: str = "acdc", **overrides) -> dict:
    settings = dict(dataset="digits", model="mlp", method=method, sparsity=0.9, epochs=2, batch_size=64, threads=1,
                    progress=False, out=str(tmp_path / method))  # fmt: skip
    return resolve(None, {**settings, **overrides})


# ---------------------------------------------------------------------------------------------------- config
def test_train_config_has_one_field_per_option_in_schema_order() -> None:
    assert [f.name for f in dataclasses.fields(TrainConfig)] == list(SCHEMA)


def test_train_config_round_trips_the_dict_form(tmp_path) -> None:
    config = _config(tmp_path, method_options=ACDC_STEPS)
    typed = TrainConfig.from_dict(config)
    assert typed.to_dict() == config and list(typed.to_dict()) == list(SCHEMA)
    assert typed.method_options == ACDC_STEPS and typed.epochs == 2 and typed.sparsity == 0.9
    typed.to_dict()["method_options"]["warmup"] = 99  # the dict form is a copy
    assert typed.method_options["warmup"] == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.epochs = 3  # type: ignore[misc]


def test_train_config_fills_options_an_old_checkpoint_lacks_and_rejects_unknown_ones() -> None:
    old = {k: v for k, v in defaults().items() if k not in ("check_masks", "qsgd_norm")}
    typed = TrainConfig.from_dict(old)
    assert typed.check_masks is False and typed.qsgd_norm == "l2"
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        TrainConfig.from_dict({**old, "colour": "red"})
    with pytest.raises(ConfigError, match="'epochs' must be a positive integer"):
        TrainConfig.from_dict({**old, "epochs": 0})


# ---------------------------------------------------------------------------------------------------- the loop
def test_dense_twin_is_evaluated_after_the_step_not_inside_it(tmp_path, monkeypatch) -> None:
    """AC/DC's dense twin: its weights are those the decompressed phase ended with (before the compression the
    same step applies), and no evaluation runs inside optimizer.step()."""
    inside_step, evaluated_inside, phase_end_weights = [False], [], {}
    real_evaluate = loop.evaluate

    def spy(*args, **kwargs):
        evaluated_inside.append(inside_step[0])
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)

    class Watched(loop.Run):
        def setup(self) -> None:
            super().setup()
            self.optimizer.register_step_pre_hook(lambda *_: inside_step.__setitem__(0, True))
            # Registered after the sparsifier's own hooks: runs after its boundary, so the flag covers it.
            self.optimizer.register_step_post_hook(lambda *_: inside_step.__setitem__(0, False))

            def record(event) -> None:
                if event["event"] == "phase_end" and event["phase"] == "dense":
                    phase_end_weights[event["step"]] = {k: v.clone() for k, v in self.model.state_dict().items()}

            self.sparsifier.subscribe(record)

    run = Watched(_config(tmp_path, method_options=ACDC_STEPS))
    summary = run.run()
    assert evaluated_inside and not any(evaluated_inside)
    best = run.best_dense
    warmup_end = ACDC_STEPS["warmup"]
    assert best is not None and best["step"] > warmup_end and best["step"] in phase_end_weights
    assert len([step for step in phase_end_weights if step > warmup_end]) >= 2  # a choice among several twins
    assert all(torch.equal(best["model"][k], v) for k, v in phase_end_weights[best["step"]].items())
    assert summary["dense_model"]["sparsity"] < 0.5 and summary["sparse_model"]["sparsity"] == pytest.approx(0.9)


def test_summary_is_written_once_and_lists_itself(tmp_path, monkeypatch) -> None:
    writes = []
    real_write = loop.write_text_atomic

    def spy(path, text):
        writes.append(path.name)
        real_write(path, text)

    monkeypatch.setattr(loop, "write_text_atomic", spy)
    run = loop.Run(TrainConfig.from_dict(_config(tmp_path, "static", epochs=1, plots=False)))
    summary = run.run()
    assert writes.count("summary.json") == 1
    assert summary["files"] == sorted(p.name for p in run.out.iterdir() if not p.name.startswith("."))
    assert "summary.json" in summary["files"]
    assert json.loads((run.out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    saved = torch.load(run.out / "sparse_final.pt", weights_only=True)["config"]
    assert isinstance(saved, dict) and saved == run.config.to_dict()  # checkpoints keep the plain dict form


# ---------------------------------------------------------------------------------------------------- commands
def test_eval_and_prune_do_not_import_the_training_loop(tmp_path) -> None:
    from sparsetrain.train import checkpoint
    from sparsetrain.train.evaluation import checkpoint_payload
    from sparsetrain.train.models import build_model, model_spec

    spec = model_spec("mlp", (1, 8, 8), 10)
    torch.manual_seed(0)
    path = tmp_path / "run" / "sparse_final.pt"
    config = {**defaults(), "dataset": "digits", "model": "mlp"}
    checkpoint.save_atomic(checkpoint_payload(build_model(**spec), spec, config, kind="sparse_final"), path)
    script = (
        "import sys\n"
        "from sparsetrain.cli import main\n"
        f"assert main(['eval', {str(path)!r}]) == 0\n"
        f"assert main(['prune', {str(path)!r}, '--sparsity', '0.5', '--out-dir', {str(tmp_path / 'pruned')!r}]) == 0\n"
        "assert 'sparsetrain.train.loop' not in sys.modules, 'the training loop was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test accuracy" in done.stdout


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizer_takes_the_multi_tensor_step_with_the_loops_results(name) -> None:
    # foreach: a few passes over all parameters instead of a Python loop of temporaries (the CPU default), with
    # the same weights bit for bit, so runs reproduce the ones made before.
    config = {"optimizer": name, "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    optimizer = loop.make_optimizer(model, config)
    assert all(group["foreach"] for group in optimizer.param_groups)
    assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-3, 0.0]  # biases, norms: no decay
    ref_optimizer = loop.make_optimizer(reference, config)
    for group in ref_optimizer.param_groups:
        group["foreach"] = False
    for step in range(5):
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, optimizer), (reference, ref_optimizer)):
            opt.zero_grad()
            m(x).square().mean().backward()
            for group in opt.param_groups:
                group["lr"] = 0.1 / (step + 1)  # a schedule, as the trainer's
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_masked_sgd_trains_the_run_with_the_masks_inside_its_update(tmp_path) -> None:
    """optimizer=masked_sgd: the trainer's sparsifier hands the optimizer its masks, skips the re-zeroing after
    every step but the first of each mask, and the run ends at exactly the asked sparsity."""
    run = loop.Run(TrainConfig.from_dict(_config(tmp_path, "gmp", optimizer="masked_sgd", plots=False)))
    summary = run.run()
    assert type(run.optimizer).__name__ == "MaskedSGD"
    assert run.sparsifier._masks_handed_to is run.optimizer
    assert run.sparsifier.enforcement["skipped"] > run.sparsifier.enforcement["rezeroed"]
    assert summary["sparse_model"]["sparsity"] == pytest.approx(0.9)
