"""The non-finite policy: what a step or a validation pass with a NaN/inf value does to the run
(`train.on_nonfinite`, `train.max_consecutive_skips`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import NoReturn

from soft.runs.status import Reason
from soft.training.config import TrainConfig
from soft.training.step import StepResult

log = logging.getLogger(__name__)


class TrainingHalted(RuntimeError):
    """A step went bad and the configured policy is to stop (nothing was saved after it)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def bad_values(result: StepResult) -> str:
    values = {"loss": result.loss, **{f"exit_{k}": v for k, v in result.exit_losses.items()}}
    if result.grad_norm is not None:
        values["grad norm"] = result.grad_norm
    bad = [f"{name} = {v}" for name, v in values.items() if not math.isfinite(v)]
    return ", ".join(bad) or "the gradient norm could not be computed"


class SkipGuard:
    """Applies train.on_nonfinite and train.max_consecutive_skips to each step's outcome."""

    def __init__(self, train: TrainConfig) -> None:
        self.train = train
        self.in_a_row: list[str] = []

    def check(self, step: StepResult, iteration: int) -> bool:
        """Raises TrainingHalted when the run must stop; True when the update was skipped."""
        t = self.train
        if step.skipped is None:
            self.in_a_row = []
            return False
        if step.skipped == "nonfinite" and t.on_nonfinite == "stop":
            raise TrainingHalted(
                "nonfinite",
                f"step {iteration}: non-finite training values ({bad_values(step)}); stopped "
                "without applying the update or saving (train.on_nonfinite=stop). The last "
                "checkpoint is the last good state: resume from it with a lower train.lr, or "
                "set train.on_nonfinite=skip to drop such steps",
            )
        self.in_a_row.append(step.skipped)
        what = "fp16 loss-scale overflow" if step.skipped == "overflow" else bad_values(step)
        log.warning("step %d: update skipped (%s)", iteration, what)
        limit = t.max_consecutive_skips
        if limit and len(self.in_a_row) >= limit:
            kinds = ", ".join(sorted(set(self.in_a_row)))
            raise TrainingHalted(
                "nonfinite",
                f"steps {iteration - limit + 1}-{iteration}: {limit} optimizer updates in a row "
                f"were skipped ({kinds}); stopped (train.max_consecutive_skips={limit}). With "
                "fp16, lower train.initial_loss_scale or use bf16; otherwise lower train.lr",
            )
        return True


def finite(result: StepResult) -> bool:
    return all(math.isfinite(v) for v in (result.loss, *result.exit_losses.values()))


def halt_on_validation(result: StepResult, iteration: int, last_good: Path | None) -> NoReturn:
    """A NaN/inf validation loss means the weights are bad, whatever the training steps said
    (e.g. an update that made them huge but finite, then skipped steps): the run fails and
    nothing is saved from these weights. `last_good`: the newest checkpoint whose validation
    loss was finite, which `latest` now names."""
    where = (
        f"'latest' now names {last_good.name}, the newest checkpoint whose validation loss was "
        "finite: a relaunch continues from it (lower train.lr first)"
        if last_good is not None
        else "no checkpoint has a finite validation loss: start again with a lower train.lr"
    )
    raise TrainingHalted(
        "nonfinite",
        f"validation at step {iteration}: non-finite loss ({bad_values(result)}); the weights "
        f"are not usable, so nothing is saved from them. {where}",
    )
