"""Evaluation during training: the eval loader, the metrics (summed over every rank), samples, early stopping.

Evaluation consumes no training randomness (every global RNG is put back afterwards), so a resumed run draws
exactly the numbers an uninterrupted one would. Every rank runs the same number of eval batches: the eval split
is sharded with padding (ShardedEvalSampler), and the padding batches only keep the forward passes in step.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, send_to_device
from torch.utils.data import IterableDataset

from dtrain.config import Config
from dtrain.data import ShardedEvalSampler, make_loader
from dtrain.data.stream import EvalStream
from dtrain.rng import preserved_rng
from dtrain.tasks import Task
from dtrain.tasks.base import evaluation_sums, metrics_from_sums
from dtrain.utils import atomic_write_text, warn_once

logger = get_logger(__name__)


class EarlyStopping:
    """The best value of the monitored metric so far, and whether patience ran out (restorable)."""

    FIELDS = ("best_metric", "best_step", "evals_without_improvement", "stopped_early")

    def __init__(self, monitor: str, mode: str, patience: int):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0
        self.stopped_early = False

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Counts one evaluation; True when it just ran out of patience."""
        value = metrics.get(self.monitor)
        if value is None:
            logger.warning(f"monitor {self.monitor!r} is not among the eval metrics {sorted(metrics)}")
            return False
        if self.best_metric is None or (value < self.best_metric if self.mode == "min" else value > self.best_metric):
            self.best_metric, self.best_step, self.evals_without_improvement = value, step, 0
        else:
            self.evals_without_improvement += 1
        if self.patience and self.evals_without_improvement >= self.patience and not self.stopped_early:
            self.stopped_early = True
            logger.info(f"early stopping: {self.monitor} did not improve for {self.evals_without_improvement} evals")
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_metric, self.best_step = state.get("best_metric"), state.get("best_step")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.stopped_early = bool(state.get("stopped_early", False))


class Evaluator:
    """Runs the task's evaluation and sample at the trainer's eval points; remembers the last result."""

    def __init__(self, task: Task, config: Config, accelerator, output_dir: Path):
        self.task, self.config, self.accelerator = task, config, accelerator
        self.samples_dir = output_dir / "samples"
        self.loader = self._build_loader()
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None

    def _build_loader(self):
        acc, eval_cfg = self.accelerator, self.config.eval
        batch_size = self.task.eval_batch_size or self.config.train.batch_size
        data = self.task.eval_data
        if isinstance(data, IterableDataset):
            return EvalStream(data, batch_size, self.task.collate_fn, eval_cfg.eval_max_batches)
        if data is None or not len(data):
            return None
        sampler = ShardedEvalSampler(len(data), batch_size, acc.process_index, acc.num_processes,
                                     eval_cfg.eval_max_batches)
        return make_loader(data, sampler, self.task.collate_fn, 0, self.config.train.seed)

    @property
    def enabled(self) -> bool:
        return self.loader is not None

    def due(self, step: int, last_step: bool) -> bool:
        """Every `eval_every_steps`, and at the last step (so the final checkpoint carries the metric)."""
        every = self.config.eval.eval_every_steps
        return self.enabled and (bool(every and step % every == 0) or last_step)

    def evaluated_at(self, step: int) -> bool:
        return self.last_eval_step == step

    def metric_at(self, step: int) -> float | None:
        """The monitored metric, when it was measured at `step` (what a checkpoint of that step records)."""
        return self.last_eval.get(self.config.eval.monitor) if self.evaluated_at(step) else None

    def evaluate(self, model, step: int) -> tuple[dict[str, float], str | None]:
        """(metrics summed over every rank, the sample text on the main process) at optimizer step `step`."""
        device = self.accelerator.device
        model = self._eval_model(model)
        # The padding batches come last (ShardedEvalSampler); only the real ones count.
        real = getattr(getattr(self.loader, "batch_sampler", None), "real_batches", None)  # None: all real
        with preserved_rng():
            model.eval()
            with torch.no_grad(), self.accelerator.autocast():
                batches = iter(self.loader)
                sums = evaluation_sums(self.task, model, itertools.islice(batches, real), device)
                for batch in batches:
                    for key in self.task.evaluate(model, send_to_device(batch, device)):
                        sums.setdefault(key, torch.zeros((), dtype=torch.float64))  # a rank with no real batch
                sample = self._write_sample(model, step)
            model.train()
        keys = sorted(sums)
        totals = self.accelerator.reduce(torch.stack([sums[k] for k in keys]).to(device),
                                         reduction="sum").cpu().tolist()
        self.last_eval, self.last_eval_step = metrics_from_sums(dict(zip(keys, totals))), step
        return self.last_eval, sample

    def _eval_model(self, model):
        """Where parameters are sharded (FSDP, DeepSpeed) the prepared model, whose forward pass is a collective;
        elsewhere the plain module: DDP's wrapper adds nothing to a forward without gradients, and would hide
        methods such as `generate`."""
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                                 DistributedType.MEGATRON_LM):
            return model
        return self.accelerator.unwrap_model(model)

    def _write_sample(self, model, step: int) -> str | None:
        """Every rank generates the same sample (under sharding each forward pass is a collective); the main
        process writes it to samples/step_N.txt."""
        if self.task.sample is None:
            return None
        generator = torch.Generator(device=self.accelerator.device).manual_seed(self.config.train.seed + step)
        text = self.task.sample(model, generator)
        if not self.accelerator.is_main_process:
            return None
        if self.samples_dir.is_symlink():  # a planted link would have dtrain write wherever it points
            warn_once(f"not writing samples: {self.samples_dir} is a symbolic link (remove it)")
            return text
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        # A fresh temp file renamed into place: a link planted at samples/step_N.txt is replaced, never followed.
        atomic_write_text(self.samples_dir / f"step_{step:09d}.txt", text, durable=False)
        return text

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval": self.last_eval, "last_eval_step": self.last_eval_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_eval = dict(state.get("last_eval") or {})
        self.last_eval_step = state.get("last_eval_step")
