"""The data order: a pure function of (seed, epoch), resumable at any sample, across world-size changes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from dtrain.data import ResumableBatchSampler, ShardedEvalSampler, make_loader


def sampler(n=100, bs=4, rank=0, world=1, seed=7, ga=1, shuffle=True) -> ResumableBatchSampler:
    return ResumableBatchSampler(n, bs, rank, world, seed, grad_accum=ga, shuffle=shuffle)


def global_order(n, bs, world, seed, epoch, start_sample=0, ga=1, micro_steps=None) -> list[int]:
    """Samples in the order the whole group consumes them: micro-step by micro-step, rank 0 first."""
    per_rank = []
    for rank in range(world):
        s = sampler(n, bs, rank, world, seed, ga)
        s.set_epoch(epoch, start_sample)
        per_rank.append(list(s))
    assert len({len(batches) for batches in per_rank}) == 1, "every rank must get the same number of batches"
    steps = len(per_rank[0]) if micro_steps is None else micro_steps
    return [i for step in range(steps) for rank in range(world) for i in per_rank[rank][step]]


def test_order_is_a_pure_function_of_seed_and_epoch():
    a, b = sampler(seed=3), sampler(seed=3)
    b_history = sampler(seed=3)
    for epoch in (0, 5, 2):  # b_history visits epochs in another order first: no hidden state
        b_history.set_epoch(epoch)
        list(b_history)
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        b_history.set_epoch(epoch)
        assert list(a) == list(b) == list(b_history)
    a.set_epoch(0), b.set_epoch(1)
    assert list(a) != list(b), "epochs must differ"
    c = sampler(seed=4)
    c.set_epoch(0)
    assert list(a) != list(c), "seeds must differ"


def test_order_does_not_depend_on_the_global_torch_rng():
    s = sampler()
    torch.manual_seed(1)
    first = list(s)
    torch.manual_seed(999)
    torch.rand(10)
    assert list(s) == first


def test_epoch_is_a_permutation_split_across_ranks_without_overlap():
    n, bs, world = 103, 4, 2
    seen = global_order(n, bs, world, seed=1, epoch=0)
    assert len(seen) == len(set(seen))
    assert set(seen) <= set(range(n))
    assert len(seen) == (n // (bs * world)) * bs * world  # only the incomplete last global batch is dropped


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("start_micro_steps", [0, 1, 5, 11])
def test_resume_at_start_sample_gives_exactly_the_rest_of_the_straight_order(world, start_micro_steps):
    n, bs, seed, epoch = 150, 4, 11, 3
    straight = global_order(n, bs, world, seed, epoch)
    start = start_micro_steps * bs * world
    resumed = global_order(n, bs, world, seed, epoch, start_sample=start)
    assert resumed == straight[start:]
    # Each rank's resumed batches are the tail of its own straight batches.
    for rank in range(world):
        full, rest = sampler(n, bs, rank, world, seed), sampler(n, bs, rank, world, seed)
        full.set_epoch(epoch)
        rest.set_epoch(epoch, start)
        assert list(rest) == list(full)[start_micro_steps:]
        assert len(rest) == len(full) - start_micro_steps


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("micro_steps_before", [1, 4, 7])
def test_world_size_change_mid_epoch_sees_every_sample_once(before, after, micro_steps_before):
    n, bs, seed, epoch = 211, 4, 5, 2
    order = sampler(n, bs, 0, 1, seed).epoch_order(epoch).tolist()
    first = global_order(n, bs, before, seed, epoch, micro_steps=micro_steps_before)
    samples_seen = micro_steps_before * bs * before  # what the trainer stores as epoch_samples_seen
    second = global_order(n, bs, after, seed, epoch, start_sample=samples_seen)
    seen = first + second
    assert len(seen) == len(set(seen)), "a sample was seen twice"
    assert seen == order[:len(seen)], "the union is a prefix of the epoch's order: nothing skipped"
    dropped = n - len(seen)
    assert 0 <= dropped < bs * after, "only an incomplete last global micro-batch may be dropped"


def test_grad_accum_drops_only_an_incomplete_last_accumulation_window():
    n, bs, world, ga = 90, 4, 2, 3  # 11 full micro-steps of 8 samples: 3 windows of 3, 2 micro-steps left over
    s = sampler(n, bs, 0, world, 1, ga)
    assert len(s) == 9
    assert s.steps_per_epoch == 3
    seen = global_order(n, bs, world, 1, 0, ga=ga)
    assert len(seen) == 72 and len(set(seen)) == 72
    assert seen == s.epoch_order(0).tolist()[:72]
    # A multiple of the window loses nothing but the incomplete micro-batch.
    assert len(sampler(96, 4, 0, 2, 1, 3)) == 12
    # Resumed at a window boundary, the rest is still whole windows.
    s.set_epoch(0, start_sample=24)
    assert len(s) == 6


def test_sampler_refuses_a_dataset_smaller_than_one_optimizer_step():
    with pytest.raises(ValueError):
        sampler(n=20, bs=4, world=2, ga=3)
    s = sampler()
    with pytest.raises(ValueError):
        s.set_epoch(0, start_sample=101)


def test_no_shuffle_is_the_identity_order():
    s = sampler(n=10, bs=2, shuffle=False)
    assert list(s) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


class CountingDataset(Dataset):
    def __init__(self, n: int):
        self.n = n
        self.calls = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.calls += 1
        return torch.tensor(i)


def test_skip_to_near_the_end_of_a_large_epoch_loads_only_the_remaining_samples():
    n, bs = 1_000_000, 8
    data = CountingDataset(n)
    s = ResumableBatchSampler(n, bs, 0, 1, seed=3)
    start = n - 5 * bs
    s.set_epoch(4, start)
    batches = list(make_loader(data, s, seed=3))
    assert data.calls == 5 * bs, "a mid-epoch resume must not load the skipped samples"
    assert len(batches) == 5
    assert torch.cat(batches).tolist() == s.epoch_order(4)[start:].tolist()


def test_loader_batches_follow_the_sampler_for_two_ranks():
    n, bs = 64, 4
    data = CountingDataset(n)
    loaded = []
    for rank in range(2):
        s = ResumableBatchSampler(n, bs, rank, 2, seed=9)
        s.set_epoch(1, 16)
        loaded.append([b.tolist() for b in make_loader(data, s, seed=9)])
    assert [i for step in zip(*loaded) for b in step for i in b] == global_order(n, bs, 2, 9, 1, start_sample=16)


@pytest.mark.parametrize("n", [1, 7, 64, 101])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sharded_eval_covers_every_sample_exactly_once(n, world):
    seen = []
    for rank in range(world):
        shard = ShardedEvalSampler(n, batch_size=4, rank=rank, world_size=world)
        batches = list(shard)
        assert len(batches) == len(shard)
        assert all(0 < len(b) <= 4 for b in batches)
        seen += [i for b in batches[:shard.real_batches] for i in b]  # the rest is padding, never counted
    assert sorted(seen) == list(range(n))


def test_sharded_eval_with_max_batches_never_repeats_a_sample():
    seen = []
    for rank in range(2):
        shard = ShardedEvalSampler(100, batch_size=4, rank=rank, world_size=2, max_batches=3)
        assert len(shard) == 3
        seen += [i for b in shard for i in b]
    assert len(seen) == len(set(seen)) == 24
