"""next_batch_digest(): names this rank's next micro-batch without consuming anything, and is the same after
a resume to the same position (what the resume certificate compares)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from dtrain.data import OrderedSource
from dtrain.data.source import digest
from dtrain.data.stream import StatefulSource


def ordered(**kwargs) -> OrderedSource:
    data = TensorDataset(torch.arange(40))
    return OrderedSource(data, batch_size=4, rank=kwargs.pop("rank", 0), world_size=kwargs.pop("world", 1),
                         seed=3, grad_accum=1, **kwargs)


def test_map_digest_names_the_indices_of_the_next_batch_without_consuming():
    source = ordered()
    source.seek(2, 8)
    before = source.next_batch_digest()
    assert source.next_batch_digest() == before
    batch = next(iter(source))[0].tolist()
    assert before == digest({"kind": "map", "epoch": 2, "indices": batch})
    after = source.next_batch_digest()
    assert after != before
    fresh = ordered()
    fresh.seek(2, 12)  # where a resume from a checkpoint after that batch starts
    assert fresh.next_batch_digest() == after


def test_map_digest_differs_between_ranks_and_rolls_over_to_the_next_epoch():
    a, b = ordered(world=2, rank=0), ordered(world=2, rank=1)
    assert a.next_batch_digest() != b.next_batch_digest()
    end, next_epoch = ordered(), ordered()
    end.seek(0, 40)
    next_epoch.seek(1, 0)
    assert end.next_batch_digest() == next_epoch.next_batch_digest()


def stream_source() -> StatefulSource:
    from datasets import Dataset

    data = Dataset.from_dict({"x": list(range(64))}).to_iterable_dataset(num_shards=4).with_format("torch")
    return StatefulSource(data, batch_size=4, rank=0, world_size=1, seed=3, grad_accum=1)


def test_stream_digest_follows_the_stream_state_and_survives_a_resume():
    source = stream_source()
    source.seek(0)
    iterator = iter(source)
    for _ in range(3):
        next(iterator)
    saved_digest = source.next_batch_digest()
    assert source.next_batch_digest() == saved_digest
    position = source.state_dict()
    expected_next = next(iterator)["x"].tolist()
    assert source.next_batch_digest() != saved_digest

    resumed = stream_source()
    resumed.seek(0, 12, position)
    assert resumed.next_batch_digest() == saved_digest
    assert next(iter(resumed))["x"].tolist() == expected_next


def test_stream_digest_reads_the_same_after_a_resume_by_replay():
    from accelerate import PartialState

    from tests.helpers.stream_tasks import PlainStream

    PartialState()  # the replay warning goes through Accelerate's logger
    source = StatefulSource(PlainStream(seed=1), batch_size=4, rank=0, world_size=1, seed=3, grad_accum=1,
                            collate_fn=lambda samples: [s["id"] for s in samples])
    assert source.resume == "replay"
    source.seek(0)
    iterator = iter(source)
    next(iterator), next(iterator)
    saved_digest, position = source.next_batch_digest(), source.state_dict()
    expected_next = next(iterator)

    resumed = StatefulSource(PlainStream(seed=1), batch_size=4, rank=0, world_size=1, seed=3, grad_accum=1,
                             collate_fn=lambda samples: [s["id"] for s in samples])
    resumed.seek(0, 8, position)
    assert resumed.next_batch_digest() == saved_digest
    assert next(iter(resumed)) == expected_next
    assert resumed.next_batch_digest() != saved_digest
