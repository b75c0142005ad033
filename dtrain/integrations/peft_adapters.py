"""PEFT adapters (LoRA) for the causal-lm task: `--peft lora` with the `--lora-*` flags, or `--peft-config FILE`.

The model the task builds (hf_models.py) becomes the frozen base of a `peft.PeftModel` (`get_peft_model`); only
the adapter trains, and a checkpoint holds only what trains (dtrain/checkpoint/adapters.py). The adapter's
initial weights (LoRA's A matrices are random) are a function of the run's seed alone, so a resumed run, which
rebuilds base and adapter before loading the checkpoint, starts from the same tensors as the interrupted one.

peft is imported only here, lazily: without it, `--peft` is one UsageError naming the extra.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.integrations.hf_models import HF_EXTRA

ADAPTER_CONFIG = "adapter_config.json"  # peft's name for a saved config (PeftConfig.save_pretrained)


def require_peft():
    try:
        return importlib.import_module("peft")
    except ImportError as exc:
        raise UsageError(f"--peft needs the peft library, and it cannot be imported ({exc}); install the extra: "
                         f"{HF_EXTRA}") from None


def uses_peft(config: TaskConfig) -> bool:
    return config.peft != "none" or bool(config.peft_config)


def adapter_config(config: TaskConfig):
    """The PeftConfig a TaskConfig names: its --peft-config file, else a LoraConfig from the --lora-* flags
    (peft's defaults for those not given; target modules: what peft knows for the architecture)."""
    peft = require_peft()
    if config.peft_config:
        loaded = read_peft_config(config.peft_config)
        if config.peft == "lora" and str(loaded.peft_type.value if hasattr(loaded.peft_type, "value")
                                         else loaded.peft_type) != "LORA":
            raise UsageError(f"invalid value for peft_config: {config.peft_config!r} is a {loaded.peft_type} "
                             f"config and --peft is lora; accepted: a LoRA config, or no --peft")
        loaded.inference_mode = False  # a config saved with a trained adapter says inference_mode true
        return loaded
    values: dict[str, Any] = {"task_type": "CAUSAL_LM"}
    for name, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha"), ("lora_dropout", "lora_dropout")):
        if getattr(config, name) is not None:
            values[key] = getattr(config, name)
    if config.lora_target_modules:
        targets = config.lora_target_modules.strip()
        values["target_modules"] = targets if targets == "all-linear" else \
            [name.strip() for name in targets.split(",")]
    return peft.LoraConfig(**values)


def read_peft_config(source: str):
    """A PeftConfig from adapter_config.json (or the directory holding one), as PeftConfig.save_pretrained
    writes it; any peft method the installed peft knows."""
    peft = require_peft()
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / ADAPTER_CONFIG
    if not path.is_file():
        raise UsageError(f"invalid value for peft_config: {source!r} is not a file; accepted: an "
                         f"{ADAPTER_CONFIG} as PeftConfig.save_pretrained writes it, or its directory")
    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict) or "peft_type" not in values:
            raise ValueError("it holds no peft_type")
        return peft.PeftConfig.from_peft_type(**values)
    except (ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"invalid value for peft_config: {source!r} is not a peft config: {first}") from None


def wrap_with_adapter(model, config: TaskConfig, seed: int):
    """The model as the frozen base of a PeftModel with a fresh adapter (initialised from `seed`)."""
    import torch

    peft = require_peft()
    settings = adapter_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)  # not the base's own seed: the adapter's draws are its own
        try:
            return peft.get_peft_model(model, settings)
        except (ValueError, TypeError, KeyError) as exc:  # e.g. target modules the model does not have
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            field = "peft_config" if config.peft_config else "lora_target_modules"
            raise UsageError(f"invalid value for {field}: peft cannot adapt {type(model).__name__}: "
                             f"{first}") from None


def adapter_shape(model) -> dict[str, Any]:
    """The adapter settings that decide its tensors (recorded in task.shape: a resume with others is refused)."""
    settings = model.peft_config[model.active_adapter].to_dict()
    targets = settings.get("target_modules")
    shape = {"peft_type": str(settings.get("peft_type").value if hasattr(settings.get("peft_type"), "value")
                              else settings.get("peft_type")),
             "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets}
    for key in ("r", "lora_alpha", "bias", "use_dora", "modules_to_save", "use_rslora"):
        if key in settings:
            shape[key] = sorted(settings[key]) if isinstance(settings[key], (set, tuple)) else settings[key]
    return shape


def load_adapter(model, config: TaskConfig, adapter_weights: Path, frozen_base: str | None):
    """A PeftModel of `model` (the base, rebuilt as the run built it) holding a checkpoint's adapter: its
    model.safetensors (the model's own state_dict names, trainable tensors only). A base other than the one the
    checkpoint records (`frozen_base`) is refused: the adapter means nothing on it."""
    from dtrain.checkpoint.adapters import load_trainable

    peft_model = wrap_with_adapter(model, config, 0)
    load_trainable(peft_model, adapter_weights, frozen_base, str(adapter_weights))
    return peft_model
