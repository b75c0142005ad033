"""Creating the Accelerator for a config, with the checks that keep CPU and multi-process runs honest."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs,
                              ProjectConfiguration)

from dtrain.compat import check_versions, create_sharded_accelerator, reset_accelerate_state
from dtrain.config import Config
from dtrain.distributed import collective_timeout, set_collective_timeout
from dtrain.errors import UsageError

logger = get_logger(__name__)


def launcher_settings() -> dict[str, str]:
    """What `accelerate launch` (its flags or its config file) asked for; it passes them as environment
    variables. Empty under torchrun or plain python."""
    settings = {}
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if precision in ("no", "fp16", "bf16"):
        settings["mixed_precision"] = precision
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        settings["device"] = "cpu"
    return settings


def resolve_device(requested: str) -> str:
    if requested == "auto":
        if launcher_settings().get("device") == "cpu":
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("invalid value for device: 'cuda': no CUDA GPU is available here; accepted: auto, cpu")
    return requested


def resolve_sharding(requested: str | None) -> tuple[str, str | None]:
    """dtrain's own setting wins; unset, the launcher's (an accelerate config with `distributed_type: FSDP`); else
    none. Returns the sharding and, when dtrain's setting overrides the launcher's, what to say."""
    launcher = "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes") else None
    if requested is None:
        if launcher and os.environ.get("FSDP_VERSION", "2") != "2":
            return "fsdp2", "the launcher asked for FSDP version 1; dtrain shards with FSDP2"
        return launcher or "none", None
    if launcher is not None and launcher != requested:
        return requested, f"the launcher asked for FSDP; --sharding {requested!r} (dtrain's flag or config file) wins"
    return requested, None


def resolve_precision(requested: str | None) -> tuple[str, str | None]:
    """dtrain's own setting (flag or config file) wins; unset, the launcher's; else no.
    Returns the precision and, when dtrain's setting overrides a different launcher setting, what to say."""
    launcher = launcher_settings().get("mixed_precision")
    if requested is None:
        return launcher or "no", None
    if launcher is not None and launcher != requested:
        return requested, (f"the launcher asked for mixed precision {launcher!r}; --mixed-precision "
                           f"{requested!r} (dtrain's flag or config file) wins")
    return requested, None


def make_accelerator(config: Config) -> Accelerator:
    device = resolve_device(config.train.device)
    precision, conflict = resolve_precision(config.train.mixed_precision)
    if device == "cpu" and precision == "fp16":
        raise UsageError("invalid value for mixed_precision: 'fp16' needs a GPU; accepted on the CPU: no, bf16")
    if config.eval.log_with in ("tensorboard", "wandb"):
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[config.eval.log_with]():
            raise UsageError(f"invalid value for log_with: {config.eval.log_with!r}: the package is not installed "
                             f"(pip install {config.eval.log_with}); accepted here: none, all")
    sharding, sharding_note = resolve_sharding(config.train.sharding)
    launched_ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if sharding == "fsdp2" and launched_ranks < 2:
        raise UsageError("invalid value for sharding: 'fsdp2' shards across processes and this run has one; "
                         "accepted with one process: none (or launch 2 or more processes)")
    try:
        accelerator = _create(config, device, precision, sharding)
    except ValueError as exc:  # Accelerate's message for an inconsistent launch environment (MASTER_ADDR, ...)
        raise UsageError(f"could not set up Accelerate for this launch: {exc}") from None
    if launched_ranks > 1 and accelerator.num_processes != launched_ranks:
        raise UsageError(f"launched with WORLD_SIZE={launched_ranks} but Accelerate set up "
                         f"{accelerator.num_processes} process(es) ({accelerator.distributed_type}); "
                         f"refusing to train as independent single processes")
    if sharding == "fsdp2" and not (accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2):
        raise UsageError(f"sharding fsdp2 was asked for, but Accelerate set up {accelerator.distributed_type}; "
                         f"refusing to train unsharded")
    config.train.sharding = sharding  # recorded in config.yaml and every checkpoint
    check_versions()
    for note in (conflict, sharding_note):
        if note:
            logger.warning(note)  # only now: Accelerate's logger needs the Accelerator's state
    if config.train.device == "cuda" and launcher_settings().get("device") == "cpu":
        logger.warning("the launcher asked for the CPU (--cpu); --device cuda (dtrain's flag or config file) wins")
    return accelerator


def _create(config: Config, device: str, precision: str, sharding: str) -> Accelerator:
    # Accelerate keeps its settings in process-wide singletons that refuse a second, different Accelerator.
    # Several trainings may run in one process (pipeline stages, verify-resume): start each from clean settings,
    # keeping the process group (PartialState) that the launcher set up.
    reset_accelerate_state()
    log_with = None if config.eval.log_with == "none" else config.eval.log_with
    # A dead or hung peer turns into an error after this long instead of torch's 30 minutes (gloo). It applies
    # when this call creates the process group; a group the process already has keeps its own limit.
    set_collective_timeout(config.train.collective_timeout_seconds)
    def create(fsdp_plugin=None) -> Accelerator:
        return Accelerator(
            cpu=device == "cpu",  # on the CPU this is what makes multi-process runs use gloo (MULTI_CPU)
            mixed_precision=precision,
            gradient_accumulation_steps=config.train.grad_accum,
            step_scheduler_with_optimizer=False,  # we step the scheduler once per optimizer step ourselves
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=config.output_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=collective_timeout())],
            fsdp_plugin=fsdp_plugin,
        )

    if sharding == "none":
        # dtrain's --sharding none wins over the launcher's FSDP, which Accelerate reads from the environment:
        # hidden for this Accelerator only (a later pipeline stage may still follow the launcher).
        launcher_fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)
        try:
            return create()
        finally:
            if launcher_fsdp is not None:
                os.environ["ACCELERATE_USE_FSDP"] = launcher_fsdp
    # FSDP2 through Accelerate's own plugin: every parameter sharded across the ranks (per transformer block
    # where the model names its blocks, `_no_split_modules`, else as one unit), checkpoints written by every
    # rank as torch.distributed.checkpoint shards. The launcher's other FSDP settings (FSDP_* variables) apply.
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT",
                                            auto_wrap_policy="transformer_based_wrap")
    return create_sharded_accelerator(lambda: create(plugin), cpu=device == "cpu", timeout=collective_timeout())


def parameters_held(model) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model): equal when nothing is sharded."""
    from torch.distributed.tensor import DTensor

    held = total = 0
    for parameter in model.parameters():
        total += parameter.numel()  # a DTensor's numel is the global one
        held += parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()
    return held, total


def check_sharded(model, world_size: int) -> str:
    """Raises UsageError unless the prepared model is really sharded; returns how much this rank holds."""
    held, total = parameters_held(model)
    if held >= total:
        raise UsageError(f"sharding fsdp2 was asked for, but this rank holds all {total:,} parameter elements "
                         f"(nothing was sharded); refusing to train unsharded")
    return f"sharded with FSDP2 over {world_size} ranks: this rank holds {held:,} of {total:,} parameter elements"

