"""Random number generator state: putting it back after side work, and restoring it per rank on resume.

Accelerate's load_state restores RNG states but swallows any failure at INFO level. We restore them again
ourselves from `random_states_{rank}.pkl` (loaded with weights_only=True, never arbitrary unpickling) and say
loudly when that is impossible, e.g. for a rank that did not exist when the checkpoint was written.
"""

from __future__ import annotations

import contextlib
import random
from typing import Iterator

import numpy as np
import torch
from accelerate.logging import get_logger
from accelerate.utils import load as safe_load
from accelerate.utils import set_seed

logger = get_logger(__name__)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Runs a block (evaluation, sampling) and then puts every global RNG back as it was."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def rank_seed(base_seed: int, rank: int) -> int:
    return (base_seed * 7919 + rank * 104_729) % (2**32)


def restore(path, rank: int, fallback_seed: int) -> bool:
    """Sets this rank's RNG states from the checkpoint; returns False (after a warning) if it had to seed."""
    file = path / f"random_states_{rank}.pkl"
    if not file.exists():
        seed = rank_seed(fallback_seed, rank)
        logger.warning(f"{path.name} has no RNG state for rank {rank} (it was written with fewer ranks); "
                       f"seeding rank {rank} deterministically with {seed}", main_process_only=False)
        set_seed(seed)
        return False
    try:
        states = safe_load(file)
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
            saved = states["torch_cuda_manual_seed"]
            if len(saved) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(saved)
            else:
                torch.cuda.set_rng_state(saved[min(rank, len(saved) - 1)])
    except Exception as exc:  # noqa: BLE001 - any failure here must be loud, never silent
        seed = rank_seed(fallback_seed, rank)
        logger.warning(f"could not restore the RNG state of rank {rank} from {file} ({type(exc).__name__}: {exc}); "
                       f"seeding deterministically with {seed}: the resumed run will not be bit-identical",
                       main_process_only=False)
        set_seed(seed)
        return False
    return True
