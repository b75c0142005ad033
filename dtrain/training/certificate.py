"""The resume certificate: what the next optimizer step will use, recorded at save time, checked on resume.

Each checkpoint records, per rank, a digest of the next micro-batch (the sample indices, or the stream position),
of the rank's RNG state, and the learning rate the next step will use. After a resume, before the first step,
every rank recomputes them from the restored state. Equal digests mean the resumed run is about to do exactly what
the uninterrupted one would have done; a difference means the dataset, the sampler, the world size or the
schedule changed, and the certificate names which. The comparison is one all-reduce, so every rank reaches the
same verdict (a warning, or exit 2 with --strict-resume).

This is a cheap check of the inputs of the next step, not a proof of the whole run: `dtrain verify-resume`
remains the offline proof (a straight run against a stopped and resumed one).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

from dtrain.distributed import all_reduce_max, is_distributed

FORMAT = "dtrain-resume-certificate/1"
CHECKS = ("next_batch", "rng", "lr")  # the order of the flags in the agreement


def digest(*parts: Any) -> str:
    """sha256 of the parts' bytes (tensors and arrays by content, anything else by repr)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, (bytes, bytearray)):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()


def rng_digest() -> str:
    """This process's Python, NumPy, torch CPU (and CUDA) generator states, in one digest."""
    numpy_state = np.random.get_state()
    parts: list[Any] = [random.getstate(), numpy_state[0], numpy_state[1], *numpy_state[2:],
                        torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.extend(torch.cuda.get_rng_state_all())
    return digest(*parts)


def lr_digest(learning_rates: list[float]) -> str:
    return digest([float(lr).hex() for lr in learning_rates])


def local_entry(next_batch: str, learning_rates: list[float]) -> dict[str, str]:
    """This rank's part of the certificate."""
    return {"next_batch": next_batch, "rng": rng_digest(), "lr": lr_digest(learning_rates)}


def gather_certificate(entry: dict[str, str], world_size: int) -> dict[str, Any]:
    """Collects every rank's entry (call on every rank at the same point); the result is JSON-able."""
    if is_distributed():
        from accelerate.utils import gather_object

        ranks = gather_object([entry])
    else:
        ranks = [entry]
    return {"format": FORMAT, "world_size": world_size, "ranks": ranks}


def differences(saved: dict[str, Any] | None, entry: dict[str, str], rank: int, world_size: int) -> list[str]:
    """What differs between the saved certificate and this rank's recomputed entry (local, no collective).
    An empty list also when there is nothing to compare (an old checkpoint without a certificate)."""
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        return []
    if saved.get("world_size") != world_size:
        return ["world_size"]  # per-rank digests of another world size cannot be compared
    ranks = saved.get("ranks") or []
    if rank >= len(ranks):
        return ["world_size"]
    return [name for name in CHECKS if ranks[rank].get(name) != entry[name]]


def agree_on_differences(mine: list[str], device) -> list[str]:
    """The union of every rank's differences (one all-reduce), so that all ranks act alike."""
    names = (*CHECKS, "world_size")
    flags = all_reduce_max([1.0 if name in mine else 0.0 for name in names], device)
    return [name for name, flag in zip(names, flags) if flag]


DESCRIPTIONS = {
    "next_batch": "the samples of the next micro-batch (the dataset, its order or the sampler changed)",
    "rng": "the random number generator states (the RNG files were not restored, or something drew numbers "
           "between the restore and the first step)",
    "lr": "the learning rates the schedule gives the next steps (max_steps, epochs, warm-up or lr changed)",
    "world_size": "the number of processes (per-rank digests could not be compared)",
}


def describe(names: list[str]) -> str:
    return "; ".join(DESCRIPTIONS[name] for name in names)
