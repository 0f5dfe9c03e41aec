"""The CLI under faults and misuse: OS write failures, runs stopped before their first checkpoint, checkpoints and
summaries of the wrong kind, bad options caught before any work, and `compare` across different tasks.

Most tests call ``sparsetrain.cli.main`` in this process (no interpreter start-up); the run stopped before its
first checkpoint is a real subprocess, signalled for real. Data: scikit-learn's bundled digits (no download).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsetrain.cli import main

pytest.importorskip("sklearn")

# A tiny finished run: 2 epochs of GMP on digits, an MLP, 25 steps per epoch.
TINY = ["--dataset", "digits", "--model", "mlp", "--method", "gmp", "--epochs", "2", "--batch-size", "64",
        "--no-progress", "--set", "plots=false", "--threads", "1"]  # fmt: skip


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, *words: str) -> None:
    assert err.startswith("error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "gmp"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize(
    "args, words",
    [
        (["--threads", "-1"], ["threads", "-1", "at least 1"]),
        (["--threads", "0"], ["threads", "0", "at least 1"]),
        (["--limit-train", "0"], ["limit_train", "0"]),
        (["--set", "milestones=[a, 0.5]"], ["milestones", "'a'"]),
        (["--set", "milestones=[30, 60]"], ["milestones", "[0, 1]"]),
        (["--method", "magic"], ["magic", "acdc"]),
        (["--sparsity", "1.5"], ["1.5", "[0, 1)"]),
        (["--mask-type", "2:4", "--sparsity", "0.9"], ["2:4", "0.5", "0.9"]),
        (["--mask-type", "2of4"], ["2of4", "N:M"]),
        (["--mask-type", "2:4", "--method", "gmp"], ["gmp", "N:M", "acdc"]),
        (["--set", "distribution=wide"], ["wide", "erk"]),
    ],
)
def test_bad_options_fail_before_the_banner(capsys, tmp_path, args, words):
    code, out, err = run_cli(capsys, "train", *args, "--out", str(tmp_path / "o"))
    assert code == 2
    assert out == "", "the banner printed (the run started) before the options were checked"
    assert_one_error(err, *words)
    assert not (tmp_path / "o").exists()


def test_nm_mask_type_sets_the_sparsity_it_trains_at():
    from sparsetrain.cli import DEFAULT_RECIPE
    from sparsetrain.train.config import load_recipe, resolve

    # The default recipe says sparsity 0.9; a mask type chosen on the command line replaces it, and says so.
    assert resolve(load_recipe(DEFAULT_RECIPE), {"mask_type": "2:4"})["sparsity"] == 0.5
    assert resolve(None, {"mask_type": "2:4", "sparsity": 0.5})["sparsity"] == 0.5


# ---------------------------------------------------------------------------------------------------- item 8
def test_out_naming_a_file_is_a_usage_error(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, out, err = run_cli(capsys, "train", *TINY, "--out", str(afile))
    assert code == 2 and out == ""
    assert_one_error(err, str(afile), "is a file, not a folder")
    code, out, err = run_cli(capsys, "train", *TINY, "--out", str(afile / "sub"))
    assert code == 2 and out == ""
    assert_one_error(err, "inside", "is a file")
    assert afile.read_text() == "mine"


def test_resume_refuses_checkpoints_that_are_not_a_run_in_progress(capsys, tmp_path, finished_run):
    empty, other_kind, no_config = (tmp_path / name for name in ("empty", "other_kind", "no_config"))
    for folder in (empty, other_kind, no_config):
        folder.mkdir()
    (empty / "last.pt").write_bytes(b"")
    shutil.copy(finished_run / "sparse_final.pt", other_kind / "last.pt")
    state = torch.load(finished_run / "last.pt", weights_only=True)
    state["config"] = None
    torch.save(state, no_config / "last.pt")
    for folder, words in (
        (empty, ["empty"]),
        (other_kind, ["sparse_final", "not the state of a run in progress", "optimizer"]),
        (no_config, ["no run config"]),
    ):
        code, _, err = run_cli(capsys, "train", "--resume", str(folder))
        assert code == 1
        assert_one_error(err, str(folder / "last.pt"), *words)
    code, _, err = run_cli(capsys, "eval", str(no_config / "last.pt"))
    assert code == 1
    assert_one_error(err, "holds no config", "is it a sparsetrain checkpoint")


def test_compare_skips_a_foreign_summary_with_a_warning(capsys, tmp_path, finished_run):
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "mine")
    (runs / "foreign").mkdir()
    (runs / "foreign" / "summary.json").write_text(json.dumps({"accuracy": 0.9, "model": "bert"}))
    (runs / "broken").mkdir()
    (runs / "broken" / "summary.json").write_text("{not json")
    code, out, err = run_cli(capsys, "compare", str(runs), "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipping") for w in warnings), err
    assert str(runs / "foreign" / "summary.json") in err and str(runs / "broken" / "summary.json") in err
    assert "gmp" in out and (tmp_path / "c.png").is_file()
    code, _, err = run_cli(capsys, "compare", str(runs / "foreign"))
    assert code == 2 and "nothing to compare" in err


# ---------------------------------------------------------------------------------------------------- item 5
def test_unwritable_out_ends_in_one_line(capsys, tmp_path):
    target = Path("/sys/sparsetrain-test/run")  # sysfs: no one may create folders there, root included
    try:
        target.mkdir(parents=True)
    except OSError:
        pass
    else:
        shutil.rmtree(target.parent)
        pytest.skip("/sys is writable here")
    code, out, err = run_cli(capsys, "train", *TINY, "--out", str(target))
    assert code == 1 and out == ""
    assert_one_error(err, "could not write", str(target), "nothing was overwritten")


def test_a_failing_fsync_is_a_write_error(capsys, tmp_path, finished_run, monkeypatch):
    """Where no small file system can be mounted: ENOSPC raised by the last write step of the atomic writers."""
    import errno

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    old = tmp_path / "pruned_s0.5.pt"
    old.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "prune", str(finished_run), "--sparsity", "0.5", "--calibrate", "0",
                           "--out-dir", str(tmp_path), "--force")  # fmt: skip
    assert code == 1
    assert_one_error(err.splitlines()[-1], "could not write", str(old), "no space left", "nothing was overwritten")
    assert old.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned_s0.5.pt"]  # no temporary file left


@pytest.fixture()
def full_disk(tmp_path):
    """A real, nearly full file system (a 320 KiB tmpfs); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave: int) -> None:
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def test_full_disk_ends_in_one_line_and_overwrites_nothing(capsys, full_disk, finished_run):
    old_plot, old_pruned = full_disk / "compare.png", full_disk / "pruned" / "pruned_s0.5.pt"
    old_pruned.parent.mkdir()
    old_plot.write_bytes(b"old plot")
    old_pruned.write_bytes(b"old model")
    fill(full_disk, leave=16 * 1024)  # room for a config and metrics, not for a checkpoint, export or plot
    commands = {
        "train": ["train", *TINY, "--out", str(full_disk / "run")],
        "export": ["export", str(finished_run), "-o", str(full_disk / "model.safetensors")],
        "prune": ["prune", str(finished_run), "--sparsity", "0.5", "--calibrate", "0", "--out-dir",
                  str(old_pruned.parent), "--force"],
        "compare": ["compare", str(finished_run), "--plot", str(old_plot)],
    }  # fmt: skip
    written = {"train": full_disk / "run" / "last.pt", "export": full_disk / "model.safetensors",
               "prune": old_pruned, "compare": old_plot}  # fmt: skip
    for name, args in commands.items():
        code, _, err = run_cli(capsys, *args)
        assert code == 1, (name, err)
        assert_one_error(err, "could not write", str(written[name]), "nothing was overwritten")
    assert old_plot.read_bytes() == b"old plot" and old_pruned.read_bytes() == b"old model"
    assert not (full_disk / "model.safetensors").exists() and not (full_disk / "run" / "last.pt").exists()
    assert not [p for p in full_disk.rglob("*.tmp")], "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------------- item 6
def test_run_stopped_before_its_first_checkpoint_can_be_reused(capsys, tmp_path):
    """Ctrl-C in the first epoch (a real process, a real SIGINT): the advice is true, and the folder is usable again
    both ways. A SIGKILL there leaves the same folder (only config.yaml, maybe a temporary file, simulated here)."""
    out = tmp_path / "run"
    # One long first epoch (one sample per step), so the signal surely lands before the first checkpoint.
    slow = ["--dataset", "digits", "--model", "mlp", "--method", "gmp", "--epochs", "2", "--batch-size", "1",
            "--limit-train", "1500", "--threads", "1", "--no-progress", "--set", "plots=false"]  # fmt: skip
    # A test runner started in the background by a non-interactive shell ignores SIGINT, and a child inherits that
    # disposition (Python then installs no KeyboardInterrupt handler): give the child the default one, as a
    # terminal's Ctrl-C finds it.
    process = subprocess.Popen(
        [sys.executable, "-m", "sparsetrain", "train", *slow, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "config.yaml").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert not (out / "last.pt").exists(), "the first epoch finished before the signal: the test proves nothing"
    assert process.returncode == 130 and "Traceback" not in err
    assert "nothing was saved" in err and "is saved" not in err, err
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"half")  # what a kill inside a checkpoint write leaves
    again = tmp_path / "again"
    shutil.copytree(out, again)

    # --resume has no epoch to continue from: it starts the saved config from the beginning, and says so.
    code, stdout, err = run_cli(capsys, "train", "--resume", str(out))
    assert code == 0, err
    assert "started again from the beginning" in stdout
    # The same command again (here a shorter one) reuses the folder.
    code, stdout, err = run_cli(capsys, "train", *TINY, "--out", str(again))
    assert code == 0, err
    for folder in (out, again):
        assert (folder / "last.pt").is_file() and (folder / "summary.json").is_file()
        assert len((folder / "metrics.jsonl").read_text().splitlines()) == 2
        assert not list(folder.glob(".*.tmp"))


def test_resume_removes_stale_temporary_files(capsys, tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (run / ".summary.json.xyz.tmp").write_text("{")
    code, stdout, err = run_cli(capsys, "train", "--resume", str(run))
    assert code == 0, err
    assert "(resumed)" in stdout
    assert not list(run.glob(".*.tmp"))


def test_nan_in_the_first_epoch_does_not_promise_a_checkpoint(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--lr", "1e9", "--out", str(tmp_path / "run"))
    assert code == 1
    assert_one_error(err, "loss became", "no checkpoint was saved")
    assert "last good checkpoint" not in err


# ---------------------------------------------------------------------------------------------------- item 16
def _fake_run(root: Path, name: str, *, dataset: str, model: str, acc: float, seed: int, sparsity: float = 0.9,
              method: str = "acdc", epochs: int = 10, lr: float = 0.1) -> None:  # fmt: skip
    folder = root / name
    folder.mkdir(parents=True)
    summary = {"method": method, "model": model, "dataset": dataset, "epochs": epochs, "seed": seed,
               "mask_type": "unstructured", "target_sparsity": sparsity,
               "sparse_model": {"sparsity": sparsity, "test_acc": acc}, "dense_model": None,
               "train_flops_ratio": 0.5, "wall_time_s": 10.0}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    config = {"dataset": dataset, "model": model, "method": method, "epochs": epochs, "seed": seed,
              "sparsity": sparsity, "lr": lr, "out": str(folder), "threads": 2}  # fmt: skip
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def test_compare_never_pools_different_tasks(capsys, tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "mnist-s0", dataset="mnist", model="mlp", acc=98.0, seed=0)
    _fake_run(runs, "mnist-s1", dataset="mnist", model="mlp", acc=98.2, seed=1)
    _fake_run(runs, "cifar-s0", dataset="cifar10", model="resnet20", acc=38.1, seed=0)
    _fake_run(runs, "mnist-lr", dataset="mnist", model="mlp", acc=90.0, seed=0, lr=0.5)  # another recipe
    code, out, err = run_cli(capsys, "compare", str(runs), "--plot", str(tmp_path / "c.png"))
    assert code == 0, err
    rows = [line for line in out.splitlines() if " acdc " in line]
    assert len(rows) == 3, out
    by_task = {row.split("  ")[0]: row for row in rows}
    mnist = next(row for task, row in by_task.items() if "mlp on mnist" in task and "lr=0.1" in task)
    assert "0.900   2  98.10 +- 0.14" in mnist  # sparsity, n = 2 seeds, their mean and spread
    assert any("resnet20 on cifar10" in task and "38.10" in row for task, row in by_task.items())
    assert "68." not in out  # the pooled mean of MNIST and CIFAR-10 never appears
    assert (tmp_path / "c.png").is_file()


def test_group_runs_averages_over_seeds_only():
    from sparsetrain.cli import group_runs

    def run(task: dict, acc: float, seed: int, method: str = "acdc", sparsity: float = 0.9) -> dict:
        return {"task": json.dumps(task, sort_keys=True), "side": "{}", "method": method, "sparsity": sparsity,
                "test_acc": acc, "dense_acc": None, "flops": 0.5, "time": 1.0, "seed": seed}  # fmt: skip

    a = {"dataset": "mnist", "model": "mlp", "epochs": 10}
    b = {"dataset": "cifar10", "model": "resnet20", "epochs": 10}
    rows = group_runs([run(a, 98.0, 0), run(a, 98.2, 1), run(b, 38.1, 0), run(a, 97.0, 0, sparsity=0.95),
                       run(a, 99.0, 0, method="dense", sparsity=0.0)])  # fmt: skip
    summary = {(r["task"], r["line"], r["sparsity"]): (r["n"], round(r["mean"], 2)) for r in rows}
    assert summary == {
        ("mlp on mnist, 10 epochs", "acdc", 0.9): (2, 98.1),
        ("mlp on mnist, 10 epochs", "acdc", 0.95): (1, 97.0),
        ("mlp on mnist, 10 epochs", "dense", 0.0): (1, 99.0),
        ("resnet20 on cifar10, 10 epochs", "acdc", 0.9): (1, 38.1),
    }
    # One legend entry per (task, method).
    assert len({r["label"] for r in rows}) == 3
