"""Data of the causal-lm task: text tokenised and packed into fixed blocks of `block_size` tokens.

Sources: text files or a folder of them; a directory written by `datasets.save_to_disk`; a `datasets` name
(`load_dataset`, where the hub can be reached); or, with no --data, Python's own stdlib sources (as charlm's
default corpus) so the task runs offline. Each document's tokens are followed by the tokenizer's EOS (when it
has one) and documents are concatenated before packing.

A `.jsonl` file of {"prompt", "completion"} or {"messages"} records is instruction data instead: one sample per
record, the prompt masked out of the loss (hf_instructions.py).

Held-out blocks: every `period`-th block (period = round(1 / eval_fraction)) is an eval block, the rest train,
for map-style data and streams alike. A `datasets` source with a `validation` (or `test`) split uses it instead.

`--streaming` makes the train split an HF `datasets.IterableDataset` whose shards are the files (or the
dataset's own shards): its `state_dict()` is a shard index and an offset, so it resumes exactly. The eval split
stays map-style: the first STREAM_EVAL_BLOCKS held-out blocks of the stream.
"""

from __future__ import annotations

import hashlib
import itertools
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch.utils.data import Dataset

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.integrations.hf_models import require_hf

STREAM_EVAL_BLOCKS = 256
SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
TEXT_COLUMN, IDS_COLUMN = "text", "input_ids"


@dataclass
class LMData:
    train: Dataset  # map-style TokenBlocks, or a datasets.IterableDataset with --streaming
    eval: Dataset | None
    fingerprint: str
    collate: Callable[[list[dict]], dict] | None = None  # None: collate_blocks
    eval_prompts: list[list[int]] | None = None  # instruction data: what eval samples continue


class TokenBlocks(Dataset):
    """Packed token blocks; sample i is {"input_ids": LongTensor[block_size]} (the model shifts the labels)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {IDS_COLUMN: self.blocks[index].long()}


def collate_blocks(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {IDS_COLUMN: torch.stack([torch.as_tensor(e[IDS_COLUMN], dtype=torch.long) for e in examples])}


def eval_period(eval_fraction: float) -> int:
    """Every period-th block is held out; 0 = nothing held out."""
    return max(2, round(1 / eval_fraction)) if eval_fraction > 0 else 0


def is_eval_block(index: int, period: int) -> bool:
    return bool(period) and index % period == period - 1


def _pack(token_docs: Iterable[list[int]], block_size: int) -> Iterator[list[int]]:
    """Concatenates documents and yields full blocks; the tail that does not fill a block is dropped."""
    buffer: list[int] = []
    for ids in token_docs:
        buffer.extend(ids)
        while len(buffer) >= block_size:
            yield buffer[:block_size]
            del buffer[:block_size]


def _tokenize(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)[IDS_COLUMN]
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


# ---------------------------------------------------------------------------------------------- text files

def text_files(data: str | None, corpus_bytes: int) -> tuple[list[str], list[int], str]:
    """(files, bytes to read of each (-1 = all), source name); no --data = the stdlib corpus."""
    if data is None:
        return stdlib_corpus(corpus_bytes)
    path = Path(data).expanduser()
    if path.is_file():
        files = [path]
    else:  # hidden files and folders (.git, editor swap files) are no text of the corpus
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise UsageError(f"invalid value for data: {data!r} holds no files; accepted: text files or a folder of them")
    return [str(f) for f in files], [-1] * len(files), f"files:{path.resolve()}"


def stdlib_corpus(max_bytes: int) -> tuple[list[str], list[int], str]:
    """The first `max_bytes` of Python's top-level stdlib sources in sorted order (charlm's default corpus)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, limits, total = [], [], 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= max_bytes:
            break
        size = min(path.stat().st_size, max_bytes - total)
        files.append(str(path))
        limits.append(size)
        total += size
    return files, limits, f"python-stdlib:{stdlib}"


def _read_text(path: str, limit: int) -> str:
    raw = Path(path).read_bytes()
    return (raw if limit < 0 else raw[:limit]).decode("utf-8", errors="replace")


def _files_fingerprint(files: list[str], limits: list[int], source: str, streaming: bool) -> str:
    """The files' identity: their contents' sha256, or for a stream (which must not read everything at start)
    their names, sizes and modification times."""
    digest, total = hashlib.sha256(), 0
    for path, limit in zip(files, limits):
        if streaming:
            stat = Path(path).stat()
            size = stat.st_size if limit < 0 else min(limit, stat.st_size)
            digest.update(f"{path}\0{size}\0{stat.st_mtime_ns}\0".encode())
        else:
            raw = Path(path).read_bytes()
            raw = raw if limit < 0 else raw[:limit]
            digest.update(raw)
            size = len(raw)
        total += size
    kind = "stat-sha256" if streaming else "sha256"
    return f"{source}#files={len(files)}#bytes={total}#{kind}={digest.hexdigest()[:16]}"


def stream_file_blocks(files: list[str], limits: list[int], tokenizer, block_size: int, period: int,
                       split: str) -> Iterator[dict]:
    """The generator of a streamed text source: each file (a shard) packed on its own, split by block index."""
    for path, limit in zip(files, limits):
        blocks = _pack([_tokenize(tokenizer, _read_text(path, limit))], block_size)
        for index, block in enumerate(blocks):
            if is_eval_block(index, period) == (split == "eval"):
                yield {IDS_COLUMN: block}


# ---------------------------------------------------------------------------------------------- datasets

def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_DATASET_MARKERS)


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or Path(text).suffix != ""


def _load_datasets_source(data: str, streaming: bool):
    """(train split, eval split or None, fingerprint) of a save_to_disk directory or a `datasets` name."""
    datasets = require_hf("datasets")  # imported only where a source needs it (it is slow)

    path = Path(data).expanduser()
    try:
        if path.exists():
            loaded = datasets.load_from_disk(str(path))
            digest = hashlib.sha256(b"".join((p.read_bytes() for p in sorted(path.rglob("*.json")))))
            fingerprint = f"datasets-dir:{path.resolve()}#sha256={digest.hexdigest()[:16]}"
        else:
            loaded = datasets.load_dataset(data, streaming=streaming)
            fingerprint = f"datasets:{data}"
    except Exception as exc:  # datasets raises many kinds (FileNotFoundError, DatasetNotFoundError, ...)
        text = str(exc).strip().splitlines()
        raise UsageError(f"invalid value for data: cannot load the dataset {data!r}: "
                         f"{text[0] if text else type(exc).__name__}") from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if "train" not in loaded:
            raise UsageError(f"invalid value for data: {data!r} has splits {sorted(loaded)}; accepted: a dataset "
                             f"with a 'train' split (and optionally 'validation' or 'test')")
        held_out = loaded.get("validation", loaded.get("test"))
        train = loaded["train"]
    else:
        train, held_out = loaded, None
    if streaming and isinstance(train, datasets.Dataset):
        train = train.to_iterable_dataset(num_shards=max(1, min(64, len(train))))
    if held_out is not None and isinstance(held_out, datasets.IterableDataset):
        held_out = list(itertools.islice(held_out, STREAM_EVAL_BLOCKS * 4))
    columns = train.column_names or []
    if TEXT_COLUMN not in columns and IDS_COLUMN not in columns:
        raise UsageError(f"invalid value for data: {data!r} has columns {columns}; accepted: a dataset with a "
                         f"'{TEXT_COLUMN}' or '{IDS_COLUMN}' column")
    return train, held_out, fingerprint


def _row_tokens(tokenizer):
    def tokens(row: dict) -> list[int]:
        return list(row[IDS_COLUMN]) if IDS_COLUMN in row else _tokenize(tokenizer, row[TEXT_COLUMN])

    return tokens


def _stream_blocks_of_dataset(stream, tokenizer, block_size: int, period: int, split: str):
    """Packs an HF IterableDataset batch by batch (a batch's tail is dropped); the block index within the
    batch decides train or eval, so the split is the same however far a resumed stream has come."""
    tokens = _row_tokens(tokenizer)

    def pack_batch(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        blocks = _pack((tokens(row) for row in rows), block_size)
        return {IDS_COLUMN: [b for i, b in enumerate(blocks) if is_eval_block(i, period) == (split == "eval")]}

    return stream.map(pack_batch, batched=True, batch_size=64, remove_columns=stream.column_names)


# ---------------------------------------------------------------------------------------------- building

def _blocks_tensor(blocks: list[list[int]], block_size: int) -> torch.Tensor:
    dtype = torch.int32  # half the memory of int64; converted per sample
    return torch.tensor(blocks, dtype=dtype) if blocks else torch.empty(0, block_size, dtype=dtype)


def _split_blocks(blocks: list[list[int]], period: int) -> tuple[list[list[int]], list[list[int]]]:
    train = [b for i, b in enumerate(blocks) if not is_eval_block(i, period)]
    held_out = [b for i, b in enumerate(blocks) if is_eval_block(i, period)]
    return train, held_out


def _check_enough(train_blocks: int, eval_blocks: int | None, source: str, config: TaskConfig) -> None:
    if train_blocks < 1 or (eval_blocks is not None and config.eval_fraction > 0 and eval_blocks < 1):
        raise UsageError(f"invalid value for data: {source} gives {train_blocks} train and {eval_blocks or 0} eval "
                         f"blocks of {config.block_size} tokens; accepted: enough text for at least one of each "
                         f"(lower block_size or eval_fraction, or add text)")


def load_lm_data(config: TaskConfig, tokenizer) -> LMData:
    block, period = config.block_size, eval_period(config.eval_fraction)
    data = config.data
    path = Path(data).expanduser() if data else None
    if data is not None and not path.exists() and _looks_like_path(data):
        raise UsageError(f"invalid value for data: {data!r} does not exist; accepted: text files, a folder, a "
                         f"datasets save_to_disk directory or a datasets name")
    if path is not None:
        from dtrain.integrations.hf_instructions import is_instruction_file

        if is_instruction_file(path):  # prompt/completion or chat records: one sample each, prompt masked
            return _instruction_data(config, tokenizer, period)
    if data is None or (path.exists() and not is_saved_dataset(path)):
        return _text_data(config, tokenizer, block, period)
    return _datasets_data(config, tokenizer, block, period)


def _eval_split(blocks: list[list[int]], block: int) -> TokenBlocks | None:
    return TokenBlocks(_blocks_tensor(blocks, block)) if blocks else None


def _datasets_data(config: TaskConfig, tokenizer, block: int, period: int) -> LMData:
    data = config.data
    train, held_out, fingerprint = _load_datasets_source(data, config.streaming)
    tokens = _row_tokens(tokenizer)
    if config.streaming:
        split_period = 0 if held_out is not None else period
        if held_out is not None:
            eval_blocks = list(itertools.islice(_pack((tokens(r) for r in held_out), block), STREAM_EVAL_BLOCKS))
        else:
            eval_rows = _stream_blocks_of_dataset(train, tokenizer, block, split_period, "eval")
            eval_blocks = [r[IDS_COLUMN] for r in itertools.islice(eval_rows, STREAM_EVAL_BLOCKS)]
        train = _stream_blocks_of_dataset(train, tokenizer, block, split_period, "train")
        return LMData(train, _eval_split(eval_blocks, block), fingerprint)
    blocks = list(_pack((tokens(row) for row in train), block))
    if held_out is not None:
        train_blocks, eval_blocks = blocks, list(_pack((tokens(row) for row in held_out), block))
    else:
        train_blocks, eval_blocks = _split_blocks(blocks, period)
    _check_enough(len(train_blocks), len(eval_blocks), data, config)
    return LMData(TokenBlocks(_blocks_tensor(train_blocks, block)), _eval_split(eval_blocks, block), fingerprint)


def _text_data(config: TaskConfig, tokenizer, block: int, period: int) -> LMData:
    files, limits, source = text_files(config.data, config.corpus_bytes)
    fingerprint = _files_fingerprint(files, limits, source, config.streaming)
    if config.streaming:
        datasets = require_hf("datasets")  # imported only where a source needs it (it is slow)

        train = datasets.IterableDataset.from_generator(
            stream_file_blocks, gen_kwargs={"files": files, "limits": limits, "tokenizer": tokenizer,
                                            "block_size": block, "period": period, "split": "train"})
        held_out = stream_file_blocks(files, limits, tokenizer, block, period, "eval")
        eval_blocks = [row[IDS_COLUMN] for row in itertools.islice(held_out, STREAM_EVAL_BLOCKS)]
        _check_enough(1, len(eval_blocks), source, config)
        return LMData(train, _eval_split(eval_blocks, block), fingerprint)
    blocks = list(_pack((_tokenize(tokenizer, _read_text(f, n)) for f, n in zip(files, limits)), block))
    train_blocks, eval_blocks = _split_blocks(blocks, period)
    _check_enough(len(train_blocks), len(eval_blocks), source, config)
    return LMData(TokenBlocks(_blocks_tensor(train_blocks, block)), _eval_split(eval_blocks, block), fingerprint)


def _instruction_data(config: TaskConfig, tokenizer, period: int) -> LMData:
    """One sample per record, every period-th held out; padded per batch; the first eval prompts for samples."""
    from dtrain.integrations.hf_instructions import SAMPLE_PROMPTS, InstructionSamples, load_samples, \
        pad_id_of, padding_collate

    files, limits, source = text_files(config.data, config.corpus_bytes)
    fingerprint = "instructions:" + _files_fingerprint(files, limits, source, streaming=False)
    samples = load_samples(config, tokenizer)
    train = [s for i, s in enumerate(samples) if not is_eval_block(i, period)]
    held_out = [s for i, s in enumerate(samples) if is_eval_block(i, period)]
    if not train or (config.eval_fraction > 0 and not held_out):
        raise UsageError(f"invalid value for data: {config.data} gives {len(train)} train and {len(held_out)} "
                         f"eval samples; accepted: enough records for at least one of each (lower eval_fraction, "
                         f"or add records)")
    return LMData(InstructionSamples(train), InstructionSamples(held_out) if held_out else None, fingerprint,
                  collate=padding_collate(pad_id_of(tokenizer)),
                  eval_prompts=[s.prompt for s in (held_out or train) if s.prompt][:SAMPLE_PROMPTS] or None)
