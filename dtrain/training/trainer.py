"""The training loop.

`Trainer.fit()` reads top to bottom: start (fresh or resumed), then epochs of micro-batches; after every
optimizer step it logs, evaluates, saves and asks all ranks whether anyone was interrupted, all at the same
deterministic points on every rank. Checkpointing is the CheckpointManager's job; randomness that evaluation
consumes is put back, so a resumed run draws exactly the numbers an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, send_to_device
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from dtrain.training import certificate
from dtrain.training import resume as resume_checks
from dtrain.checkpoint import CheckpointManager, RetentionPolicy, resolve_resume
from dtrain.checkpoint.manager import STAGING_DIR
from dtrain.config import Config, write_config
from dtrain.data import ShardedEvalSampler, build_train_source, make_loader
from dtrain.data.stream import EvalStream
from dtrain.distributed import run_and_agree
from dtrain.errors import CheckpointError, Interrupted, UsageError
from dtrain.training.interrupt import InterruptHandler
from dtrain.lock import RunLock
from dtrain.training.metrics import MetricsLog
from dtrain.rng import preserved_rng
from dtrain.training.runtime import make_accelerator
from dtrain.training.schedule import LRPlan, plan_change, warmup_cosine
from dtrain.training.shared_dir import check_every_node_sees, directory_every_node_must_see
from dtrain.tasks import Task
from dtrain.tasks.base import evaluation_sums, metrics_from_sums

logger = get_logger(__name__)


@dataclass
class TrainerState:
    """Everything about progress that a checkpoint stores as JSON (never a pickle)."""

    global_step: int = 0  # optimizer steps
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0
    epoch_samples_seen: int = 0  # global samples consumed in the current epoch: the resume position
    data_position: dict[str, Any] = field(default_factory=dict)  # where the data is (per rank for streams)
    samples_seen: int = 0  # global samples consumed by the whole run
    world_size: int = 1
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None


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
        self.task = task
        self.accelerator = accelerator or make_accelerator(self.config)
        self.config.train.mixed_precision = self.accelerator.mixed_precision  # the precision actually used
        self.output_dir = Path(self.config.output_dir)
        self.is_main = self.accelerator.is_main_process
        self.state = TrainerState(world_size=self.accelerator.num_processes)
        self.metrics = MetricsLog(self.output_dir, enabled=self.is_main, accelerator=self.accelerator)
        ckpt = self.config.checkpoint
        self.checkpoints = CheckpointManager(
            self.accelerator, ckpt.checkpoint_dir or self.output_dir / "checkpoints",
            RetentionPolicy(ckpt.keep_last, ckpt.keep_best, ckpt.keep_every_steps, self.config.eval.mode),
            monitor=self.config.eval.monitor, verify_checksums=ckpt.verify_checksums, async_save=ckpt.async_save,
            staging_dir=self.output_dir / STAGING_DIR)
        self.interrupts = InterruptHandler(exit_grace_seconds=ckpt.signal_grace_seconds)
        self._resume_command = resume_command  # printed after an interrupt; default: this run's own command
        self._lock = RunLock(self.output_dir, self.accelerator)
        self._build_training_objects(optimizer)

    # ------------------------------------------------------------------------------------------ set-up

    def _build_training_objects(self, optimizer) -> None:
        cfg, acc = self.config.train, self.accelerator
        self.train_data = build_train_source(self.task, self.config, acc)  # the order, its position, its loader
        self.eval_loader = None
        eval_batch_size = self.task.eval_batch_size or cfg.batch_size
        if isinstance(self.task.eval_data, IterableDataset):
            self.eval_loader = EvalStream(self.task.eval_data, eval_batch_size, self.task.collate_fn,
                                          self.config.eval.eval_max_batches)
        elif self.task.eval_data is not None and len(self.task.eval_data):
            eval_sampler = ShardedEvalSampler(len(self.task.eval_data), eval_batch_size, acc.process_index,
                                              acc.num_processes, self.config.eval.eval_max_batches)
            self.eval_loader = make_loader(self.task.eval_data, eval_sampler, self.task.collate_fn, 0, cfg.seed)
        if self.config.checkpoint.init_from:
            resume_checks.load_initial_weights(self.task.model, self.config.checkpoint.init_from)
        optimizer = optimizer or torch.optim.AdamW(self.task.model.parameters(), lr=cfg.lr,
                                                   weight_decay=cfg.weight_decay)
        self.total_steps = self._planned_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio))
        self.model, self.optimizer, self.scheduler = acc.prepare(self.task.model, optimizer, scheduler)

    def _planned_steps(self) -> int:
        limits = [self.config.train.max_steps] if self.config.train.max_steps else []
        if self.config.train.epochs and self.train_data.steps_per_epoch is not None:  # None: a stream
            limits.append(self.config.train.epochs * self.train_data.steps_per_epoch)
        return min(limits)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self, stop_at_step: int | None = None) -> FitResult:
        """Trains to the end. `stop_at_step` acts like a SIGUSR1 arriving during that step (for verify-resume)."""
        self._stop_at_step = stop_at_step
        with self.interrupts, self._waiting_for_background_saves():
            self._start()
            progress = self._progress = tqdm(total=self.total_steps, initial=self.state.global_step,
                                             disable=not self.is_main, desc=self.task.name, dynamic_ncols=True,
                                             mininterval=0.5 if sys.stderr.isatty() else 30)
            self._reset_loss_window()
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
                    epoch_done = self._epoch_ends_at_this_step()
                    if epoch_done:
                        self._roll_over_epoch()
                    progress.update(1)
                    self._after_optimizer_step(progress)
                    if epoch_done:
                        self._save_at_epoch_end()
                    if self._finished():
                        break
                else:  # the data ran dry before the epoch was known to be over (a stream)
                    if state.epoch == epoch:
                        self._roll_over_epoch()
                        self._save_at_epoch_end()
            progress.close()
            return self._finish()

    @contextlib.contextmanager
    def _waiting_for_background_saves(self):
        self._progress = None
        try:
            yield
        except BaseException:
            if self._progress is not None:
                self._progress.close()  # so an error message starts on a line of its own
            self.checkpoints.wait(raise_error=False)  # an exception must not abandon a save half-way
            raise
        finally:
            self._lock.release()

    def _micro_step(self, batch) -> None:
        with self.accelerator.accumulate(self.model):
            with self.accelerator.autocast():
                loss = self.task.loss(self.model, batch)
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.config.train.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
            if self.accelerator.sync_gradients:
                self.checkpoints.before_optimizer_step()  # an async save may still be copying the weights
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._loss_sum += loss.detach().float()
        self._loss_count += 1

    def _after_optimizer_step(self, progress) -> None:
        """Logging, evaluation, saving and the interrupt agreement: the same points on every rank."""
        step, cfg = self.state.global_step, self.config
        if step % cfg.eval.log_every_steps == 0:
            self._log_training(progress)
        last_step = step >= self.total_steps
        if (cfg.eval.eval_every_steps and step % cfg.eval.eval_every_steps == 0) or last_step:
            self._evaluate()  # on the last step too, so that the final checkpoint carries the metric
        if step == self._stop_at_step:
            self.interrupts.request(signal.SIGUSR1)
        self._log_checkpoint(self.checkpoints.poll())  # a background save that committed meanwhile
        # One all-reduce per step carries the interrupt flag, rank 0's wall-clock save decision and whether a
        # background save failed on any rank, so every rank acts on them at the same step.
        signum, time_due, save_failed = 0, False, False
        if step % cfg.checkpoint.agree_every_steps == 0 or last_step:
            signum, (time_due, save_failed) = self.interrupts.agree(
                self.accelerator.device, self._save_time_due(), self.checkpoints.background_error is not None)
        if save_failed:
            raise self.checkpoints.background_error or CheckpointError(
                "a background checkpoint save failed on another rank; earlier checkpoints are unchanged")
        if (cfg.checkpoint.save_every_steps and step % cfg.checkpoint.save_every_steps == 0) or time_due:
            self._save()
            if not signum:  # a signal that arrived during the save stops us now, without saving this step again
                signum, _ = self.interrupts.agree(self.accelerator.device)
        if signum:
            self._stop_on_signal(signum)

    def _epoch_ends_at_this_step(self) -> bool:
        """Whether this optimizer step consumed the last batch of the epoch (known up front for map-style data)."""
        return self.train_data.epoch_ends_at(self.state.epoch_samples_seen)

    def _roll_over_epoch(self) -> None:
        state = self.state
        state.epoch, state.step_in_epoch, state.epoch_samples_seen = state.epoch + 1, 0, 0
        self.train_data.seek(state.epoch)  # the data's position moves with it (a save now resumes there)

    def _save_at_epoch_end(self) -> None:
        every = self.config.checkpoint.save_every_epochs
        if every and self.state.epoch % every == 0:
            self._save()

    def _finished(self) -> bool:
        cfg, state = self.config.train, self.state
        return (state.stopped_early or (cfg.max_steps and state.global_step >= cfg.max_steps)
                or (cfg.epochs and state.epoch >= cfg.epochs))

    def _finish(self) -> FitResult:
        state = self.state
        if self.eval_loader is not None and state.last_eval_step != state.global_step:
            self._evaluate()
        checkpoint = self._save(wait=True)
        pending_signal, _ = self.interrupts.agree(self.accelerator.device)
        reason = "early_stop" if state.stopped_early else "finished"
        self.metrics.event("end", state.global_step, reason=reason, epoch=state.epoch)
        logger.info(f"training {reason} at step {state.global_step}; last checkpoint {checkpoint}")
        for tracker in self.accelerator.trackers:  # not end_training(): it also destroys the process group,
            tracker.finish()                        # which later trainings in this process (pipelines) need
        return FitResult(reason, state.global_step, state.last_eval, checkpoint, pending_signal)

    # ------------------------------------------------------------------------------------------ pieces

    def _log_training(self, progress) -> None:
        count = max(self._loss_count, 1)
        loss = self.accelerator.reduce(self._loss_sum / count, reduction="mean").item()
        elapsed = time.perf_counter() - self._timer
        record = {"step": self.state.global_step, "epoch": self.state.epoch, "loss": loss,
                  "lr": self.scheduler.get_last_lr()[0],
                  "steps_per_second": self.config.eval.log_every_steps / elapsed if elapsed > 0 else 0.0,
                  "samples_seen": self.state.samples_seen}
        self.metrics.log(record, "train")
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}")
        self._reset_loss_window()

    def _reset_loss_window(self) -> None:
        """Losses are summed on the device between log steps: no host sync on the steps in between."""
        self._loss_sum = torch.zeros((), device=self.accelerator.device)
        self._loss_count, self._timer = 0, time.perf_counter()

    def _evaluate(self) -> dict[str, float]:
        """Runs the task's evaluation (and sample) without touching the training RNG streams."""
        if self.eval_loader is None:
            return {}
        model, device = self._eval_model(), self.accelerator.device
        # Every rank runs the same number of batches (ShardedEvalSampler pads the shorter shards); the padding
        # batches come last and only keep the forward passes in step: their results are dropped.
        real = getattr(getattr(self.eval_loader, "batch_sampler", None), "real_batches", None)  # None: all real
        with preserved_rng():
            model.eval()
            with torch.no_grad(), self.accelerator.autocast():
                batches = iter(self.eval_loader)
                sums = evaluation_sums(self.task, model, itertools.islice(batches, real), device)
                for batch in batches:
                    for key in self.task.evaluate(model, send_to_device(batch, device)):
                        sums.setdefault(key, torch.zeros((), dtype=torch.float64))  # a rank with no real batch
                sample = self._write_sample(model)
            model.train()
        keys = sorted(sums)
        totals = self.accelerator.reduce(torch.stack([sums[k] for k in keys]).to(self.accelerator.device),
                                         reduction="sum").cpu().tolist()
        metrics = metrics_from_sums(dict(zip(keys, totals)))
        self._update_early_stopping(metrics)
        self.metrics.log({"step": self.state.global_step, "epoch": self.state.epoch, **metrics}, "eval")
        if sample is not None:
            logger.info(f"sample at step {self.state.global_step}:\n{sample}")
        return metrics

    def _eval_model(self):
        """The model evaluation and sampling run on every rank. Where parameters are sharded (FSDP, DeepSpeed)
        it is the prepared one, whose forward pass is a collective; elsewhere the plain module: DDP's wrapper adds
        nothing to a forward without gradients, and would hide methods such as `generate`."""
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                 DistributedType.MEGATRON_LM):
            return self.model
        return self.accelerator.unwrap_model(self.model)

    def _write_sample(self, model) -> str | None:
        """Every rank generates the same sample (under sharding each forward pass is a collective); the main
        process writes it."""
        if self.task.sample is None:
            return None
        device = self.accelerator.device
        generator = torch.Generator(device=device).manual_seed(self.config.train.seed + self.state.global_step)
        text = self.task.sample(model, generator)
        if not self.is_main:
            return None
        samples = self.output_dir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        (samples / f"step_{self.state.global_step:09d}.txt").write_text(text)
        return text

    def _update_early_stopping(self, metrics: dict[str, float]) -> None:
        state, cfg = self.state, self.config.eval
        state.last_eval, state.last_eval_step = metrics, state.global_step
        value = metrics.get(cfg.monitor)
        if value is None:
            logger.warning(f"monitor {cfg.monitor!r} is not among the eval metrics {sorted(metrics)}")
            return
        improved = state.best_metric is None or (value < state.best_metric if cfg.mode == "min"
                                                 else value > state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.global_step, 0
        else:
            state.evals_without_improvement += 1
        if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
            state.stopped_early = True
            self.metrics.event("early_stop", state.global_step, best_metric=state.best_metric,
                               best_step=state.best_step, patience=cfg.early_stopping_patience)
            logger.info(f"early stopping: {cfg.monitor} did not improve for {state.evals_without_improvement} evals")

    def _save_time_due(self) -> bool:
        every = self.config.checkpoint.save_every_seconds
        return bool(self.is_main and every and time.monotonic() - self._last_save_time >= every)

    def _save(self, wait: bool = False) -> str:
        """Saves the current step (once per step). With --async-save the commit finishes in the background
        unless `wait`; its `checkpoint` event is logged once it has committed."""
        state = self.state
        path = str(self.checkpoints.location(state.global_step))
        if self.checkpoints.last_saved_step != state.global_step:
            evaluated_now = state.last_eval_step == state.global_step
            metric = state.last_eval.get(self.config.eval.monitor) if evaluated_now else None
            self._log_checkpoint(self.checkpoints.wait())  # the previous background save, if still in flight
            report = self.checkpoints.save(state.global_step, self._checkpoint_state(), metric)
            self._last_save_time = time.monotonic()
            if not self.checkpoints.async_save:
                self._log_checkpoint(report)
        if wait:
            self._log_checkpoint(self.checkpoints.wait())
        return path

    def _log_checkpoint(self, report) -> None:
        if report is None:
            return
        self.metrics.event("checkpoint", report.step, path=str(report.path), bytes=report.bytes,
                           blocking_seconds=round(report.blocking_seconds, 4),
                           total_seconds=round(report.total_seconds, 4), deleted=report.deleted)
        grace = self.config.checkpoint.signal_grace_seconds
        if report.total_seconds > grace and not getattr(self, "_warned_grace", False):
            self._warned_grace = True
            logger.warning(f"the last checkpoint took {report.total_seconds:.1f}s, longer than the "
                           f"{grace:.0f}s a launcher allows after a signal (--signal-grace-seconds); an interrupt "
                           f"save may be killed half-way. Use --async-save or raise the launcher's grace period")

    def _checkpoint_state(self) -> dict[str, Any]:
        self.state.data_position = self.train_data.checkpoint_position()  # on every rank: streams gather
        entry = certificate.local_entry(self.train_data.next_batch_digest(), certificate.planned_lrs(self.scheduler))
        return {**asdict(self.state), "task": self.task.name, "shape": self.task.shape,
                "resume_certificate": certificate.gather_certificate(entry, self.accelerator.num_processes),
                "fingerprint": self.task.fingerprint, "config": self.config.to_dict(),
                "mixed_precision": self.accelerator.mixed_precision,
                "lr_plan": self._lr_plan().to_dict(), "grad_accum": self.config.train.grad_accum,
                "device": self.accelerator.device.type, "async": self.checkpoints.async_save,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _check_resume_certificate(self, saved: dict[str, Any] | None, path: Path) -> None:
        """Before the first resumed step: is the next step's input what it would have been without the stop?"""
        entry = certificate.local_entry(self.train_data.next_batch_digest(), certificate.planned_lrs(self.scheduler))
        mine = certificate.differences(saved, entry, self.accelerator.process_index, self.accelerator.num_processes)
        differ = certificate.agree_on_differences(mine, self.accelerator.device)
        if not differ:
            if saved:
                logger.info(f"resume certificate of {path.name} matches: the next step continues the run exactly")
            return
        message = (f"the resume certificate of {path.name} does not match: {certificate.describe(differ)}; "
                   f"the resumed run will not be bit-identical to an uninterrupted one")
        if self.config.checkpoint.strict_resume:
            raise UsageError(f"--strict-resume: {message}")
        logger.warning(message)

    @property
    def resume_command(self) -> str | None:
        """The command that resumes this run (known once it has started)."""
        return self._resume_command

    def _stop_on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.metrics.event("interrupt", self.state.global_step, signal=name)
        logger.warning(f"{name} received: saving a checkpoint at step {self.state.global_step} and stopping",
                       main_process_only=False)
        checkpoint = self._save(wait=True)
        if self.is_main and self._stop_at_step != self.state.global_step:
            print(f"Stopped by {name} at step {self.state.global_step}; checkpoint {checkpoint}", flush=True)
            print(f"Resume with: {self._resume_command}", flush=True)
        raise Interrupted(signum, checkpoint)

    # ------------------------------------------------------------------------------------------ start

    def _start(self) -> None:
        """Fresh start or resume; afterwards every rank holds the same TrainerState."""
        cfg, storage = self.config.checkpoint, self.checkpoints.storage
        self._last_save_time = time.monotonic()
        # Taken now: by the time a signal arrives, the launcher whose command line we read may be gone.
        self._resume_command = self._resume_command or resume_checks.resume_command(self.config.output_dir)
        # Rank 0 creates the directories; every rank learns whether that worked, so a failure there (a file in
        # the way, no permission) stops all of them with one error instead of leaving them in a barrier.
        shared = directory_every_node_must_see(self.output_dir, self.checkpoints.dir)  # None: an object store
        created, error = run_and_agree(lambda: [d.mkdir(parents=True, exist_ok=True)
                                                for d in (self.output_dir, shared or self.output_dir)],
                                       self.is_main, self.accelerator.device)
        if not created:
            reason = f": {getattr(error, 'strerror', None) or error}" if error is not None else " on rank 0"
            raise UsageError(f"cannot create the output directory {self.output_dir}{reason}")
        if shared is not None:
            check_every_node_sees(shared, self.accelerator)
        self._lock.acquire()
        self.checkpoints.restore_replaced()  # before resolving: an interrupted re-save must not hide a checkpoint
        resolution = resolve_resume(cfg.resume, storage, cfg.verify_checksums)
        for skipped in resolution.skipped:
            logger.warning(f"skipping damaged checkpoint {skipped}")
        if resolution.path is None:
            existing = storage.step_names()
            if existing and not cfg.overwrite:
                raise UsageError(f"{storage.url()} already holds {len(existing)} checkpoint(s) (newest "
                                 f"{existing[-1]}); resume with --resume latest, or pass --overwrite to "
                                 f"start fresh and delete them")
            if existing:
                logger.warning(f"--overwrite: deleting {self.checkpoints.discard_all()} old checkpoint(s)")
            self.metrics.reset()
            self.metrics.event("start", 0, world_size=self.accelerator.num_processes, task=self.task.name,
                               fingerprint=self.task.fingerprint, total_steps=self.total_steps)
            self.train_data.seek(0)
        else:
            self._resume_from(resolution.path)  # the data is sought to the checkpoint's position there
        self.checkpoints.clean_stale()  # only now: a refused start must not touch a run's leftovers
        if self.is_main:
            write_config(self.config, self.output_dir / "config.yaml")
        self._init_trackers()
        logger.info(f"{self.task.name}: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                    f"{self.accelerator.num_processes} process(es) on {self.accelerator.device}, "
                    f"{self.train_data.describe()}, {self.train_data.steps_per_epoch or 'unknown'} steps per "
                    f"epoch, {self.total_steps} steps planned")

    def _resume_from(self, source: Path | str) -> None:
        """Resumes from a checkpoint directory, or an object-store checkpoint (first downloaded by each node)."""
        path = self.checkpoints.fetch(source)
        saved = resume_checks.read_checkpoint_state(path)
        resume_checks.check_compatible(saved, self.task, self.config, self.accelerator.unwrap_model(self.model), path)
        self.train_data.check_resume(saved.get("data_position"), saved.get("world_size", 1))
        loaded = self.checkpoints.load(path, fallback_seed=self.config.train.seed)
        known = {k: v for k, v in loaded.items() if k in TrainerState.__dataclass_fields__}
        self.state = TrainerState(**{**known, "world_size": self.accelerator.num_processes})
        if loaded.get("world_size", 1) != self.accelerator.num_processes and self.train_data.kind == "map":
            logger.warning(f"world size changed from {loaded.get('world_size')} to {self.accelerator.num_processes}: "
                           f"continuing at sample {self.state.epoch_samples_seen} of epoch {self.state.epoch}; "
                           f"the run is correct but not bit-identical to an uninterrupted one")
        self.train_data.seek(self.state.epoch, self.state.epoch_samples_seen, self.state.data_position)
        self._continue_schedule(loaded)
        self._continue_accumulation(loaded)
        self._check_resume_certificate(saved.get("resume_certificate"), path)  # before anything is rewritten
        dropped = self.metrics.rewind(self.state.global_step)
        self.metrics.event("resume", self.state.global_step, world_size=self.accelerator.num_processes,
                           checkpoint=str(source), from_world_size=loaded.get("world_size"), dropped_records=dropped)
        logger.info(f"resumed from {source} at step {self.state.global_step} (epoch {self.state.epoch}, "
                    f"sample {self.state.epoch_samples_seen} of the epoch)")

    def _lr_plan(self) -> LRPlan:
        cfg = self.config.train
        return LRPlan(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)

    def _continue_schedule(self, loaded: dict[str, Any]) -> None:
        """A resume with another plan (e.g. a new --max-steps) continues on the new plan from this step."""
        saved, plan, step = LRPlan.from_dict(loaded.get("lr_plan")), self._lr_plan(), self.state.global_step
        if saved is None or saved == plan:
            return  # the same plan: the loaded scheduler and optimizer state continue it exactly
        scheduler = self.scheduler.scheduler
        logger.warning(plan_change(saved, plan, step, scheduler.base_lrs[0]))
        # The loaded optimizer holds the old plan's lr for the next step; set the new plan's, as LambdaLR would.
        factor = plan.factor()(step)
        for group, base_lr in zip(self.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base_lr * factor
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # noqa: SLF001

    def _continue_accumulation(self, loaded: dict[str, Any]) -> None:
        """Accelerate syncs gradients when its restored micro-step counter is a multiple of grad_accum; a
        checkpoint is always at an optimizer-step boundary, so a new grad_accum restarts the count at 0."""
        saved = loaded.get("grad_accum") or ((loaded.get("config") or {}).get("train") or {}).get("grad_accum")
        now = self.config.train.grad_accum
        if saved is None or int(saved) == now:
            return
        self.accelerator.step = 0
        logger.warning(f"grad_accum changed from {saved} to {now}: each optimizer step now takes {now} micro-batches "
                       f"per rank instead of {saved}; the run continues at sample {self.state.epoch_samples_seen} of "
                       f"epoch {self.state.epoch}")

    def _init_trackers(self) -> None:
        if self.config.eval.log_with == "none":
            return
        # After a resume from step S, TensorBoard hides what the interrupted run logged after S.
        purge = {"tensorboard": {"purge_step": self.state.global_step + 1}} if self.state.global_step else {}
        self.accelerator.init_trackers(self.task.name.replace(":", "_"), init_kwargs=purge,
                                       config={k: v for k, v in self.config.flat().items()
                                               if isinstance(v, (int, float, str, bool))})
