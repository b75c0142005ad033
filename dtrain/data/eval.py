"""How evaluation data is split across ranks."""

from __future__ import annotations

from typing import Iterator


class ShardedEvalSampler:
    """Eval indices split across ranks without padding, so summed metrics count every sample once."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, max_batches: int = 0):
        indices = list(range(rank, num_samples, world_size))
        self.batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        if max_batches:
            self.batches = self.batches[:max_batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
