"""Tiny cross-rank agreements built on one all-reduce. Every rank must call them at the same points."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_max(values: list[float], device: torch.device | str = "cpu", group=None) -> list[float]:
    """Element-wise maximum over ranks (identity in a single process). `group`: a side group (CPU tensors)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device="cpu" if group is not None else device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor.tolist()


def all_ranks_ok(ok: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True only if every rank reports ok. Doubles as a barrier that cannot hang when a rank failed."""
    return all_reduce_max([0.0 if ok else 1.0], device, group)[0] == 0.0


def new_side_group():
    """A separate gloo group for collectives issued from a background thread (never the training group)."""
    return dist.new_group(backend="gloo") if is_distributed() else None


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(value, group=None) -> list:
    """Every rank's `value` (small and picklable), in rank order, on every rank; `[value]` in one process."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out
