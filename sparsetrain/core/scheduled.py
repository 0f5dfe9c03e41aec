"""A method as a (schedule, score) pair: prune by the score to the schedule's sparsity at its update steps."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ..schedules import Phase, Schedule
from .sparsifier import Sparsifier


class ScheduledPruning(Sparsifier):
    """Pruning on a :class:`~sparsetrain.schedules.Schedule` by a score: the method is the pair.

    A subclass returns its schedule from ``make_schedule`` (called once, in ``setup``) and names its score
    (``score``: 'magnitude', 'random' or 'gradient', see :meth:`Sparsifier.scores`). Everything time-dependent
    derives from that one schedule object: ``target_sparsity_at``, ``phase_at``, ``timeline`` and the steps
    ``on_step`` acts at, so they cannot disagree. At an update step the masks become the top-k of the score at
    the schedule's sparsity (under the distribution and mask type), among the surviving weights with
    ``keep_pruned``. Methods with side effects at an update (AC/DC's compress/decompress, IMP's rewinding)
    override ``update_masks``; methods with their own mask rule (GaP) override ``on_step``.
    """

    score: ClassVar[str] = "magnitude"
    # Pruned weights stay pruned: each update ranks only the surviving weights (gradual and iterative pruning).
    keep_pruned: ClassVar[bool] = False
    # The mask_update event's reason; {sparsity} is the schedule's sparsity at the update.
    reason: ClassVar[str] = "{sparsity:.4f}"
    schedule: Schedule

    def make_schedule(self) -> Schedule:
        """The method's schedule, in steps (options are converted with ``self.steps``)."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement make_schedule()")

    def setup(self) -> None:
        if self.score not in self.SCORES:
            raise ValueError(
                f"{type(self).__qualname__}.score must be one of {', '.join(self.SCORES)}; got {self.score!r}"
            )
        self.schedule = self.make_schedule()

    def target_sparsity_at(self, step: int) -> float:
        return self.schedule.sparsity_at(step)

    def phase_at(self, step: int) -> str:
        return self.schedule.phase_at(step)

    def timeline(self) -> list[Phase]:
        return self.schedule.timeline(self.total_steps or max(self.count, 1))

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step)

    def on_step(self, step: int) -> None:
        if self.schedule.is_update_step(step):
            self.update_masks(step)

    def masks_at(self, step: int) -> dict[str, Tensor]:
        """The masks the schedule and score give at ``step`` (computed, not installed)."""
        scores = self.scores(self.score, step)
        return self.compute_masks(self.target_sparsity_at(step), scores, among_active=self.keep_pruned)

    def update_masks(self, step: int) -> None:
        """Install ``masks_at(step)``."""
        self.set_masks(self.masks_at(step), reason=self.reason.format(sparsity=self.target_sparsity_at(step)))
