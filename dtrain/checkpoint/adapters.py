"""Checkpoints of an adapter on a frozen base (a `peft.PeftModel`, e.g. LoRA): only what trains is saved.

A PEFT model is a frozen base model with small trainable adapter tensors injected into it. Saving the base with
every checkpoint (what `Accelerator.save_state` does) costs the whole model's bytes per save for tensors that
never change, so a checkpoint of a PEFT model holds, in `model.safetensors` under the model's own state_dict
names, only the tensors that train; the optimizer state covers only those already (frozen parameters get none).
The base is rebuilt from what the run names (`--model`, or a config and a seed) and identified by a fingerprint
of its tensors computed once at start (`frozen_base_identity`), which each checkpoint records; a resume whose
base has another fingerprint is refused (training/resume.py).

`Accelerator.load_state(dir, strict=False)` still loads such a checkpoint (safetensors' load_model, not strict:
the frozen tensors stay as the rebuilt base has them); dtrain checks beforehand that the file holds exactly the
model's trainable tensors. peft is looked up in `sys.modules` only: a run that never imported it has no PEFT
model, and this module never imports it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from dtrain.checksum import DEFAULT_CHECKSUM, new_hasher


def unwrapped(model: nn.Module) -> nn.Module:
    """The model under DDP's (and torch.compile's) wrappers; FSDP2 shards in place and wraps nothing."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else \
            getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def is_adapter_model(model: nn.Module) -> bool:
    """Whether `model` (possibly wrapped) is a peft.PeftModel: a frozen base with trainable adapters."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(unwrapped(model), peft.PeftModel)


def trainable_names(model: nn.Module) -> set[str]:
    """The state_dict names of the model's trainable parameters (with the wrappers' prefixes, if any)."""
    return {name for name, parameter in model.named_parameters(remove_duplicate=False) if parameter.requires_grad}


def only_trainable(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """`state` (the model's state_dict) without its frozen tensors, in the same order and container type."""
    keep = trainable_names(model)
    return type(state)((name, value) for name, value in state.items() if name in keep)


def frozen_base_identity(model: nn.Module, algorithm: str = DEFAULT_CHECKSUM) -> str | None:
    """A fingerprint of a PEFT model's frozen tensors (names, dtypes, shapes and bytes), None for other models.

    Computed once, before the model is prepared (the tensors are whole then, on any world size and sharding).
    The manifest's fast checksum is used: it tells a changed or other base from the same one, which is what a
    resume needs to know (it is no signature). About 3 s per 28 GB (7B parameters in fp32) on one core."""
    if not is_adapter_model(model):
        return None
    model = unwrapped(model)
    keep = trainable_names(model)
    hasher, tensors, total = new_hasher(algorithm), 0, 0
    for name, tensor in model.state_dict().items():
        if name in keep or not isinstance(tensor, torch.Tensor):
            continue
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        hasher.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        hasher.update(memoryview(data.numpy()))
        tensors, total = tensors + 1, total + data.numel()
    return f"{algorithm}:{hasher.hexdigest()}#tensors={tensors}#bytes={total}"


def load_trainable(model: nn.Module, weights, recorded_base: str | None, source: str) -> None:
    """Fills a PEFT model's trainable tensors from a file that holds only them (an adapter-only checkpoint's
    model.safetensors, or its safetensors export); the frozen base stays as rebuilt. Raises UsageError when the
    rebuilt base is not the one `recorded_base` names, or the file lacks a trainable tensor or holds another."""
    from safetensors.torch import load_file

    from dtrain.errors import UsageError

    now = frozen_base_identity(model)
    if recorded_base and now != recorded_base:
        raise UsageError(f"{source}: the base model rebuilt from its config is not the one its adapter was "
                         f"trained on (fingerprint {recorded_base}, now {now}); pass the --model it was trained on")
    saved = load_file(str(weights))
    missing = sorted(trainable_names(model) - saved.keys())
    unexpected = sorted(saved.keys() - model.state_dict().keys())
    if missing or unexpected:
        raise UsageError(f"{source} does not fit the rebuilt adapter model (missing: {missing[:3]}; not in the "
                         f"model: {unexpected[:3]})")
    model.load_state_dict(saved, strict=False)
