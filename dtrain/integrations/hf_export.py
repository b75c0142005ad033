"""`dtrain ckpt export RUN --format hf --out DIR`: a causal-lm checkpoint as a Hugging Face model directory.

`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it: the model config,
safetensors weights (tied weights stay tied: transformers writes the shared tensor once and re-ties on load),
the generation config and the tokenizer, plus `dtrain_export.json` naming the source checkpoint. The directory
is written under a dot-name beside DIR and renamed into place, so DIR is never half written; an earlier dtrain
export at DIR is replaced, anything else there is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from dtrain.checkpoint.layout import read_trainer_state
from dtrain.checkpoint.sharded import is_sharded, model_weights_file
from dtrain.errors import UsageError
from dtrain.utils import fsync_path, human_size, remove_tree
from dtrain.weights import EXPORT_DTYPES, torch_dtype

MARKER = "dtrain_export.json"
EXPORT_FORMAT = "dtrain-hf-export/1"


def _model_of_checkpoint(checkpoint: Path, state: dict[str, Any]):
    """The run's model (its architecture and tokenizer from the run's config) holding the checkpoint's weights."""
    from dtrain.config import config_from_dict
    from dtrain.integrations.hf_models import build_model_and_tokenizer
    from dtrain.weights import load_weights

    config = config_from_dict(state.get("config") or {})
    task_config = dataclasses.replace(config.task, gradient_checkpointing=False)
    model, tokenizer = build_model_and_tokenizer(task_config, config.train.seed)
    model.config.use_cache = True  # for inference
    with model_weights_file(checkpoint) as weights:  # sharded: every rank's shards gathered on this process
        load_weights(model, weights)  # ties intact; a file that does not fit: UsageError
    return model, tokenizer


def export_hf(checkpoint: Path, out: Path, dtype: str = "fp32") -> dict[str, Any]:
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"invalid value for --dtype: {dtype!r}; accepted: {', '.join(EXPORT_DTYPES)}")
    state = read_trainer_state(checkpoint)
    if state.get("task") != "causal-lm":
        raise UsageError(f"--format hf: {checkpoint} was written by task {state.get('task')!r}; accepted: a "
                         f"causal-lm checkpoint (use --format safetensors for other tasks)")
    if not (checkpoint / "model.safetensors").is_file() and not is_sharded(checkpoint):
        raise UsageError(f"{checkpoint} holds no model weights (neither model.safetensors nor sharded shards)")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER).is_file())):
        raise UsageError(f"invalid value for --out: {out} exists and is not an earlier dtrain export; accepted: a "
                         f"new directory path")
    model, tokenizer = _model_of_checkpoint(checkpoint, state)
    model.to(torch_dtype(dtype))
    info = {"format": EXPORT_FORMAT, "task": "causal-lm", "step": state.get("global_step"),
            "epoch": state.get("epoch"), "dtype": dtype, "source": str(checkpoint.resolve()),
            "checkpoint_metric": state.get("checkpoint_metric")}
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if temp.exists():
        remove_tree(temp)
    try:
        model.save_pretrained(temp)  # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(temp)
        (temp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        for path in temp.iterdir():
            fsync_path(path)
        fsync_path(temp)
        if out.exists():
            remove_tree(out)  # an earlier export (checked above); the new one is complete beside it
        os.rename(temp, out)
        fsync_path(out.parent)
    finally:
        if temp.exists():
            remove_tree(temp)
    files = sorted(p.name for p in out.iterdir())
    return {**info, "path": str(out), "files": files, "bytes": sum((out / f).stat().st_size for f in files)}


def export_hf_command(checkpoint: Path, out: Path, dtype: str) -> None:
    info = export_hf(checkpoint, out, dtype)
    print(f"exported {checkpoint} (step {info['step']}, causal-lm) to {info['path']} as a Hugging Face model "
          f"({dtype}, {human_size(info['bytes'])}): load it with AutoModelForCausalLM.from_pretrained and "
          f"AutoTokenizer.from_pretrained")
