"""Streams (IterableDataset) and user samplers that keep their own state, read through StatefulDataLoader.

Where the data is, is the loader's state: torchdata's StatefulDataLoader records it after every micro-batch
(the dataset's or sampler's own `state_dict()`, per worker). How a rank resumes, recorded in the checkpoint
as `resume`:

- "state": the loader state saved at the checkpoint is loaded back. Used where that state is exact: a Hugging
  Face `datasets` IterableDataset without a shuffle buffer, a torch IterableDataset with state_dict() /
  load_state_dict() that is read by one process (or says it shards itself), a user sampler with state.
- "replay": the epoch is read again from its start and the micro-batches consumed before the checkpoint are
  thrown away. Exact, but it costs the time of reading them (a warning says how many; a progress bar shows it).

Each rank reads its own part of a stream: Hugging Face datasets through `split_dataset_by_node`; a torch
IterableDataset by taking every (world_size x workers)-th sample, unless it sets `dtrain_shards_itself = True`
(then it must give each rank and worker its own samples itself). Ranks agree after every fetch whether all of
them still have a micro-batch, so an epoch ends on all ranks at the same step.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from typing import Any, Iterator

import torch
from accelerate.logging import get_logger
from torch.utils.data import IterableDataset, get_worker_info
from tqdm.auto import tqdm

from dtrain.data.source import TrainSource, digest
from dtrain.data.workers import WorkerInit
from dtrain.errors import UsageError

logger = get_logger(__name__)

SHARDS_ITSELF = "dtrain_shards_itself"
LONG_REPLAY_BATCHES = 200  # a replay this long shows a progress bar


def _hf_iterable(dataset) -> bool:
    datasets = sys.modules.get("datasets")  # a Hugging Face dataset means the library is imported already
    return datasets is not None and isinstance(dataset, datasets.IterableDataset)


def _has_shuffle_buffer(hf_dataset) -> bool:
    """Whether a Hugging Face IterableDataset shuffles through a buffer (whose contents its state omits)."""
    stack = [getattr(hf_dataset, "_ex_iterable", None)]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        if "BufferShuffled" in type(node).__name__:
            return True
        stack.append(getattr(node, "ex_iterable", None))
        stack.extend(getattr(node, "ex_iterables", None) or [])
    return False


class IterableObject(IterableDataset):
    """Any iterable object (with state_dict()/load_state_dict()/set_epoch() if it has them) as a DataLoader
    dataset."""

    def __init__(self, inner):
        self.inner = inner
        for name in ("state_dict", "load_state_dict", "set_epoch", SHARDS_ITSELF):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def __iter__(self):
        return iter(self.inner)


class EveryNth(IterableDataset):
    """A torch IterableDataset's share for one rank (and worker): every (world_size x workers)-th sample."""

    def __init__(self, inner: IterableDataset, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.inner, "set_epoch", None)):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return itertools.islice(iter(self.inner), self.rank * workers + worker, None, self.world_size * workers)


def shard_for_rank(dataset, rank: int, world_size: int, num_workers: int):
    """This rank's part of a stream, and whether resuming it from its own state is exact (and if not, why)."""
    if _hf_iterable(dataset):
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        if _has_shuffle_buffer(dataset):
            return dataset, "its shuffle(buffer_size=...) buffer is not part of its state_dict()"
        return dataset, None
    stateful = all(callable(getattr(dataset, m, None)) for m in ("state_dict", "load_state_dict"))
    if getattr(dataset, SHARDS_ITSELF, False):
        return dataset, None if stateful else f"{type(dataset).__name__} has no state_dict()/load_state_dict()"
    if world_size > 1 or num_workers > 1:
        reason = (f"dtrain splits {type(dataset).__name__} across ranks/workers itself (set "
                  f"{SHARDS_ITSELF} = True if it does that on its own)" if stateful
                  else f"{type(dataset).__name__} has no state_dict()/load_state_dict()")
        return EveryNth(dataset, rank, world_size), reason
    return dataset, None if stateful else f"{type(dataset).__name__} has no state_dict()/load_state_dict()"


class StatefulSource(TrainSource):
    """A stream, or a map-style dataset under a user's stateful sampler, read through StatefulDataLoader."""

    def __init__(self, dataset, batch_size: int, rank: int, world_size: int, seed: int, grad_accum: int,
                 collate_fn=None, drop_last: bool = True, num_workers: int = 0, pin_memory: bool = False,
                 worker_init_fn=None, sampler=None, batch_sampler=None, device=None, is_main: bool = True,
                 allow_inexact_resume: bool = False):
        self.kind = "sampler" if sampler is not None or batch_sampler is not None else "stream"
        self.order = batch_sampler if batch_sampler is not None else sampler  # what set_epoch goes to
        if self.kind == "stream":
            if not isinstance(dataset, IterableDataset):
                dataset = IterableObject(dataset)
            dataset, self.replay_reason = shard_for_rank(dataset, rank, world_size, num_workers)
            self.order = dataset
        else:
            self.replay_reason = None  # StatefulDataLoader saves and restores the sampler's own state
        self.dataset, self.sampler, self.batch_sampler = dataset, sampler, batch_sampler
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.grad_accum, self.collate_fn, self.drop_last = grad_accum, collate_fn, drop_last
        self.num_workers, self.pin_memory, self.worker_init_fn = num_workers, pin_memory, worker_init_fn
        self.device, self.is_main, self.allow_inexact_resume = device, is_main, allow_inexact_resume
        self.resume = "replay" if self.replay_reason else "state"
        self.samples_per_micro_step = batch_size * world_size
        self.steps_per_epoch = self._steps_per_epoch()
        self.epoch, self.micro_batches, self.loader_state, self.to_skip = 0, 0, None, 0

    def _steps_per_epoch(self) -> int | None:
        if self.kind == "stream":
            return None
        if self.batch_sampler is not None:
            batches = len(self.batch_sampler) if hasattr(self.batch_sampler, "__len__") else None
        elif hasattr(self.sampler, "__len__"):
            batches = len(self.sampler) // self.batch_size if self.drop_last else -(-len(self.sampler) // self.batch_size)
        else:
            batches = None
        return None if batches is None else batches // self.grad_accum

    # -------------------------------------------------------------------------------------- position

    def check_resume(self, saved_position: dict | None, saved_world_size: int) -> None:
        if saved_world_size == self.world_size:
            return
        if not self.allow_inexact_resume:
            raise UsageError(f"--resume: the checkpoint was written by {saved_world_size} process(es), this run has "
                             f"{self.world_size}; a {self.kind} cannot be re-split across ranks at the same point. "
                             f"Resume with {saved_world_size} process(es), or pass --allow-inexact-resume to "
                             f"continue roughly there (some samples of this epoch may be seen twice or skipped)")
        logger.warning(f"--allow-inexact-resume: the world size changed from {saved_world_size} to "
                       f"{self.world_size}; each rank skips its share of the samples seen so far in this epoch. "
                       f"Some samples may be repeated or missed")

    def seek(self, epoch: int, epoch_samples_seen: int = 0, saved_position: dict | None = None) -> None:
        self.epoch, self.micro_batches, self.loader_state, self.to_skip = epoch, 0, None, 0
        if not saved_position or saved_position.get("epoch") != epoch or not epoch_samples_seen:
            return
        ranks = saved_position.get("ranks") or []
        if len(ranks) != self.world_size:  # accepted inexact continuation: each rank skips its share
            self.to_skip = epoch_samples_seen // self.samples_per_micro_step
            return
        mine = ranks[self.rank]
        if saved_position.get("resume") == "state" and self.resume == "state":
            self.micro_batches, self.loader_state = mine["micro_batches"], mine["state"]
        else:
            self.to_skip = mine["micro_batches"]

    def _position(self) -> dict:
        # Micro-batches still to be replayed count as consumed: a position reads the same before and after a resume.
        return {"micro_batches": self.micro_batches + self.to_skip,
                "state": self.loader_state if self.resume == "state" else None}

    def state_dict(self) -> dict:
        mine = self._position()
        try:
            json.dumps(mine)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"the state_dict() of {type(self.order).__name__} cannot be stored as JSON ({exc}); "
                             f"return plain numbers, strings, lists and dicts") from None
        if self.world_size > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        return {"kind": self.kind, "resume": self.resume, "epoch": self.epoch, "world_size": self.world_size,
                "replay_reason": self.replay_reason, "ranks": ranks}

    def next_batch_digest(self) -> str:
        return digest({"kind": self.kind, "epoch": self.epoch, **self._position()})

    def describe(self) -> str:
        how = ("resumable from its state" if self.resume == "state"
               else f"resumed by replay ({self.replay_reason})")
        return f"{'a stream' if self.kind == 'stream' else 'a stateful sampler'}, {how}"

    # -------------------------------------------------------------------------------------- reading

    def _loader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        if callable(getattr(self.order, "set_epoch", None)):
            self.order.set_epoch(self.epoch)
        batching = (dict(batch_sampler=self.batch_sampler) if self.batch_sampler is not None
                    else dict(batch_size=self.batch_size, drop_last=self.drop_last, sampler=self.sampler))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = StatefulDataLoader(
                self.dataset, **batching, collate_fn=self.collate_fn, num_workers=self.num_workers,
                pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(self.seed + self.epoch),
                worker_init_fn=WorkerInit(self.seed, self.epoch, self.rank, self.worker_init_fn)
                if self.num_workers else None)
            if self.loader_state is not None:
                loader.load_state_dict(self.loader_state)
            return loader, iter(loader)

    def _fetch(self, loader, iterator, keep_state: bool = True) -> tuple[bool, Any, Any]:
        """The next micro-batch (and the loader state after it), agreed across ranks: all have one, or none."""
        batch = next(iterator, _END)
        has_batch = batch is not _END
        if self.world_size > 1:
            flag = torch.tensor([1 if has_batch else 0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            has_batch = bool(flag.item())
        if not has_batch:
            return False, None, None
        return True, batch, loader.state_dict() if keep_state and self.resume == "state" else None

    def _replay(self, loader, iterator) -> None:
        skip, self.to_skip = self.to_skip, 0
        if self.is_main:
            logger.warning(f"resuming {type(self.order).__name__} by replay: reading and discarding {skip} "
                           f"micro-batch(es) ({skip * self.batch_size} samples per rank) from the start of epoch "
                           f"{self.epoch}, because {self.replay_reason or 'the world size changed'}. This takes "
                           f"about as long as reading them did; a dataset with an exact state_dict() resumes at once")
        for _ in tqdm(range(skip), desc="replaying the stream", disable=not self.is_main or skip < LONG_REPLAY_BATCHES):
            ok, _, _ = self._fetch(loader, iterator, keep_state=False)
            if not ok:
                logger.warning(f"the stream ended during the replay, before the {skip} micro-batches consumed "
                               f"before the checkpoint: has the data changed?")
                break
            self.micro_batches += 1

    def __iter__(self) -> Iterator[Any]:
        loader, iterator = self._loader()
        if self.to_skip:
            self._replay(loader, iterator)
        while True:
            # A whole accumulation window is fetched before any of it is used: an incomplete last window is
            # dropped, so the epoch holds whole optimizer steps and every step boundary is a resume point.
            window = []
            for _ in range(self.grad_accum):
                ok, batch, state = self._fetch(loader, iterator)
                if not ok:
                    if self.micro_batches == 0:  # else the next epoch would be empty too, and the next ...
                        raise UsageError(f"the training {self.kind} gave no optimizer step's worth of data in epoch "
                                         f"{self.epoch} (batch_size {self.batch_size} x grad_accum "
                                         f"{self.grad_accum} per process{', on every rank' if self.world_size > 1 else ''})")
                    return
                window.append((batch, state))
            for batch, state in window:
                self.micro_batches += 1
                self.loader_state = state
                yield batch


_END = object()


class EvalStream:
    """Evaluation batches of a stream: re-read from its start at every evaluation, up to `max_batches`.

    Every rank reads the whole eval stream (not a part of it): evaluation metrics are per-sample averages
    (sums over all ranks divided by their count), so the result is the same, and no rank can run out of
    batches while another still evaluates. A map-style eval set is split across ranks instead.
    """

    def __init__(self, dataset, batch_size: int, collate_fn=None, max_batches: int = 0):
        self.dataset, self.batch_size, self.collate_fn, self.max_batches = dataset, batch_size, collate_fn, max_batches

    def __iter__(self):
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate_fn,
                            generator=torch.Generator().manual_seed(0))
        return itertools.islice(iter(loader), self.max_batches or None)
