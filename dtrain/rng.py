"""Random number generator state: putting it back after side work, and restoring it per rank on resume.

Accelerate's load_state restores RNG states but swallows any failure at INFO level. We restore them again
ourselves from `random_states_{rank}.pkl` (loaded with weights_only=True, never arbitrary unpickling), say loudly
when a rank did not exist when the checkpoint was written, and refuse a state file that cannot be loaded.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import load as safe_load
from accelerate.utils import set_seed

from dtrain.compat import torch_accelerator_backend

logger = get_logger(__name__)


class ProcessRNG:
    """Every global generator of this process (Python, NumPy, torch CPU and the accelerator's), as one state.

    `state_dict()` holds the keys and values `Accelerator.save_state` writes to `random_states_{rank}.pkl`, the
    device generator under Accelerate's name for it (`torch_{device}_manual_seed`: cuda, xpu, mps, npu, ...), so
    dtrain's writer and `save_state` produce the same file, and `load_state_dict` restores either.
    """

    def state_dict(self, device: bool = True) -> dict[str, Any]:
        """`device=False` leaves the accelerator's generator out (it is then left as it is on load)."""
        states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                  "torch_manual_seed": torch.get_rng_state()}
        key, module, device_type = _device_generator() if device else (None, None, None)
        if key is not None:
            if module is torch.accelerator:
                random_api = getattr(torch.accelerator, "random", None)
                states[key] = (random_api.get_rng_state() if random_api is not None
                               else torch.get_device_module(device_type).get_rng_state())
            elif device_type == "mps":
                states[key] = module.get_rng_state()
            else:
                states[key] = module.get_rng_state_all()
        return states

    def load_state_dict(self, states: dict[str, Any], rank: int = 0) -> None:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        key, module, device_type = _device_generator()
        if key is None or key not in states:
            return
        saved = states[key]
        if module is torch.accelerator or device_type == "mps":
            torch.get_device_module(device_type).set_rng_state(saved)
        elif len(saved) == module.device_count():
            module.set_rng_state_all(saved)
        else:  # written on a machine with another number of devices: this rank's own device generator
            module.set_rng_state(saved[min(rank, len(saved) - 1)])


def _device_generator() -> tuple[str | None, Any, str | None]:
    """(Accelerate's key for the device generator, the module that holds it, the device type); Nones on a CPU."""
    device_type, module = torch_accelerator_backend()
    if device_type is None:
        return None, None, None
    return f"torch_{device_type}_manual_seed", module, device_type


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Runs a block (evaluation, sampling) and then puts every global RNG back as it was."""
    generators = ProcessRNG()
    # Reading CUDA's generators would initialise CUDA in a run that never used it (--device cpu on a GPU host).
    saved = generators.state_dict(device=not torch.cuda.is_available() or torch.cuda.is_initialized())
    try:
        yield
    finally:
        generators.load_state_dict(saved)


def rank_seed(base_seed: int, rank: int) -> int:
    return (base_seed * 7919 + rank * 104_729) % (2**32)


def restore(path, rank: int, fallback_seed: int) -> bool:
    """Sets this rank's RNG states from the checkpoint; returns False (after a warning) if it had to seed because
    the checkpoint has no state for this rank. A state file that is there but cannot be loaded raises ValueError:
    the checkpoint is unusable, like one whose optimizer cannot be loaded, and an older one may stand in for it."""
    file = path / f"random_states_{rank}.pkl"
    if not file.exists():
        seed = rank_seed(fallback_seed, rank)
        logger.warning(f"{path.name} has no RNG state for rank {rank} (it was written with fewer ranks); "
                       f"seeding rank {rank} deterministically with {seed}", main_process_only=False)
        set_seed(seed)
        return False
    try:
        ProcessRNG().load_state_dict(safe_load(file, weights_only=True), rank)
    except Exception as exc:  # noqa: BLE001 - any failure here must be loud, never silent
        raise ValueError(f"{file.name}: {type(exc).__name__}: {exc}") from None
    return True
