"""The trainer's learning-rate schedules, registered by name: ``schedule: cosine`` in a recipe picks one here.

A schedule is a pure function of time (``step``, ``total`` steps, ``warmup`` steps and the run's config) giving
the multiplier of the peak learning rate, so a resumed run needs no scheduler state. Adding one is a decorated
function in this file::

    @register_lr_schedule("linear", help="linear decay to 0 after the warm-up")
    def _linear(step: int, total: int, warmup: int, config: Mapping[str, Any]) -> float:
        return 1.0 - (step - warmup) / max(1, total - warmup)

With ``warmup=True`` (the default) the first ``warmup_epochs`` of the run rise linearly to the peak before the
function is asked; a schedule with its own rise (``onecycle``) registers ``warmup=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._registry import Registry
from ..schedules import half_cosine

__all__ = ["LR_SCHEDULES", "list_lr_schedules", "lr_factor", "register_lr_schedule"]

# (step, total steps, warm-up steps, config) -> multiplier of the peak learning rate
LRSchedule = Callable[[int, int, int, Mapping[str, Any]], float]

LR_SCHEDULES: Registry[LRSchedule] = Registry("lr schedule")


def register_lr_schedule(
    name: str, *, warmup: bool = True, help: str | None = None
) -> Callable[[LRSchedule], LRSchedule]:
    """Decorator: register a schedule ``(step, total, warmup, config) -> factor`` under ``name``.

    ``warmup``: whether the run's linear warm-up (``warmup_epochs``) comes before it.
    """
    return LR_SCHEDULES.register(name, help=help, warmup=warmup)


def list_lr_schedules(pattern: str = "*") -> list[str]:
    """Registered schedule names matching the glob ``pattern``, in registration order."""
    return LR_SCHEDULES.names(pattern)


def lr_factor(step: int, total: int, steps_per_epoch: int, config: Mapping[str, Any]) -> float:
    """Learning-rate multiplier at ``step`` of ``total`` for ``config["schedule"]``, after its linear warm-up."""
    entry = LR_SCHEDULES.entry(config["schedule"])
    warmup = int(round(config["warmup_epochs"] * steps_per_epoch))
    if entry.meta["warmup"] and step < warmup:
        return (step + 1) / warmup
    return entry.obj(step, total, warmup, config)


@register_lr_schedule("cosine", help="cosine annealing to 0 (Loshchilov & Hutter 2017)")
def _cosine(step: int, total: int, warmup: int, config: Mapping[str, Any]) -> float:
    progress = (step - warmup) / max(1, total - warmup)
    return half_cosine(progress)


@register_lr_schedule("step", help="multiplied by gamma at each of the milestones (fractions of training)")
def _step(step: int, total: int, warmup: int, config: Mapping[str, Any]) -> float:
    return config["gamma"] ** sum(step >= m * total for m in config["milestones"])


@register_lr_schedule("onecycle", warmup=False, help="one cycle (Smith & Topin 2019): up over 30%, cosine down")
def _onecycle(step: int, total: int, warmup: int, config: Mapping[str, Any]) -> float:
    # Linear rise over the first 30% from lr/25, then cosine annealing to lr/1e4.
    peak = max(1, int(0.3 * total))
    if step < peak:
        return 1 / 25 + (1 - 1 / 25) * step / peak
    progress = (step - peak) / max(1, total - peak)
    return 1e-4 + (1 - 1e-4) * half_cosine(progress)


@register_lr_schedule("constant", help="the peak learning rate throughout")
def _constant(step: int, total: int, warmup: int, config: Mapping[str, Any]) -> float:
    return 1.0
