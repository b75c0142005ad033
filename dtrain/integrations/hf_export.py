"""`dtrain ckpt export RUN --format hf --out DIR`: a causal-lm checkpoint as a Hugging Face model directory.

`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load it: the model config,
safetensors weights (tied weights stay tied: transformers writes the shared tensor once and re-ties on load),
the generation config and the tokenizer, plus `dtrain_export.json` naming the source checkpoint. A LoRA (PEFT)
checkpoint is merged into its base first (peft's `merge_and_unload`).

`--format peft` writes a PEFT run's adapter as peft itself saves it (`PeftModel.save_pretrained`:
`adapter_config.json` and `adapter_model.safetensors`), which `PeftModel.from_pretrained(base, DIR)` loads onto
the base the run was trained on; the tokenizer comes along. The directory
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
    """The run's model (its architecture and tokenizer from the run's config) holding the checkpoint's weights;
    a PEFT run's: its base rebuilt as the run built it, holding the checkpoint's adapter (a PeftModel)."""
    from dtrain.config import config_from_dict
    from dtrain.integrations.hf_models import build_model_and_tokenizer
    from dtrain.integrations.peft_adapters import load_adapter, uses_peft
    from dtrain.weights import load_weights

    config = config_from_dict(state.get("config") or {})
    task_config = dataclasses.replace(config.task, gradient_checkpointing=False)
    model, tokenizer = build_model_and_tokenizer(task_config, config.train.seed)
    model.config.use_cache = True  # for inference
    with model_weights_file(checkpoint) as weights:  # sharded: every rank's shards gathered on this process
        if uses_peft(task_config):
            return load_adapter(model, task_config, weights, (state.get("shape") or {}).get("frozen_base")), \
                tokenizer
        load_weights(model, weights)  # ties intact; a file that does not fit: UsageError
    return model, tokenizer


def _causal_lm_state(checkpoint: Path, out: Path, dtype: str, fmt: str) -> dict[str, Any]:
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"invalid value for --dtype: {dtype!r}; accepted: {', '.join(EXPORT_DTYPES)}")
    state = read_trainer_state(checkpoint)
    if state.get("task") != "causal-lm":
        raise UsageError(f"--format {fmt}: {checkpoint} was written by task {state.get('task')!r}; accepted: a "
                         f"causal-lm checkpoint (use --format safetensors for other tasks)")
    if not (checkpoint / "model.safetensors").is_file() and not is_sharded(checkpoint):
        raise UsageError(f"{checkpoint} holds no model weights (neither model.safetensors nor sharded shards)")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / MARKER).is_file())):
        raise UsageError(f"invalid value for --out: {out} exists and is not an earlier dtrain export; accepted: a "
                         f"new directory path")
    return state


def export_hf(checkpoint: Path, out: Path, dtype: str = "fp32") -> dict[str, Any]:
    state = _causal_lm_state(checkpoint, out, dtype, "hf")
    model, tokenizer = _model_of_checkpoint(checkpoint, state)
    if hasattr(model, "merge_and_unload"):  # a PEFT model: the adapter merged into the base's weights
        model = model.merge_and_unload()
    model.to(torch_dtype(dtype))
    info = _info(checkpoint, state, dtype, "causal-lm")
    return _write_dir(out, info, lambda temp: (model.save_pretrained(temp), tokenizer.save_pretrained(temp)))


def export_peft(checkpoint: Path, out: Path, dtype: str = "fp32") -> dict[str, Any]:
    state = _causal_lm_state(checkpoint, out, dtype, "peft")
    if not (state.get("shape") or {}).get("adapter"):
        raise UsageError(f"--format peft: {checkpoint} was trained without --peft (it holds the whole model); "
                         f"accepted: a checkpoint of a --peft run (use --format hf for this one)")
    model, tokenizer = _model_of_checkpoint(checkpoint, state)
    model.to(torch_dtype(dtype))
    info = _info(checkpoint, state, dtype, "causal-lm")
    return _write_dir(out, info, lambda temp: (model.save_pretrained(temp), tokenizer.save_pretrained(temp)))


def _info(checkpoint: Path, state: dict[str, Any], dtype: str, task: str) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "task": task, "step": state.get("global_step"), "epoch": state.get("epoch"),
            "dtype": dtype, "source": str(checkpoint.resolve()), "checkpoint_metric": state.get("checkpoint_metric")}


def _write_dir(out: Path, info: dict[str, Any], write) -> dict[str, Any]:
    """Writes a directory beside `out` with `write(temp)` and the marker, then renames it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if temp.exists():
        remove_tree(temp)
    try:
        write(temp)
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


def export_peft_command(checkpoint: Path, out: Path, dtype: str) -> None:
    info = export_peft(checkpoint, out, dtype)
    print(f"exported the adapter of {checkpoint} (step {info['step']}) to {info['path']} ({dtype}, "
          f"{human_size(info['bytes'])}): load it with PeftModel.from_pretrained(base, {info['path']})")
