"""Training decisions as small state machines: learning rate, curriculum stage, early stopping.

Pure Python, so they are unit-tested with fake metric sequences and their state is saved
in checkpoints (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import math
from bisect import bisect_left

from cellseg.config import CurriculumConfig, EarlyStoppingConfig, ScheduleConfig


def learning_rate(schedule: ScheduleConfig, epoch: int) -> float:
    """Learning rate of a 1-based epoch: the first segment whose `until` is >= epoch.

    Past the last segment the last rate stays.
    """
    i = bisect_left(schedule.until, epoch)
    return schedule.lrs[min(i, len(schedule.lrs) - 1)]


class Curriculum:
    """Stage 1 without elastic deformation; stage 2 (elastic on) once the metric reaches the threshold."""

    def __init__(self, cfg: CurriculumConfig):
        self.cfg = cfg
        self.stage = 1
        self.switch_epoch: int | None = None

    @property
    def elastic(self) -> bool | None:
        """Elastic override for the Augmenter: None when curriculum is off (config decides)."""
        if not self.cfg.enabled:
            return None
        return self.stage == 2

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch's validation metrics; True when this epoch switches to stage 2."""
        if not self.cfg.enabled or self.stage == 2:
            return False
        value = metrics.get(self.cfg.metric, float("nan"))
        if not math.isnan(value) and value >= self.cfg.threshold:
            self.stage, self.switch_epoch = 2, epoch
            return True
        return False

    def state_dict(self) -> dict:
        return {"stage": self.stage, "switch_epoch": self.switch_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.switch_epoch = int(state["stage"]), state["switch_epoch"]


class EarlyStopping:
    """Stop after `patience` epochs without improvement of the monitored metric."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.mode = "min" if cfg.metric == "val_loss" else "max"
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0

    def improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return value < self.best if self.mode == "min" else value > self.best

    def update(self, epoch: int, metrics: dict[str, float]) -> tuple[bool, bool]:
        """Record an epoch; returns (is_new_best, should_stop)."""
        value = metrics.get(self.cfg.metric, float("nan"))
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.cfg.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.bad_epochs = float(state["best"]), int(state["best_epoch"]), int(state["bad_epochs"])
