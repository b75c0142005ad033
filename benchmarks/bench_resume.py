"""Resume cost: time to the first batch when resuming at an epoch start vs deep inside a large epoch.

A dataset of 10^6 samples that are cheap to make (a tiny tensor per index) and that counts its __getitem__
calls. The loader is built exactly as dtrain's Trainer builds it (`dtrain.data.ResumableBatchSampler` +
`make_loader`), and positioned as Trainer.fit positions it on resume: `sampler.set_epoch(epoch, start_sample)`.
Timed: from set_epoch through `iter(loader)` to the first batch in hand (the data side of the first training
step; the model work of that step is the same wherever the epoch resumes, so it is left out, which only makes
the ratio stricter). Two positions, alternating, several repeats, medians:

    start   epoch 3, start_sample 0
    deep    epoch 3, start_sample = 90% of the epoch (900,000 of 10^6)

    resume_skip_ratio = median time to first batch (deep) / median time to first batch (start)   (goal <= 1.10)

The dataset's access counter shows how many samples were loaded to produce the first batch (dtrain: one
batch's worth, wherever it resumes). For contrast, the same deep position reached the naive way (iterate the
loader from the epoch start and throw batches away) and the Accelerate way (`skip_first_batches`, which
iterates the batch sampler and skips index lists without loading samples) are timed once each.

Streams: a Hugging Face `datasets` IterableDataset of 10^6 samples (100 shards), read as dtrain reads it
(`dtrain.data.stream.StatefulSource`, torchdata's StatefulDataLoader). Time to the first batch at the epoch
start, and 90% into the epoch two ways: from the stream's saved state (what dtrain does for an exact stream),
and by replay (read from the epoch start and discard; what dtrain does for a stream without exact state):

    stream_state_vs_start_ratio = median time to first batch (deep, from state) / (epoch start)   (goal <= 1.5)
"""

from __future__ import annotations

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402  (puts the repository on sys.path)

FULL = dict(samples=1_000_000, batch_size=64, repeats=21, stream_samples=1_000_000, stream_repeats=5)
QUICK = dict(samples=100_000, batch_size=64, repeats=3, stream_samples=5_000, stream_repeats=2)
STREAM_SHARDS = 100
SEED, EPOCH, DEEP_FRACTION = 1234, 3, 0.9


class CountingDataset:
    """`samples` tiny samples, made on demand; counts every access."""

    def __init__(self, samples: int):
        import torch

        self.samples = samples
        self.loads = 0
        self._torch = torch

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int):
        self.loads += 1
        return self._torch.tensor([index, index % 7], dtype=self._torch.int64)


def build(spec: dict):
    from dtrain.data import ResumableBatchSampler, make_loader

    dataset = CountingDataset(spec["samples"])
    # What Trainer._build_training_objects does for rank 0 of 1 process.
    sampler = ResumableBatchSampler(len(dataset), spec["batch_size"], 0, 1, SEED, 1)
    loader = make_loader(dataset, sampler, None, 0, SEED)
    return dataset, sampler, loader


def deep_position(spec: dict, sampler) -> int:
    """90% into the epoch, at an optimizer-step boundary (where checkpoints are taken)."""
    per_step = sampler.samples_per_micro_step * sampler.grad_accum
    return int(spec["samples"] * DEEP_FRACTION) // per_step * per_step


def time_to_first_batch(spec: dict, start_sample: int) -> dict:
    dataset, sampler, loader = build(spec)
    started = time.perf_counter()
    sampler.set_epoch(EPOCH, start_sample)
    iterator = iter(loader)
    batch = next(iterator)
    seconds = time.perf_counter() - started
    expected = sampler.epoch_order(EPOCH)[start_sample:start_sample + spec["batch_size"]]
    assert batch[:, 0].tolist() == expected.tolist(), "resumed at the wrong position"
    return {"seconds": seconds, "loads": dataset.loads}


def naive_skip(spec: dict, start_sample: int) -> dict:
    """A loop that reaches the position by loading and discarding the batches before it."""
    dataset, sampler, loader = build(spec)
    skip = start_sample // spec["batch_size"]
    started = time.perf_counter()
    sampler.set_epoch(EPOCH, 0)
    iterator = iter(loader)
    for _ in range(skip):
        next(iterator)
    batch = next(iterator)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "loads": dataset.loads, "first": batch[0, 0].item()}


def accelerate_skip(spec: dict, start_sample: int) -> dict:
    """Accelerate's skip_first_batches: skips index lists in the batch sampler, loads no skipped sample."""
    from accelerate import skip_first_batches

    dataset, sampler, loader = build(spec)
    skip = start_sample // spec["batch_size"]
    started = time.perf_counter()
    sampler.set_epoch(EPOCH, 0)
    skipped = skip_first_batches(loader, skip)
    batch = next(iter(skipped))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "loads": dataset.loads, "first": batch[0, 0].item()}


def stream_source(spec: dict):
    """A 10^6-sample Hugging Face IterableDataset as dtrain's Trainer reads it on rank 0 of 1 process."""
    from datasets import Dataset

    from dtrain.data.stream import StatefulSource

    if "stream_table" not in spec:  # the in-memory Arrow table is built once; each run gets a fresh stream
        spec["stream_table"] = Dataset.from_dict({"id": list(range(spec["stream_samples"]))})
    # Rows as Python values, batched by the default collate (torch formatting per row would dominate every way).
    stream = spec["stream_table"].to_iterable_dataset(num_shards=STREAM_SHARDS)
    return StatefulSource(stream, spec["batch_size"], 0, 1, SEED, 1, is_main=False)


def stream_first_batch(spec: dict, position: dict | None, samples: int) -> dict:
    started = time.perf_counter()
    source = stream_source(spec)
    source.seek(0, samples, position)
    iterator = iter(source)
    batch = next(iterator)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "first": batch["id"][0].item(), "iterator": iterator, "source": source}


def stream_rows(spec: dict) -> tuple[list, dict]:
    """Streams: time to the first batch at the start, deep from the saved state, deep by replay."""
    batch = spec["batch_size"]
    deep_batches = int(spec["stream_samples"] * DEEP_FRACTION) // batch
    replay_position = {"kind": "stream", "resume": "replay", "epoch": 0, "world_size": 1,
                       "ranks": [{"micro_batches": deep_batches, "state": None}]}
    replay = stream_first_batch(spec, replay_position, deep_batches * batch)  # once: it is the slow way
    # The state a checkpoint after that batch stores, and the batch a resume from it must return.
    state_position = replay["source"].state_dict()
    expected = next(replay["iterator"])["id"][0].item()
    stream_first_batch(spec, None, 0)  # untimed: first-call costs
    runs = _util.alternate([("start", lambda: stream_first_batch(spec, None, 0)),
                            ("state", lambda: stream_first_batch(spec, state_position, (deep_batches + 1) * batch))],
                           spec["stream_repeats"], between=gc.collect)
    assert all(r["first"] == expected for r in runs["state"]), "resumed the stream at the wrong position"
    assert all(r["first"] == 0 for r in runs["start"])
    med_start = _util.median(r["seconds"] for r in runs["start"])
    med_state = _util.median(r["seconds"] for r in runs["state"])
    rows = [["stream: epoch start", 1000 * med_start, _util.spread([1000 * r["seconds"] for r in runs["start"]])],
            [f"stream: deep (sample {(deep_batches + 1) * batch:,}) from its state", 1000 * med_state,
             _util.spread([1000 * r["seconds"] for r in runs["state"]])],
            [f"stream: deep (sample {deep_batches * batch:,}) by replay (once)", 1000 * replay["seconds"], "-"]]
    return rows, {"stream_state_vs_start_ratio": _util.ratio(med_state, med_start),
                  "stream_start_ms": 1000 * med_start, "stream_state_ms": 1000 * med_state,
                  "stream_replay_ms": 1000 * replay["seconds"], "stream_samples": spec["stream_samples"]}


def main(argv: list[str] | None = None) -> dict:
    parser = _util.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-naive", action="store_true", help="leave out the (slow) naive-skipping contrast")
    parser.add_argument("--no-stream", action="store_true", help="leave out the Hugging Face stream rows")
    args = parser.parse_args(argv)
    spec = _util.chosen_spec(args, QUICK, FULL)
    started = time.perf_counter()
    _, sampler, _ = build(spec)
    deep = deep_position(spec, sampler)
    time_to_first_batch(spec, 0)  # untimed: first-call costs
    runs = _util.alternate([("start", lambda: time_to_first_batch(spec, 0)),
                            ("deep", lambda: time_to_first_batch(spec, deep))], spec["repeats"],
                           between=gc.collect)  # no garbage collection of the previous run inside a timing
    med_start = _util.median(r["seconds"] for r in runs["start"])
    med_deep = _util.median(r["seconds"] for r in runs["deep"])
    skip_ratio = _util.ratio(med_deep, med_start)
    rows = [["dtrain resume at epoch start (sample 0)", 1000 * med_start,
             _util.spread([1000 * r["seconds"] for r in runs["start"]]), runs["start"][0]["loads"]],
            [f"dtrain resume deep (sample {deep:,})", 1000 * med_deep,
             _util.spread([1000 * r["seconds"] for r in runs["deep"]]), runs["deep"][0]["loads"]]]
    accel = accelerate_skip(spec, deep)
    rows.append(["Accelerate skip_first_batches to the same sample (once)", 1000 * accel["seconds"], "-",
                 accel["loads"]])
    naive = None
    if not args.no_naive:
        naive = naive_skip(spec, deep)
        rows.append(["naive: load and discard batches up to it (once)", 1000 * naive["seconds"], "-",
                     naive["loads"]])
    print(_util.table("resume: time to the first batch, epoch start vs deep inside the epoch",
                      ["how", "median ms", "min..max ms", "samples loaded"], rows,
                      [f"{spec['samples']:,} samples, batch {spec['batch_size']}, epoch {EPOCH}; "
                       f"{spec['repeats']} alternating repeats per position",
                       f"resume_skip_ratio (goal <= 1.10) = deep / start = {_util.fmt(skip_ratio)}",
                       "'samples loaded' counts dataset __getitem__ calls until the first batch is in hand",
                       f"wall time {time.perf_counter() - started:.0f}s"]))
    stream = {}
    if not args.no_stream:
        stream_started = time.perf_counter()
        rows, stream = stream_rows(spec)
        print(_util.table("resume a stream: time to the first batch, epoch start vs 90% in (state vs replay)",
                          ["how", "median ms", "min..max ms"], rows,
                          [f"Hugging Face IterableDataset, {spec['stream_samples']:,} samples in {STREAM_SHARDS} "
                           f"shards, batch {spec['batch_size']}; {spec['stream_repeats']} alternating repeats",
                           f"stream_state_vs_start_ratio (goal <= 1.5) = state / start = "
                           f"{_util.fmt(stream['stream_state_vs_start_ratio'])}",
                           f"replay / start = {_util.fmt(_util.ratio(stream['stream_replay_ms'], stream['stream_start_ms']))}",
                           f"wall time {time.perf_counter() - stream_started:.0f}s"]))
    return {**stream, "resume_skip_ratio": skip_ratio, "resume_start_ms": 1000 * med_start, "resume_deep_ms": 1000 * med_deep,
            "resume_deep_loads": runs["deep"][0]["loads"], "resume_accelerate_skip_ms": 1000 * accel["seconds"],
            "resume_naive_skip_ms": 1000 * naive["seconds"] if naive else None,
            "resume_naive_skip_loads": naive["loads"] if naive else None,
            "resume_samples": spec["samples"], "resume_deep_sample": deep, "resume_repeats": spec["repeats"]}


if __name__ == "__main__":
    _util.emit(main())
