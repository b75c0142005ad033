"""`dtrain eval`: evaluates a checkpoint on its task's eval split, on the CPU in one process.

The task is rebuilt from the config saved in the checkpoint, so the evaluation sees the same model shape and
data as training. A user task recorded there is imported only when the command line names it (`--task`) or
trusts the recorded name (`--trust-task`): whoever wrote the checkpoint chose that name. Metrics are the task's `evaluate` sums divided by the sample count, as in training (but over
the whole eval split unless `--max-batches` says otherwise). A task with a sampler (charlm) also generates a
sample, seeded as the trainer seeds it at that step.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from dtrain.checkpoint.adapters import is_adapter_model, load_trainable
from dtrain.checkpoint.layout import read_trainer_state
from dtrain.checkpoint.resolve import select_checkpoint
from dtrain.checkpoint.sharded import is_sharded, model_weights_file
from dtrain.commands.ckpt import local_copy
from dtrain.errors import UsageError


def evaluate_checkpoint(checkpoint: Path, max_batches: int = 0, batch_size: int | None = None,
                        data: str | None = None, task_name: str | None = None,
                        trust_task: bool = False) -> dict[str, Any]:
    """`task_name`: the command line's --task; `trust_task`: --trust-task (see dtrain.tasks.task_recorded_in)."""
    import torch
    from torch.utils.data import DataLoader

    from dtrain.config import config_from_dict
    from dtrain.tasks import build_task, task_recorded_in
    from dtrain.tasks.base import evaluation_sums, metrics_from_sums
    from dtrain.weights import load_weights

    state = read_trainer_state(checkpoint)
    if not isinstance(state.get("config"), dict):
        raise UsageError(f"{checkpoint} does not record the config it was trained with; cannot rebuild its task")
    config = config_from_dict(state["config"])
    if data is not None:
        config.task.data = data
    config.task.task, search_working_dir = task_recorded_in(str(checkpoint), config.task.task, task_name, trust_task)
    task = build_task(config.task, config.train.seed, search_working_dir)
    if task.eval_data is None:
        raise UsageError(f"task {task.name!r} has no eval split")
    if not (checkpoint / "model.safetensors").is_file() and not is_sharded(checkpoint):
        raise UsageError(f"{checkpoint} holds no model weights (neither model.safetensors nor sharded shards)")
    model = task.model
    with model_weights_file(checkpoint) as weights:  # sharded: every rank's shards gathered on this process
        if is_adapter_model(model):  # LoRA: the file holds the adapter; the base is rebuilt from the config
            load_trainable(model, weights, (state.get("shape") or {}).get("frozen_base"), str(checkpoint))
        else:
            load_weights(model, weights)  # tied weights stay tied
    model.eval()
    loader = DataLoader(task.eval_data, batch_size=batch_size or config.train.batch_size, shuffle=False,
                        collate_fn=task.collate_fn)
    batches = list(itertools.islice(loader, max_batches or None))
    with torch.no_grad():
        sums = evaluation_sums(task, model, batches, "cpu")
        count = float(sums.get("count", 0))
        metrics = metrics_from_sums(sums)
        step = int(state.get("global_step", 0))
        sample = None
        if task.sample is not None:
            # The trainer's seed for the sample at this step, so the text matches samples/step_N.txt.
            sample = task.sample(model, torch.Generator().manual_seed(config.train.seed + step))
    return {"checkpoint": str(checkpoint), "task": task.name, "step": step, "epoch": state.get("epoch"),
            "batches": len(batches), "samples": int(count), "metrics": metrics,
            "sample": sample}


def eval_command(args) -> None:
    checkpoint = select_checkpoint(args.path, args.which)
    with local_copy(checkpoint) as local:
        result = evaluate_checkpoint(local, args.max_batches, args.batch_size, args.data, args.task, args.trust_task)
        result["checkpoint"] = str(checkpoint)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['checkpoint']}: {result['task']} at step {result['step']}, "
          f"{result['samples']} eval samples in {result['batches']} batches")
    for name, value in sorted(result["metrics"].items()):
        print(f"  {name:<16} {value:.6g}")
    if result["sample"] is not None:
        print("sample:")
        print(result["sample"])
