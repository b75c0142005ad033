"""`dtrain ckpt export`: one safetensors file of a checkpoint's model weights, for inference.

The file's metadata carries what is needed to use it without the run: the config (JSON), the step and epoch,
the task and the source checkpoint. `load_exported(path)` rebuilds the task's model from that config and loads
the weights; `safetensors.torch.load_file(path)` reads the plain tensors.

A sharded (FSDP2) checkpoint is consolidated on this one process first, whatever world size wrote it.
Tied weights are stored once, under the name the checkpoint holds (see dtrain/weights.py):
`safetensors.torch.load_model(model, path)` and `load_exported` fill the shared tensor and keep the tie.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dtrain.checkpoint.adapters import is_adapter_model, load_trainable
from dtrain.checkpoint.layout import read_trainer_state
from dtrain.checkpoint.resolve import select_checkpoint
from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR, is_sharded, model_weights_file
from dtrain.commands.ckpt import local_copy
from dtrain.errors import UsageError
from dtrain.weights import EXPORT_DTYPES, torch_dtype
from dtrain.utils import fresh_temp_name, human_size

EXPORT_FORMAT = "dtrain-export/1"


def export_checkpoint(checkpoint: Path, out: Path, dtype: str = "fp32", source: str | None = None) -> dict[str, Any]:
    """Writes the checkpoint's model weights (floating tensors cast to `dtype`) to `out`, atomically.
    `source`: what the metadata names as the origin (default: the checkpoint dir; a URI for a downloaded one)."""
    from safetensors.torch import load_file, save_file

    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"invalid value for --dtype: {dtype!r}; accepted: {', '.join(EXPORT_DTYPES)}")
    if not (checkpoint / "model.safetensors").is_file() and not is_sharded(checkpoint):
        raise UsageError(f"{checkpoint} holds no model weights (neither model.safetensors nor sharded "
                         f"{SHARDED_MODEL_DIR}/)")
    if out.is_dir():
        raise UsageError(f"invalid value for --out: {out} is a directory; accepted: a file path such as model.safetensors")
    state = read_trainer_state(checkpoint)
    target = torch_dtype(dtype)
    with model_weights_file(checkpoint) as weights:  # a sharded checkpoint: every rank's shards, gathered here
        tensors = {name: t.to(target) if t.is_floating_point() else t for name, t in load_file(str(weights)).items()}
    metadata = {
        "format": EXPORT_FORMAT, "task": str(state.get("task")), "step": str(state.get("global_step")),
        "epoch": str(state.get("epoch")), "dtype": dtype, "source": source or str(checkpoint.resolve()),
        "config": json.dumps(state.get("config") or {}),
        "checkpoint_metric": json.dumps(state.get("checkpoint_metric")),
        "frozen_base": str((state.get("shape") or {}).get("frozen_base") or ""),  # LoRA: the adapter's base
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = fresh_temp_name(out)  # unguessable: no link can be planted for save_file to follow
    try:
        save_file(tensors, str(temp), metadata=metadata)
        os.replace(temp, out)  # readers never see half a file
    finally:
        temp.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors), **metadata}


def read_export_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(path: str | Path, task: str | None = None, trust_task: bool = False):
    """Rebuilds the task's model from the exported config and loads the weights. Returns (model, config).

    A built-in task recorded in the file is rebuilt as it is; a user task only when `task` names it (imported as
    `--task` does) or `trust_task` accepts the recorded name: the file's metadata is not trusted to pick code."""
    from dtrain.config import config_from_dict
    from dtrain.tasks import build_task, task_recorded_in
    from dtrain.weights import load_weights

    metadata = read_export_metadata(path)
    if metadata.get("format") != EXPORT_FORMAT:
        raise UsageError(f"{path} is not a dtrain export (its metadata has no format {EXPORT_FORMAT!r})")
    try:
        recorded = json.loads(metadata["config"])
    except (KeyError, ValueError):
        raise UsageError(f"{path}: its metadata holds no readable config") from None
    if not isinstance(recorded, dict):
        raise UsageError(f"{path}: its metadata holds no readable config")
    config = config_from_dict(recorded)
    config.task.task, search_working_dir = task_recorded_in(str(path), config.task.task, task, trust_task)
    model = build_task(config.task, config.train.seed, search_working_dir).model
    if is_adapter_model(model):  # a LoRA run's export holds the adapter; the base is rebuilt from the config
        load_trainable(model, path, metadata.get("frozen_base") or None, str(path))
    else:
        load_weights(model, path)  # ties intact; cast to the model's dtype
    return model, config


def export_command(args) -> None:
    checkpoint = select_checkpoint(args.path, args.which)
    with local_copy(checkpoint) as local:  # an object-store checkpoint: its weights, downloaded
        if getattr(args, "format", "safetensors") == "hf":
            from dtrain.integrations.hf_export import export_hf_command

            return export_hf_command(local, Path(args.out), args.dtype)
        if getattr(args, "format", "safetensors") == "peft":
            from dtrain.integrations.hf_export import export_peft_command

            return export_peft_command(local, Path(args.out), args.dtype)
        info = export_checkpoint(local, Path(args.out), args.dtype, source=str(checkpoint))
    print(f"exported {checkpoint} (step {info['step']}, {info['task']}) to {info['path']}: "
          f"{info['tensors']} tensors as {args.dtype}, {human_size(info['bytes'])}")
