"""Instruction data of the causal-lm task: JSONL of {"prompt", "completion"} or chat {"messages": [...]} records.

Each record is one sample: its prompt tokens then its completion tokens (and EOS). The loss covers the completion
only: the labels of prompt tokens are -100, which transformers' loss ignores. A chat record is rendered with the
tokenizer's chat template; its last message (the assistant's) is the completion and everything before it, with
the template's generation prompt, the prompt.

Samples are never packed together: a batch pads them (right, to its longest) with an attention mask, so no
sample attends to or is scored against another's tokens. (Packing several samples in one row needs per-sample
attention masks, which transformers builds from position_ids only with flash attention; padding works for every
model on every device.) A sample longer than block_size keeps its first block_size tokens; one whose completion
would be cut off entirely is dropped, and counted in the log.

The data is map-style (one sample per record), so the data order, its position and exact resume work as for
packed text; every period-th record is held out for evaluation (eval_fraction), and the first eval prompts are
what eval samples are generated from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.logging import get_logger
from torch.utils.data import Dataset

from dtrain.config import TaskConfig
from dtrain.errors import UsageError

logger = get_logger(__name__)

IGNORE = -100  # the label transformers' cross-entropy skips
IDS, LABELS, MASK = "input_ids", "labels", "attention_mask"
SAMPLE_PROMPTS = 2  # eval prompts an eval sample continues


@dataclass
class Sample:
    prompt: list[int]
    completion: list[int]


class InstructionSamples(Dataset):
    """Sample i is {"input_ids": LongTensor[L], "labels": LongTensor[L]}, labels -100 on the prompt."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        ids = torch.tensor(sample.prompt + sample.completion, dtype=torch.long)
        labels = ids.clone()
        labels[:len(sample.prompt)] = IGNORE
        return {IDS: ids, LABELS: labels}


def padding_collate(pad_id: int):
    """Pads a batch's samples on the right to its longest: pad tokens are masked out and never scored."""

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e[IDS]) for e in examples)
        ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example[IDS])
            ids[row, :n], labels[row, :n], mask[row, :n] = example[IDS], example[LABELS], 1
        return {IDS: ids, LABELS: labels, MASK: mask}

    return collate


def pad_id_of(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0  # masked out and never scored: any id in the vocabulary does


def is_instruction_file(path: Path) -> bool:
    """A .jsonl file whose first record has prompt/completion or messages."""
    if not (path.is_file() and path.suffix == ".jsonl"):
        return False
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return False
                return isinstance(record, dict) and ("messages" in record or "prompt" in record)
    return False


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)[IDS] if text else []


def _chat_sample(tokenizer, messages, where: str) -> Sample:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise UsageError(f"invalid value for data: {where}: messages must be a non-empty list of "
                         f"{{'role', 'content'}} objects")
    if messages[-1].get("role") != "assistant":
        raise UsageError(f"invalid value for data: {where}: the last message is the completion and must have "
                         f"role 'assistant'")
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("invalid value for data: chat records ({'messages': ...}) need a tokenizer with a chat "
                         "template; accepted: --tokenizer DIR whose tokenizer_config.json has chat_template, or "
                         "prompt/completion records")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if not whole.startswith(prompt):
        raise UsageError(f"invalid value for data: {where}: the chat template renders the conversation with a "
                         f"different beginning than its prompt, so the completion cannot be told apart")
    return Sample(_tokens(tokenizer, prompt), _tokens(tokenizer, whole[len(prompt):]))


def read_samples(path: Path, tokenizer) -> list[Sample]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"invalid value for data: {where} is not JSON ({exc})") from None
            if isinstance(record, dict) and "messages" in record:
                sample = _chat_sample(tokenizer, record["messages"], where)
            elif isinstance(record, dict) and isinstance(record.get("prompt"), str) \
                    and isinstance(record.get("completion"), str):
                sample = Sample(_tokens(tokenizer, record["prompt"]), _tokens(tokenizer, record["completion"]))
            else:
                raise UsageError(f"invalid value for data: {where}; accepted: {{\"prompt\": str, \"completion\": "
                                 f"str}} or {{\"messages\": [...]}} records")
            samples.append(Sample(sample.prompt, sample.completion + eos))
    return samples


def _fit(samples: list[Sample], block_size: int) -> tuple[list[Sample], int]:
    """Samples cut to block_size tokens; those left without a completion token are dropped (how many)."""
    kept = []
    for sample in samples:
        room = block_size - len(sample.prompt)
        if room >= 1 and sample.completion:
            kept.append(Sample(sample.prompt, sample.completion[:room]))
    return kept, len(samples) - len(kept)


def load_samples(config: TaskConfig, tokenizer) -> list[Sample]:
    """The samples of an instruction JSONL file, cut to block_size (hf_data.py splits and wraps them)."""
    if config.streaming:
        raise UsageError("invalid value for streaming: True; accepted: false for instruction JSONL (it is read "
                         "as a map-style dataset, one sample per record)")
    path = Path(config.data).expanduser()
    samples, dropped = _fit(read_samples(path, tokenizer), config.block_size)
    if dropped:
        logger.warning(f"{dropped} record(s) of {path.name} leave no completion token within block_size "
                       f"{config.block_size}: skipped")
    return samples
