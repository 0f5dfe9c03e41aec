"""PNG plots of a run (accuracy, loss, sparsity, learning rate per epoch, phases shaded) and of a comparison."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from .._atomic import write_atomic  # noqa: E402
from ..errors import writing  # noqa: E402

PHASE_COLORS = {"sparse": "#f4a582", "dense": "#92c5de"}
# Methods with named phases (GaP's grow groups, IMP's rounds) take these in order of appearance.
EXTRA_COLORS = ("#b2df8a", "#cab2d6", "#fdbf6f", "#ffff99", "#fb9a99", "#a6cee3", "#e5d8bd", "#d9d9d9")


def phase_colors(timeline: Sequence[dict[str, Any]]) -> dict[str, str]:
    colors = dict(PHASE_COLORS)
    for phase in timeline:
        if phase["kind"] not in colors:
            colors[phase["kind"]] = EXTRA_COLORS[(len(colors) - 2) % len(EXTRA_COLORS)]
    return {k: v for k, v in colors.items() if any(p["kind"] == k for p in timeline)}


def _shade(ax, timeline: Sequence[dict[str, Any]]) -> None:
    # Shade only when the run alternates (a single phase carries no information).
    if len({p["kind"] for p in timeline}) < 2:
        return
    colors = phase_colors(timeline)
    for phase in timeline:
        ax.axvspan(phase["start_epoch"], phase["end_epoch"], color=colors[phase["kind"]], alpha=0.25, lw=0)


def plot_run(
    metrics: Sequence[dict[str, Any]], timeline: Sequence[dict[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """One figure, four panels; x is the epoch (end of epoch), phases of the method shaded. The first panel is
    accuracy, or perplexity (log scale) for a run whose rows report it (language modelling)."""
    epochs = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    key, label = ("ppl", "perplexity") if metrics and "val_ppl" in metrics[0] else ("acc", "accuracy (%)")
    panels = [
        (axes[0, 0], label, [(f"train_{key}", "train"), (f"val_{key}", "validation"), (f"test_{key}", "test")]),
        (axes[0, 1], "loss", [("train_loss", "train"), ("val_loss", "validation"), ("test_loss", "test")]),
        (axes[1, 0], "sparsity (measured)", [("sparsity", "sparsified weights")]),
        (axes[1, 1], "learning rate (end of epoch)", [("lr", "lr")]),
    ]
    for ax, label, series in panels:
        _shade(ax, timeline)
        for key, name in series:
            ax.plot(epochs, [m[key] for m in metrics], marker=".", label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    axes[1, 0].set_ylim(-0.02, 1.02)
    if key == "ppl":
        axes[0, 0].set_yscale("log")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    if len({p["kind"] for p in timeline}) > 1:
        colors = phase_colors(timeline)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.4) for c in colors.values()]
        fig.legend(handles, [f"{k} phase" for k in colors], loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_formats() -> list[str]:
    """The image types matplotlib can write (file name suffixes)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save and close ``fig`` atomically (a temporary file and a rename): a full disk leaves an older plot whole."""
    path = Path(path)
    image_type = path.suffix[1:].lower() or "png"
    try:
        with writing(path):
            write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=image_type))
    finally:
        plt.close(fig)
    return path


def plot_compare(points: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Test accuracy against sparsity, one line per ``label`` (a method on one task).

    Each point is ``{"label", "sparsity", "mean", "std"}``: the caller has already averaged over the seeds of one
    task, so runs of different datasets or models never share a point.
    """
    fig, ax = plt.subplots(figsize=(8, 4.8))
    lines: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        lines.setdefault(point["label"], []).append(point)
    for label, line in sorted(lines.items()):
        line = sorted(line, key=lambda p: p["sparsity"])
        ax.errorbar(
            [p["sparsity"] for p in line],
            [p["mean"] for p in line],
            yerr=[p["std"] for p in line],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
