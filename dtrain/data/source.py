"""The training data as the Trainer sees it: "the loader from position P" and "the position now".

Two kinds, one interface (`TrainSource`), chosen by `build.build_train_source`:

- `ordered.OrderedSource`: a map-style dataset in dtrain's own order (order.ResumableBatchSampler): shuffled per
  (seed, epoch) or sequential, resumed in O(1) from a count of samples, across world-size changes.
- `stream.StatefulSource`: an IterableDataset, or a user's sampler that keeps its own state, read through
  torchdata's StatefulDataLoader; resumed from the loader's state where that is exact, else by replay.

The Trainer calls `seek(epoch, epoch_samples_seen, saved_position)` once at the start and at each new epoch,
iterates the source for the rest of the epoch, and stores `state_dict()` in trainer_state.json (restored with
`load_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator


def digest(value: Any) -> str:
    """sha256 of a JSON-able value (the certificate's name for what a micro-batch contains)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class TrainSource:
    """What the trainer needs of its training data (see the module docstring)."""

    kind: str  # "map", "stream" or "sampler"
    steps_per_epoch: int | None  # None: unknown until the data ends (a stream)
    samples_per_micro_step: int  # global samples one micro-step consumes on all ranks together

    def seek(self, epoch: int, epoch_samples_seen: int = 0, saved_position: dict | None = None) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Any]:
        """This rank's micro-batches from the position sought to the end of that epoch."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The position now, as JSON for trainer_state.json. Called on every rank at the same point (streams
        gather every rank's position)."""
        raise NotImplementedError

    def load_state_dict(self, position: dict | None, epoch: int, epoch_samples_seen: int) -> None:
        """Continues from a saved position: `epoch` and `epoch_samples_seen` are the trainer's counters saved
        with it (map-style data resumes from them alone)."""
        self.seek(epoch, epoch_samples_seen, position)

    def check_resume(self, saved_position: dict | None, saved_world_size: int) -> None:
        """Raises UsageError for a saved position this run cannot continue from (before anything is loaded)."""

    def next_batch_digest(self) -> str:
        """sha256 naming what this rank's next micro-batch will contain; consumes nothing."""
        raise NotImplementedError

    def epoch_ends_at(self, epoch_samples_seen: int) -> bool:
        """Whether no micro-batch of the epoch is left after this many samples (False when not known ahead)."""
        return False

    def describe(self) -> str:
        raise NotImplementedError
