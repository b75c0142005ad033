"""Every use of a library's private API, in one place, with the versions it was tested against.

dtrain writes the files of `Accelerator.save_state` itself (one pass, hashed while written, from a host copy for
background saves), so it must read what Accelerate prepared and registered; Accelerate has no public API for
that list. Several trainings in one process (pipeline stages, verify-resume) need Accelerate's process-wide
settings cleared between them. fsspec's path normalisation is needed to name objects relative to a prefix.
`check_versions()` runs when a training starts and warns once when the installed Accelerate is outside the range
these were tested with (pyproject.toml pins the same range).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

ACCELERATE_TESTED = ">=1.16,<1.17"  # keep in step with pyproject.toml

_warned = False


def accelerate_version_problem() -> str | None:
    """Why the installed Accelerate may not fit this dtrain (None when it is in the tested range)."""
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    installed = version("accelerate")
    if installed in SpecifierSet(ACCELERATE_TESTED):
        return None
    return (f"accelerate {installed} is installed; dtrain is tested with accelerate{ACCELERATE_TESTED}. It reads "
            f"Accelerate's private state to write save_state's files itself (dtrain/compat.py): if checkpoints "
            f"fail to save or load, install a tested version")


def check_versions() -> None:
    """Warns once per process when a library whose private API dtrain uses is outside its tested range."""
    global _warned
    problem = accelerate_version_problem()
    if problem and not _warned:
        _warned = True
        warnings.warn(problem, RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------------------------------------- Accelerator

def prepared_models(accelerator) -> list:
    return accelerator._models  # noqa: SLF001


def prepared_optimizers(accelerator) -> list:
    return accelerator._optimizers  # noqa: SLF001


def prepared_schedulers(accelerator) -> list:
    return accelerator._schedulers  # noqa: SLF001


def registered_objects(accelerator) -> list:
    """Objects registered with `register_for_checkpointing` (saved as custom_checkpoint_{i}.pkl)."""
    return accelerator._custom_objects  # noqa: SLF001


@contextlib.contextmanager
def registered_objects_hidden(accelerator) -> Iterator[list]:
    """While the block runs, `load_state` sees no registered objects (it would unpickle their files with
    weights_only=False); yields them, for the caller to restore safely. Put back afterwards, on every path."""
    objects = accelerator._custom_objects  # noqa: SLF001
    accelerator._custom_objects = []  # noqa: SLF001
    try:
        yield objects
    finally:
        accelerator._custom_objects = objects  # noqa: SLF001


@contextlib.contextmanager
def models_and_optimizers_hidden(accelerator) -> Iterator[None]:
    """While the block runs, `load_state` sees no prepared models and optimizers (the caller loads them itself:
    a sharded PEFT checkpoint holds only the adapter, which Accelerate's FSDP loader would refuse as incomplete)."""
    models, optimizers = accelerator._models, accelerator._optimizers  # noqa: SLF001
    accelerator._models, accelerator._optimizers = [], []  # noqa: SLF001
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers  # noqa: SLF001


def snapshot_covers_state(accelerator) -> bool:
    """True when a snapshot (snapshot.py) can hold all that `save_state` would write: no save-state pre-hooks and
    no prepared dataloaders, which only `save_state` knows how to save (registered objects it can hold)."""
    return not accelerator._save_model_state_pre_hook and not accelerator._dataloaders  # noqa: SLF001


def only_dtrain_writable_state(accelerator) -> bool:
    """True when `save_state` would write nothing beyond models, optimizers, schedulers, scaler and RNG: no
    save-state pre-hooks, no prepared dataloaders, no registered objects."""
    return snapshot_covers_state(accelerator) and not accelerator._custom_objects  # noqa: SLF001


def reset_accelerate_state() -> None:
    """Clears Accelerate's process-wide settings for the next Accelerator, keeping the process group.

    An FSDP AcceleratorState writes its distributed type into the process's PartialState, which the reset keeps:
    the next Accelerator would inherit "FSDP" without a plugin ('AcceleratorState' object has no attribute
    'is_fsdp2'). The partial state gets back the type of its process group."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=False)  # noqa: SLF001
    GradientState._reset_state()  # noqa: SLF001
    shared = PartialState._shared_state  # noqa: SLF001
    if shared.get("distributed_type") == DistributedType.FSDP:
        device = shared["device"].type
        shared["distributed_type"] = (DistributedType.MULTI_CPU if device == "cpu" else DistributedType.MULTI_GPU
                                      if device == "cuda" else DistributedType(f"MULTI_{device.upper()}"))


def create_sharded_accelerator(create: Callable[[], Any], cpu: bool, **process_group_kwargs) -> Any:
    """`create()` an Accelerator that takes Accelerate's own FSDP2 path, on CPUs too.

    Accelerate 1.16 enables FSDP only for GPU-like distributed types: with `cpu=True` it silently prepares DDP.
    FSDP2 itself runs on gloo (fully_shard, DTensor, torch.distributed.checkpoint), so while the AcceleratorState
    is created the CPU process group is presented as MULTI_GPU; Accelerate then records FSDP in the partial
    state itself, as it does on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if not cpu:
        return create()
    PartialState(cpu=True, **process_group_kwargs)  # the process group, as Accelerator would create it
    shared = PartialState._shared_state  # noqa: SLF001
    masked = shared.get("distributed_type") == DistributedType.MULTI_CPU
    if masked:
        shared["distributed_type"] = DistributedType.MULTI_GPU
    try:
        return create()
    finally:
        if masked and shared.get("distributed_type") == DistributedType.MULTI_GPU:
            shared["distributed_type"] = DistributedType.MULTI_CPU  # FSDP was not taken: leave it as it was


def torch_accelerator_backend() -> tuple[str | None, Any]:
    """(device type, its torch module) of the accelerator Accelerate saves RNG state for (None on the CPU)."""
    from accelerate.utils import get_torch_accelerator_backend

    return get_torch_accelerator_backend()


# ------------------------------------------------------------------------------------------- fsspec

def strip_protocol(fs, path: str) -> str:
    """A path as the filesystem's listings spell it (fsspec's own normalisation)."""
    return fs._strip_protocol(path)  # noqa: SLF001
