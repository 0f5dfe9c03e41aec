"""A run's folder: the names of its files, what a folder holds (a run to resume, one that never started, something
else), and the writers of its config, metrics and text files. The CLI reads folders through these without
importing the training loop."""

from __future__ import annotations

import copy
import csv
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic

# The run's files; everything a resume needs is in last.pt.
LAST, SPARSE, DENSE = "last.pt", "sparse_final.pt", "dense_best.pt"
SUMMARY = "summary.json"
# What a run writes before its first checkpoint: a folder holding only these stopped in its first epoch.
EARLY_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "tensorboard")
# What a resume reads from last.pt.
RESUME_KEYS = ("model", "model_spec", "config", "epoch", "optimizer", "sparsifier", "train_flops", "metrics",
               "best_dense", "elapsed", "rng")  # fmt: skip


def write_config(config: Mapping[str, Any], path: Path) -> None:
    import yaml

    write_text_atomic(path, yaml.safe_dump(copy.deepcopy(dict(config)), sort_keys=True))


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


def listed_files(out: Path) -> list[str]:
    """The run's files as a summary lists them (temporary and hidden files left out)."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith("."))


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
