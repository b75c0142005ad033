"""`--task causal-lm`: a Hugging Face transformers causal language model (extra: pip install -e ".[hf]").

The model and tokenizer come from dtrain/integrations/hf_models.py, the packed token blocks from
dtrain/integrations/hf_data.py. Batches are {"input_ids": LongTensor[B, T]}; the model shifts the labels itself.
Eval reports `val_loss` (mean token cross-entropy) and `perplexity`; samples are drawn with a small loop over
the model's logits so that only the trainer's generator is used (HF `generate` draws on the global RNG).
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
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def evaluate(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    # Every block has the same length, so the per-sample mean of the batch mean is the per-token mean.
    n = batch_length(batch)
    loss = causal_lm_loss(model, batch).detach().float() * n
    return {"val_loss": loss, "perplexity": loss.clone(), "count": torch.tensor(float(n))}


def make_sampler(tokenizer, prompt: str, new_tokens: int, context: int):
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise UsageError(f"invalid value for sample_prompt: {prompt!r} gives no tokens; accepted: a non-empty text")

    @torch.no_grad()
    def sample(model: nn.Module, generator: torch.Generator) -> str:
        device = next(model.parameters()).device
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
        for _ in range(new_tokens):
            logits = model(input_ids=ids[:, -context:], use_cache=False).logits[:, -1, :].float() / TEMPERATURE
            kth = torch.topk(logits, min(TOP_K, logits.shape[-1])).values[:, [-1]]
            probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return tokenizer.decode(ids[0].tolist())

    return sample


def build(config: TaskConfig, seed: int) -> Task:
    from dtrain.integrations.hf_data import collate_blocks, load_lm_data
    from dtrain.integrations.hf_models import build_model_and_tokenizer, model_shape

    model, tokenizer = build_model_and_tokenizer(config, seed)
    data = load_lm_data(config, tokenizer)
    sample = make_sampler(tokenizer, config.sample_prompt, config.sample_chars, config.block_size) \
        if config.sample_chars else None
    return Task(
        name=NAME,
        model=model,
        train_data=data.train,
        eval_data=data.eval,
        loss=causal_lm_loss,
        evaluate=evaluate,
        sample=sample,
        collate_fn=collate_blocks,
        shape={"task": NAME, **model_shape(model)},
        fingerprint=data.fingerprint,
    )
