"""Instruction data for causal-lm: prompt/completion and chat JSONL, the loss on completion tokens only, samples
padded (never packed together), perplexity over completion tokens. Tokenizers and models are built in the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dtrain.config import build_config  # noqa: E402
from dtrain.errors import UsageError  # noqa: E402
from dtrain.integrations.hf_models import byte_level_tokenizer  # noqa: E402
from dtrain.tasks import build_task  # noqa: E402
from dtrain.tasks.base import evaluation_sums, metrics_from_sums  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def llama_config(path: Path, vocab_size: int = 260) -> Path:
    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=128, vocab_size=vocab_size,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None).to_json_file(str(path))
    return path


def tokenizer_dir(path: Path) -> Path:
    """The byte-level tokenizer (ids = bytes) with an EOS (id 256) and a chat template, saved offline."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<|end|>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prompt_completion_records(n: int = 40) -> list[dict]:
    return [{"prompt": f"Q{i}: add {i} and {i % 7}?", "completion": f" {i + i % 7}"} for i in range(n)]


def task_of(tmp_path: Path, data: Path, **values):
    config = build_config(flag_values={"task": "causal-lm", "block_size": 48, "data": str(data),
                                       "model_config": str(llama_config(tmp_path / "config.json")),
                                       "tokenizer": str(tokenizer_dir(tmp_path / "tok")), "eval_fraction": 0.1,
                                       **values}).task
    return build_task(config, seed=1)


def test_prompt_tokens_are_masked_and_completion_tokens_scored_token_by_token(tmp_path):
    records = prompt_completion_records()
    task = task_of(tmp_path, write_records(tmp_path / "qa.jsonl", records))
    # Every 10th record is held out (eval_fraction 0.1): train sample 0 is record 0.
    sample = task.train_data[0]
    prompt, completion = list(records[0]["prompt"].encode()), list(records[0]["completion"].encode()) + [256]
    assert sample["input_ids"].tolist() == prompt + completion
    assert sample["labels"].tolist() == [-100] * len(prompt) + completion
    assert len(task.train_data) == 36 and len(task.eval_data) == 4
    assert task.fingerprint.startswith("instructions:")


def test_chat_records_render_with_the_template_and_score_only_the_assistant_reply(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    task = task_of(tmp_path, write_records(tmp_path / "chat.jsonl", [{"messages": messages}] * 12))
    sample = task.train_data[0]
    prompt = list(b"<system>be brief\n<user>2+2?\n<assistant>")
    completion = list(b"4\n") + [256]
    assert sample["input_ids"].tolist() == prompt + completion
    assert sample["labels"].tolist() == [-100] * len(prompt) + completion


def test_a_batch_pads_its_samples_and_no_sample_sees_another(tmp_path):
    task = task_of(tmp_path, write_records(tmp_path / "qa.jsonl", prompt_completion_records()))
    model = task.model.eval()
    short, long = task.train_data[1], task.train_data[20]
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = task.collate_fn([short, long])
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == -100).all(), "padding is never scored"
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=short["input_ids"][None]).logits
    assert torch.allclose(together[0, :n], alone[0], atol=1e-5), "the short sample's logits depend on the other"
    with torch.no_grad():  # the loss of the batch is the mean over both samples' completion tokens only
        loss = task.loss(model, batch)
        logits = [model(input_ids=s["input_ids"][None]).logits[0] for s in (short, long)]
    token_losses = torch.cat([torch.nn.functional.cross_entropy(lg[:-1], s["labels"][1:], ignore_index=-100,
                                                                reduction="none")[s["labels"][1:] != -100]
                              for lg, s in zip(logits, (short, long))])
    assert loss.item() == pytest.approx(token_losses.mean().item(), rel=1e-5)


def test_eval_perplexity_is_exp_of_the_mean_completion_token_loss(tmp_path):
    task = task_of(tmp_path, write_records(tmp_path / "qa.jsonl", prompt_completion_records()))
    model = task.model.eval()
    samples = [task.eval_data[i] for i in range(len(task.eval_data))]
    with torch.no_grad():
        metrics = metrics_from_sums({k: float(v) for k, v in evaluation_sums(
            task, model, [task.collate_fn(samples[:3]), task.collate_fn(samples[3:])], "cpu").items()})
        losses = []
        for s in samples:
            logits = model(input_ids=s["input_ids"][None]).logits[0]
            scored = s["labels"][1:] != -100
            losses.append(torch.nn.functional.cross_entropy(logits[:-1][scored], s["labels"][1:][scored],
                                                            reduction="none"))
    mean = torch.cat(losses).mean().item()
    assert metrics["val_loss"] == pytest.approx(mean, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_eval_samples_continue_the_eval_prompts(tmp_path):
    records = prompt_completion_records()
    task = task_of(tmp_path, write_records(tmp_path / "qa.jsonl", records), sample_chars=4)
    text = task.sample(task.model.eval(), torch.Generator().manual_seed(0))
    first, second = text.split("\n----\n")
    assert first.startswith(records[9]["prompt"]) and second.startswith(records[19]["prompt"])  # held-out ones


@pytest.mark.parametrize("records,message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 4, "role 'assistant'"),
    ([{"prompt": "a", "completion": 3}] * 4, "accepted"),
], ids=["chat-without-reply", "completion-not-text"])
def test_bad_records_name_the_line(tmp_path, records, message):
    with pytest.raises(UsageError, match=f"line 1.*{message}|{message}"):
        task_of(tmp_path, write_records(tmp_path / "bad.jsonl", records))


def test_chat_records_need_a_tokenizer_with_a_chat_template(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    data = write_records(tmp_path / "chat.jsonl", [{"messages": messages}] * 12)
    config = build_config(flag_values={"task": "causal-lm", "block_size": 48, "data": str(data),
                                       "model_config": str(llama_config(tmp_path / "config.json"))}).task
    with pytest.raises(UsageError, match="chat template"):
        build_task(config, seed=1)
