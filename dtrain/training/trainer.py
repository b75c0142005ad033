"""The training loop.

`Trainer.fit()` reads top to bottom: start (fresh or resumed), then epochs of micro-batches; after every
optimizer step it logs, evaluates, and asks the save policy once whether to save and whether to stop, at the same
deterministic points on every rank. Checkpointing is the CheckpointManager's job, evaluation the Evaluator's
(evaluation.py), starting and resuming startup.py's. Every piece of restorable state (counters, data position,
learning-rate plan, evaluation and early stopping) has `state_dict()`/`load_state_dict()`; together they are a
checkpoint's `trainer_state.json`.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dtrain.checkpoint import CheckpointManager, RetentionPolicy
from dtrain.checkpoint.adapters import frozen_base_identity
from dtrain.checkpoint.location import run_checkpoints
from dtrain.checkpoint.store_commit import STAGING_DIR
from dtrain.config import Config
from dtrain.durations import parse_duration
from dtrain.data import build_train_source
from dtrain.errors import Interrupted, OutOfTime, UsageError
from dtrain.lock import RunLock
from dtrain.redact import redact_values
from dtrain.tasks import Task
from dtrain.training import certificate, startup
from dtrain.training.evaluation import EarlyStopping, Evaluator
from dtrain.training.interrupt import InterruptHandler
from dtrain.training.metrics import MetricsLog
from dtrain.training.resume import load_initial_weights
from dtrain.training.runtime import check_sharded, make_accelerator
from dtrain.training.save_policy import SavePolicy
from dtrain.training.schedule import LearningRate, LRPlan, warmup_cosine
from dtrain.training.tiered import open_local_tier
from dtrain.training.time_budget import TimeBudget
from dtrain.weights import tied_names

logger = get_logger(__name__)


@dataclass
class TrainerState:
    """The trainer's counters, as a checkpoint stores them (JSON, never a pickle)."""

    global_step: int = 0  # optimizer steps
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0
    epoch_samples_seen: int = 0  # global samples consumed in the current epoch: the resume position
    samples_seen: int = 0  # global samples consumed by the whole run
    world_size: int = 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The saved counters; `world_size` stays this run's own."""
        for f in fields(self):
            if f.name != "world_size" and f.name in state:
                setattr(self, f.name, int(state[f.name]))


@dataclass
class FitResult:
    reason: str  # "finished" or "early_stop"
    global_step: int
    last_eval: dict[str, float]
    checkpoint: str | None
    pending_signal: int = 0  # a signal that arrived during the final eval/save (the run still finished)


class Trainer:
    """Trains a task (or a model, data and loss handed in directly) under a Config.

    Either give `task=`, or the pieces: `model`, `loss_fn(model, batch) -> mean loss`, `train_dataloader`
    (dtrain rebuilds it so it can resume exactly, keeping what it says: shuffle or not, drop_last, workers,
    pin_memory, collate_fn, a sampler with state_dict()), and optionally `eval_dataloader` (its batch size is
    kept) and `optimizer` (default: AdamW with the config's lr and weight decay).
    """

    def __init__(self, config: Config | None = None, task: Task | None = None, *, model=None, loss_fn=None,
                 train_dataloader: DataLoader | None = None, eval_dataloader: DataLoader | None = None,
                 optimizer: torch.optim.Optimizer | None = None, accelerator=None,
                 resume_command: str | None = None):
        self.config = config or Config()
        if task is None:
            if model is None or loss_fn is None or train_dataloader is None:
                raise UsageError("Trainer needs task=, or model=, loss_fn= and train_dataloader=")
            task = Task.from_pieces(model, loss_fn, train_dataloader, eval_dataloader)
            if train_dataloader.batch_size:
                self.config.train.batch_size = train_dataloader.batch_size
            self.config.output_dir = self.config.output_dir or str(Path("runs") / task.name)
        self.config.validate()
        cfg, ckpt, acc = self.config, self.config.checkpoint, accelerator or make_accelerator(self.config)
        self.task, self.accelerator = task, acc
        cfg.train.mixed_precision = acc.mixed_precision  # the precision actually used (config.yaml, checkpoints)
        self.output_dir = Path(cfg.output_dir)
        self.is_main = acc.is_main_process
        self.state = TrainerState(world_size=acc.num_processes)
        self.metrics = MetricsLog(self.output_dir, enabled=self.is_main, accelerator=acc)
        self.checkpoints = CheckpointManager(
            acc, run_checkpoints(self.output_dir, ckpt.checkpoint_dir),
            RetentionPolicy(ckpt.keep_last, ckpt.keep_best, ckpt.keep_every_steps, cfg.eval.mode),
            monitor=cfg.eval.monitor, verify_checksums=ckpt.verify_checksums, async_save=ckpt.async_save,
            checksum=ckpt.checksum,
            staging_dir=self.output_dir / STAGING_DIR)
        self.interrupts = InterruptHandler(exit_grace_seconds=ckpt.signal_grace_seconds)
        self.resume_command = resume_command  # printed after an interrupt; default: set at start from argv
        self.lock = RunLock(self.output_dir, acc)
        self.train_data = build_train_source(task, cfg, acc)  # the order, its position, its loader
        self.evaluator = Evaluator(task, cfg, acc, self.output_dir)
        self.early_stopping = EarlyStopping(cfg.eval.monitor, cfg.eval.mode, cfg.eval.early_stopping_patience)
        self.total_steps = self._planned_steps()
        # Recorded in every checkpoint: a sharded one stores each name of a tied tensor, and its export keeps one.
        self.tied_weights = tied_names(self.task.model)
        # A PEFT model's checkpoints hold only its adapter: they name the frozen base it belongs to (resume.py).
        frozen_base = frozen_base_identity(self.task.model)
        if frozen_base:
            self.task.shape = {**self.task.shape, "frozen_base": frozen_base}
        self.model, self.optimizer, self.scheduler, self.lr = self._prepare_model(optimizer)
        self.local_saves = open_local_tier(cfg, acc, self.checkpoints)  # None without --local-checkpoint-dir
        budget = TimeBudget(parse_duration(cfg.train.max_time)) if cfg.train.max_time else None  # --max-time
        self.save_policy = SavePolicy(ckpt, self.total_steps, self.is_main, self.interrupts, acc.device, budget,
                                      cfg.local_tier)
        self.stop_at_step: int | None = None  # set by fit()
        self.progress_bar: tqdm | None = None
        self._loss_sum = torch.zeros((), device=acc.device)  # summed on the device between log steps
        self._loss_count = 0
        self._window_started = time.perf_counter()
        self._warned_slow_save = False

    def _prepare_model(self, optimizer: torch.optim.Optimizer | None):
        """The prepared model, optimizer and scheduler, and the learning rate that drives the optimizer."""
        cfg, model = self.config, self.task.model
        if cfg.checkpoint.init_from:
            load_initial_weights(model, cfg.checkpoint.init_from)
        optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=cfg.train.lr,
                                                   weight_decay=cfg.train.weight_decay)
        plan = LRPlan(self.total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio)
        # The scheduler keeps Accelerate's checkpoint layout (scheduler.bin); the rate itself is LearningRate's.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            plan.warmup_steps, plan.total_steps, plan.min_lr_ratio))
        model, optimizer, scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        if cfg.train.sharding == "fsdp2":
            logger.info(check_sharded(model, self.accelerator.num_processes), main_process_only=False)
        return model, optimizer, scheduler, LearningRate(optimizer, plan)

    def _planned_steps(self) -> int:
        limits = [self.config.train.max_steps] if self.config.train.max_steps else []
        if self.config.train.epochs and self.train_data.steps_per_epoch is not None:  # None: a stream
            limits.append(self.config.train.epochs * self.train_data.steps_per_epoch)
        return min(limits)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self, stop_at_step: int | None = None) -> FitResult:
        """Trains to the end. `stop_at_step` acts like a SIGUSR1 arriving during that step (for verify-resume)."""
        self.stop_at_step = stop_at_step
        with self.interrupts, self._closing_on_error():
            startup.start(self)  # fresh, or resumed: every rank holds the same state afterwards
            self.progress_bar = tqdm(total=self.total_steps, initial=self.state.global_step,
                                     disable=not self.is_main, desc=self.task.name, dynamic_ncols=True,
                                     mininterval=0.5 if sys.stderr.isatty() else 30)
            state, data = self.state, self.train_data
            while not self._finished():
                epoch = state.epoch
                for batch in data:  # the rest of the epoch, from where the data was sought
                    self._micro_step(send_to_device(batch, self.accelerator.device))
                    state.epoch_samples_seen += data.samples_per_micro_step
                    state.samples_seen += data.samples_per_micro_step
                    if not self.accelerator.sync_gradients:
                        continue  # inside a gradient accumulation window
                    state.global_step += 1
                    state.step_in_epoch += 1
                    # Rolled over before anything is saved at this step: a checkpoint of the epoch's last step
                    # says "epoch done" (the next one at its start), so a finished run's last checkpoint says so.
                    epoch_done = data.epoch_ends_at(state.epoch_samples_seen)
                    if epoch_done:
                        self._roll_over_epoch()
                    self.progress_bar.update(1)
                    self._after_optimizer_step(epoch_done)
                    if self._finished():
                        break
                else:  # the data ran dry before the epoch was known to be over (a stream)
                    if state.epoch == epoch:
                        self._roll_over_epoch()
                        if self.save_policy.epoch_due(state.epoch):
                            self._save()
            self.progress_bar.close()
            return self._finish()

    def _micro_step(self, batch) -> None:
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                loss = self.task.loss(self.model, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients:
                if self.config.train.grad_clip:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
                self.checkpoints.before_optimizer_step()  # an async save may still be copying the weights
                if self.local_saves:
                    self.local_saves.tier.before_optimizer_step()
                self.lr.apply(self.state.global_step)  # the rate is a function of the step, nothing else
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum += loss.detach().float()
        self._loss_count += 1

    def _after_optimizer_step(self, epoch_done: bool) -> None:
        """Logging, evaluation, then one question to the save policy: the same points on every rank."""
        step = self.state.global_step
        if step % self.config.eval.log_every_steps == 0:
            self._log_training()
        if self.evaluator.due(step, last_step=step >= self.total_steps):
            self._evaluate()
        if step == self.stop_at_step:
            self.interrupts.request(signal.SIGUSR1)
        self._log_checkpoint(self.checkpoints.poll())  # a background save that committed meanwhile
        if self.local_saves:
            self.local_saves.poll(self)
        self._maybe_save(epoch_done)

    def _maybe_save(self, epoch_done: bool) -> None:
        decision = self.save_policy.at_step(self.state.global_step, self.state.epoch if epoch_done else None,
                                            self.checkpoints.background_error)
        if decision.local_save and self.local_saves:  # the node-local tier first: it holds the loop least
            self.local_saves.save(self)
            self.save_policy.restart_local_clock()
        if decision.save:
            self._save()
            decision.signal = decision.signal or self.save_policy.signal_after_save()
        if decision.signal:
            self._stop_on_signal(decision.signal)
        if decision.out_of_time:
            self._stop_out_of_time()

    def _roll_over_epoch(self) -> None:
        state = self.state
        state.epoch, state.step_in_epoch, state.epoch_samples_seen = state.epoch + 1, 0, 0
        self.train_data.seek(state.epoch)  # the data's position moves with it (a save now resumes there)

    def _finished(self) -> bool:
        cfg, state = self.config.train, self.state
        return bool(self.early_stopping.stopped_early or (cfg.max_steps and state.global_step >= cfg.max_steps)
                    or (cfg.epochs and state.epoch >= cfg.epochs))

    def _finish(self) -> FitResult:
        step = self.state.global_step
        if self.evaluator.enabled and not self.evaluator.evaluated_at(step):
            self._evaluate()
        if self.local_saves:
            self.local_saves.finish(self)
        checkpoint = self._save(wait=True)
        pending_signal, _ = self.interrupts.agree(self.accelerator.device)
        reason = "early_stop" if self.early_stopping.stopped_early else "finished"
        self.metrics.event("end", step, reason=reason, epoch=self.state.epoch)
        logger.info(f"training {reason} at step {step}; last checkpoint {checkpoint}")
        for tracker in self.accelerator.trackers:  # not end_training(): it also destroys the process group,
            tracker.finish()                        # which later trainings in this process (pipelines) need
        return FitResult(reason, step, self.evaluator.last_eval, checkpoint, pending_signal)

    @contextlib.contextmanager
    def _closing_on_error(self):
        try:
            yield
        except BaseException:
            if self.progress_bar is not None:
                self.progress_bar.close()  # so an error message starts on a line of its own
            self.checkpoints.wait(raise_error=False)  # an exception must not abandon a save half-way
            if self.local_saves:
                self.local_saves.tier.wait(raise_error=False)
            raise
        finally:
            self.lock.release()

    # ------------------------------------------------------------------------------------------ pieces

    def _log_training(self) -> None:
        loss = self.accelerator.reduce(self._loss_sum / max(self._loss_count, 1), reduction="mean").item()
        elapsed = time.perf_counter() - self._window_started
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": loss,
                  "lr": self.lr.at(self.state.global_step)[0],  # the rate of the next step
                  "steps_per_second": self.config.eval.log_every_steps / elapsed if elapsed > 0 else 0.0,
                  "samples_seen": self.state.samples_seen}
        self.metrics.log(record, "train")
        self.progress_bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        self.reset_loss_window()

    def reset_loss_window(self) -> None:
        """Losses are summed on the device between log steps: no host sync on the steps in between."""
        self._loss_sum = torch.zeros((), device=self.accelerator.device)
        self._loss_count, self._window_started = 0, time.perf_counter()

    def _evaluate(self) -> dict[str, float]:
        step = self.state.global_step
        metrics, sample = self.evaluator.evaluate(self.model, step)
        if self.early_stopping.update(metrics, step):
            self.metrics.event("early_stop", step, best_metric=self.early_stopping.best_metric,
                               best_step=self.early_stopping.best_step, patience=self.early_stopping.patience)
        self.metrics.log({"step": step, "epoch": self.state.epoch, **metrics}, "eval")
        if sample is not None:
            logger.info(f"sample at step {step}:\n{sample}")
        return metrics

    def _save(self, wait: bool = False) -> str:
        """Saves the current step (once per step). With --async-save the commit finishes in the background
        unless `wait`; its `checkpoint` event is logged once it has committed."""
        step = self.state.global_step
        if self.checkpoints.last_saved_step != step:
            self._log_checkpoint(self.checkpoints.wait())  # the previous background save, if still in flight
            report = self.checkpoints.save(step, self.state_dict(), self.evaluator.metric_at(step))
            self.save_policy.restart_clock()
            if not self.checkpoints.async_save:
                self._log_checkpoint(report)
        if wait:
            self._log_checkpoint(self.checkpoints.wait())
        return str(self.checkpoints.location(step))

    def _log_checkpoint(self, report) -> None:
        if report is None:
            return
        self.metrics.event("checkpoint", report.step, path=str(report.path), bytes=report.bytes,
                           blocking_seconds=round(report.blocking_seconds, 4),
                           total_seconds=round(report.total_seconds, 4), deleted=report.deleted)
        self.save_policy.note_save(report.total_seconds)  # --max-time keeps this much time for the last save
        if self.local_saves:
            self.local_saves.note_persistent(report.total_seconds)  # a stop's budget (tiered.py)
        grace = self.config.checkpoint.signal_grace_seconds
        if report.total_seconds > grace and not self._warned_slow_save:
            self._warned_slow_save = True
            logger.warning(f"the last checkpoint took {report.total_seconds:.1f}s, longer than the "
                           f"{grace:.0f}s a launcher allows after a signal (--signal-grace-seconds); an interrupt "
                           f"save may be killed half-way. Use --async-save or raise the launcher's grace period")

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint's trainer_state.json: every restorable piece's state, and what the checkpoint was made by."""
        entry = certificate.local_entry(self.train_data.next_batch_digest(), self.lr.planned(self.state.global_step))
        return {**self.state.state_dict(), **self.early_stopping.state_dict(), **self.evaluator.state_dict(),
                "data_position": self.train_data.state_dict(),  # on every rank: streams gather
                "lr_plan": self.lr.state_dict(), "task": self.task.name, "shape": self.task.shape,
                "resume_certificate": certificate.gather_certificate(entry, self.accelerator.num_processes),
                "fingerprint": self.task.fingerprint, "config": redact_values(self.config.to_dict()),
                "mixed_precision": self.accelerator.mixed_precision, "sharding": self.config.train.sharding or "none",
                "grad_accum": self.config.train.grad_accum, "tied_weights": self.tied_weights,
                "device": self.accelerator.device.type, "async": self.checkpoints.async_save,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restores every restorable piece from a checkpoint's trainer state (the RNG and the prepared objects
        come from the checkpoint's files: CheckpointManager.load)."""
        self.state.load_state_dict(saved)
        self.early_stopping.load_state_dict(saved)
        self.evaluator.load_state_dict(saved)
        changed = self.lr.load_state_dict(saved.get("lr_plan"), self.state.global_step)
        if changed:
            logger.warning(changed)
        self.train_data.load_state_dict(saved.get("data_position"), self.state.epoch, self.state.epoch_samples_seen)

    def _stop_on_signal(self, signum: int) -> None:
        name, step = signal.Signals(signum).name, self.state.global_step
        self.metrics.event("interrupt", step, signal=name)
        logger.warning(f"{name} received: saving a checkpoint at step {step} and stopping", main_process_only=False)
        if self.local_saves:  # the local tier first; the persistent one if it fits the grace window
            checkpoint = self.local_saves.stop(self, name, self.config.checkpoint.signal_grace_seconds)
        else:
            checkpoint = self._save_before_stopping(name)
        raise Interrupted(signum, checkpoint)

    def _stop_out_of_time(self) -> None:
        step = self.state.global_step
        self.metrics.event("interrupt", step, signal=None, reason="max_time")
        logger.warning(f"--max-time {self.config.train.max_time} is running out: saving a checkpoint at step {step} "
                       f"and stopping")
        raise OutOfTime(self._save_before_stopping("--max-time"))

    def _save_before_stopping(self, cause: str) -> str:
        step = self.state.global_step
        checkpoint = self._save(wait=True)
        if self.is_main and self.stop_at_step != step:
            print(f"Stopped by {cause} at step {step}; checkpoint {checkpoint}", flush=True)
            print(f"Resume with: {self.resume_command}", flush=True)
        return checkpoint
