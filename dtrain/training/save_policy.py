"""When the trainer saves and stops: the cadence of checkpoints and the agreement on interrupts, in one place.

The trainer asks once per optimizer step (`at_step`), at the same point on every rank. Whether this step is saved
comes from `--save-every-steps`, `--save-every-epochs` and `--save-every-seconds`; wall-clock time differs between
ranks, so rank 0's clock decides and the decision travels in the same all-reduce as the interrupt flag (every
`--agree-every-steps` steps, and at the last one) and a background save's failure on any rank. A signal is
always answered with a save of the step it stopped at, then the stop. The end of training saves regardless.
`--max-time` (time_budget.py) is decided the same way: rank 0's clock, in the same all-reduce.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dtrain.config import CheckpointConfig
from dtrain.config.local_tier import LocalTierConfig
from dtrain.errors import CheckpointError
from dtrain.training.interrupt import InterruptHandler
from dtrain.training.time_budget import TimeBudget


@dataclass
class StepDecision:
    save: bool  # save a checkpoint of this step
    signal: int  # stop (after a save) because of this signal; 0: go on
    out_of_time: bool = False  # stop (after a save) because --max-time is running out
    local_save: bool = False  # save to the node-local tier (--local-save-every-*)


class SavePolicy:
    def __init__(self, config: CheckpointConfig, total_steps: int, is_main: bool, interrupts: InterruptHandler,
                 device, budget: TimeBudget | None = None, local: LocalTierConfig | None = None):
        self.config = config
        self.local = local if local is not None and local.enabled else None
        self.budget = budget
        self.total_steps = total_steps
        self.is_main = is_main
        self.interrupts = interrupts
        self.device = device
        self._last_save_time = self._last_local_time = time.monotonic()

    def restart_local_clock(self) -> None:
        self._last_local_time = time.monotonic()

    def restart_clock(self) -> None:
        """The seconds cadence counts from now (the start of training, and every save)."""
        self._last_save_time = time.monotonic()

    def at_step(self, step: int, epoch_done: int | None, background_error: BaseException | None) -> StepDecision:
        """Whether to save and whether to stop after optimizer step `step` (call on every rank). `epoch_done`:
        the epoch count, when this step finished an epoch. Raises the background save's error on every rank
        when it failed on any."""
        signum, time_due, save_failed, out_of_time, local_due = 0, False, False, False, False
        if step % self.config.agree_every_steps == 0 or step >= self.total_steps:
            signum, (time_due, save_failed, out_of_time, local_due) = self.interrupts.agree(
                self.device, self._time_due(), background_error is not None, self._out_of_time(),
                self._local_time_due())
        if save_failed:
            raise background_error or CheckpointError(
                "a background checkpoint save failed on another rank; earlier checkpoints are unchanged")
        every_steps = self.config.save_every_steps
        save = bool(every_steps and step % every_steps == 0) or bool(time_due) or self.epoch_due(epoch_done)
        if out_of_time and not signum and step < self.total_steps:
            return StepDecision(True, 0, out_of_time=True)
        local_every = self.local.local_save_every_steps if self.local else 0
        return StepDecision(save, signum, local_save=bool(local_due) or bool(local_every and step % local_every == 0))

    def epoch_due(self, epochs_done: int | None) -> bool:
        """Whether finishing epoch number `epochs_done` (1-based count) is saved (`--save-every-epochs`)."""
        every = self.config.save_every_epochs
        return bool(epochs_done is not None and every and epochs_done % every == 0)

    def signal_after_save(self) -> int:
        """A signal that arrived during a save stops the run now, without saving this step again."""
        signum, _ = self.interrupts.agree(self.device)
        return signum

    def note_save(self, seconds: float) -> None:
        if self.budget is not None:
            self.budget.note_save(seconds)

    def _out_of_time(self) -> bool:
        return bool(self.is_main and self.budget is not None and self.budget.running_out())

    def _local_time_due(self) -> bool:
        every = self.local.local_save_every_seconds if self.local else 0
        return bool(self.is_main and every and time.monotonic() - self._last_local_time >= every)

    def _time_due(self) -> bool:
        every = self.config.save_every_seconds
        return bool(self.is_main and every and time.monotonic() - self._last_save_time >= every)
