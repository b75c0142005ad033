"""How evaluation data is split across ranks."""

from __future__ import annotations

import math
from typing import Iterator


class ShardedEvalSampler:
    """Eval indices split across ranks, with the same number of batches on every rank.

    Rank r takes samples r, r + W, r + 2W, ... in batches; its first `real_batches` batches hold them. Where
    another rank has more batches (the shards differ by one sample, or this rank has none), the remaining
    batches are padding: one repeated sample each, run so that every rank makes the same number of forward
    passes (under FSDP or ZeRO-3 a forward pass is a collective), and left out of the metrics, which therefore
    count every sample exactly once. `max_batches` caps the batches per rank (0: the whole split).
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, max_batches: int = 0):
        indices = list(range(rank, num_samples, world_size))
        longest_shard = math.ceil(num_samples / world_size)
        batches_per_rank = math.ceil(longest_shard / batch_size)
        if max_batches:
            batches_per_rank = min(batches_per_rank, max_batches)
        real = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)][:batches_per_rank]
        self.real_batches = len(real)
        padding = [indices[0] if indices else 0]  # any valid sample: its result is dropped
        self.batches = real + [padding] * (batches_per_rank - self.real_batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
