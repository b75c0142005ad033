"""`--task causal-lm`: a Hugging Face transformers causal language model (extra: pip install -e ".[hf]").

The model and tokenizer come from dtrain/integrations/hf_models.py, the packed token blocks from
dtrain/integrations/hf_data.py. Batches are {"input_ids": LongTensor[B, T]}; the model shifts the labels itself.
Instruction data (hf_instructions.py) adds "labels" (-100 on prompt and padding tokens) and "attention_mask".
With --peft the model is the frozen base of a PEFT adapter (peft_adapters.py).
Eval reports `val_loss` (mean token cross-entropy over the scored tokens: the completions of instruction data)
and `perplexity` (exp of that mean); samples are drawn with a small loop over the model's logits so that only
the trainer's generator is used (HF `generate` draws on the global RNG), from --sample-prompt, or for
instruction data from the first eval prompts.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.tasks.base import Task, batch_length

NAME = "causal-lm"
TEMPERATURE, TOP_K = 0.8, 40


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of the scored tokens: every next token of a block, or the labels that are not -100."""
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch.get("attention_mask"), labels=batch.get("labels", ids),
                 use_cache=False).loss


def evaluate(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    if "labels" not in batch:
        # Every block has the same length, so the per-sample mean of the batch mean is the per-token mean.
        n = batch_length(batch)
        loss = causal_lm_loss(model, batch).detach().float() * n
        return {"val_loss": loss, "perplexity": loss.clone(), "count": torch.tensor(float(n))}
    # Samples score different numbers of tokens: sum over the scored tokens, counted one by one.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    total = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=-100, reduction="sum").detach()
    return {"val_loss": total, "perplexity": total.clone(), "count": (labels != -100).sum().float()}


def make_sampler(tokenizer, prompts: list[list[int]], new_tokens: int, context: int):
    """Continues each prompt (token ids) by `new_tokens` sampled tokens, stopping early at EOS."""
    eos = tokenizer.eos_token_id

    @torch.no_grad()
    def sample(model: nn.Module, generator: torch.Generator) -> str:
        device = next(model.parameters()).device
        texts = []
        for prompt_ids in prompts:
            ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
            for _ in range(new_tokens):
                logits = model(input_ids=ids[:, -context:], use_cache=False).logits[:, -1, :].float() / TEMPERATURE
                kth = torch.topk(logits, min(TOP_K, logits.shape[-1])).values[:, [-1]]
                probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
                if eos is not None and ids[0, -1].item() == eos:
                    break
            texts.append(tokenizer.decode(ids[0].tolist()))
        return "\n----\n".join(texts)

    return sample


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise UsageError(f"invalid value for sample_prompt: {prompt!r} gives no tokens; accepted: a non-empty text")
    return prompt_ids


def build(config: TaskConfig, seed: int) -> Task:
    from dtrain.integrations.hf_data import collate_blocks, load_lm_data
    from dtrain.integrations.hf_models import build_model_and_tokenizer, model_shape
    from dtrain.integrations.peft_adapters import adapter_shape, uses_peft, wrap_with_adapter

    model, tokenizer = build_model_and_tokenizer(config, seed)
    data = load_lm_data(config, tokenizer)
    shape = {"task": NAME, **model_shape(model)}
    if uses_peft(config):
        model = wrap_with_adapter(model, config, seed)
        shape["adapter"] = adapter_shape(model)
    sample = None
    if config.sample_chars:
        prompts = data.eval_prompts or [prompt_tokens(tokenizer, config.sample_prompt)]
        sample = make_sampler(tokenizer, prompts, config.sample_chars, config.block_size)
    return Task(
        name=NAME,
        model=model,
        train_data=data.train,
        eval_data=data.eval,
        loss=causal_lm_loss,
        evaluate=evaluate,
        sample=sample,
        collate_fn=data.collate or collate_blocks,
        shape=shape,
        fingerprint=data.fingerprint,
    )
