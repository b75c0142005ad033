"""Language models with tied weights (the output layer reuses the token embedding), loaded as user tasks:
`--task tests.helpers.tied_tasks:NAME`.

- `tied_lm`: a plain-PyTorch causal LM, nanoGPT style (`head.weight = tok_emb.weight`).
- `gpt2_lm`: a tiny randomly initialised Hugging Face `GPT2LMHeadModel` (`lm_head.weight` is
  `transformer.wte.weight`), built from a config: nothing is downloaded.

Both train on in-memory token sequences; the shape flags (`--n-layer`, `--n-embd`, `--n-head`, `--block-size`,
`--dropout`) size the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from dtrain.config import TaskConfig
from dtrain.tasks.base import Task

VOCAB_SIZE = 64
TRAIN_SEQUENCES = 512
EVAL_SEQUENCES = 64


def token_data(seed: int, block_size: int) -> tuple[TensorDataset, TensorDataset]:
    """Sequences with something to learn: each token is the previous one plus a per-sequence stride, sometimes
    replaced by noise."""
    generator = torch.Generator().manual_seed(seed)
    count, length = TRAIN_SEQUENCES + EVAL_SEQUENCES, block_size + 1
    start = torch.randint(0, VOCAB_SIZE, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    tokens = (start + stride * torch.arange(length)) % VOCAB_SIZE
    noise = torch.rand(count, length, generator=generator) < 0.1
    tokens = torch.where(noise, torch.randint(0, VOCAB_SIZE, (count, length), generator=generator), tokens)
    return TensorDataset(tokens[:TRAIN_SEQUENCES]), TensorDataset(tokens[TRAIN_SEQUENCES:])


class TiedLM(nn.Module):
    """A minimal GPT: token + position embeddings, pre-norm transformer blocks, an output layer tied to the
    token embedding."""

    def __init__(self, config: TaskConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB_SIZE, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size + 1, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(config.n_embd, config.n_head, 4 * config.n_embd, config.dropout,
                                       batch_first=True, norm_first=True)
            for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, VOCAB_SIZE, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying, as nanoGPT does it

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(torch.arange(length, device=tokens.device)))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.ln_f(x))


def next_token_loss(model: nn.Module, batch) -> torch.Tensor:
    (tokens,) = batch
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def hf_causal_lm_loss(model: nn.Module, batch) -> torch.Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def _shape(config: TaskConfig, model: str) -> dict:
    return {"model": model, "n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
            "block_size": config.block_size, "vocab_size": VOCAB_SIZE}


def tied_lm(config: TaskConfig, seed: int) -> Task:
    train, evaluation = token_data(seed, config.block_size)
    return Task(name="tied_lm", model=TiedLM(config), train_data=train, eval_data=evaluation,
                loss=next_token_loss, shape=_shape(config, "TiedLM"), fingerprint=f"tokens/seed={seed}")


def gpt2_lm(config: TaskConfig, seed: int) -> Task:
    from transformers import GPT2Config, GPT2LMHeadModel

    model_config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=max(32, config.block_size + 1),
                              n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                              resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                              bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(model_config)
    train, evaluation = token_data(seed, config.block_size)
    return Task(name="gpt2_lm", model=model, train_data=train, eval_data=evaluation, loss=hf_causal_lm_loss,
                shape=_shape(config, "GPT2LMHeadModel"), fingerprint=f"tokens/seed={seed}")
