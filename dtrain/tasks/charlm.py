"""Character-level transformer language model (a small GPT), trained on text.

Default corpus: the Python standard library's own top-level `.py` sources, in sorted order, so every machine
has it and nothing is downloaded. Text is read as UTF-8 bytes: a fixed 256-symbol vocabulary means the model's
shape never depends on the data.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from dtrain.config import TaskConfig
from dtrain.errors import UsageError
from dtrain.tasks.base import Task

VOCAB_SIZE = 256
EVAL_FRACTION = 0.1
SAMPLE_PROMPT = b"def "


def default_corpus(max_bytes: int) -> tuple[bytes, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if total >= max_bytes:
            break
        text = path.read_bytes()[: max_bytes - total]
        chunks.append(text)
        total += len(text)
    return b"".join(chunks), f"python-stdlib:{stdlib}"


def read_corpus(data: str) -> tuple[bytes, str]:
    path = Path(data)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise UsageError(f"invalid value for data: {data!r}; accepted: an existing text file or folder")
    corpus = b"".join(p.read_bytes() for p in files)
    return corpus, f"files:{path.resolve()}"


class CharChunks(Dataset):
    """Non-overlapping windows of `block_size` bytes; sample i predicts bytes 1..B from bytes 0..B-1."""

    def __init__(self, data: torch.Tensor, block_size: int):
        self.data = data
        self.block_size = block_size

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.block_size
        chunk = self.data[start:start + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.ln_1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class CharTransformer(nn.Module):
    def __init__(self, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.tok_emb = nn.Embedding(VOCAB_SIZE, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, VOCAB_SIZE, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int, generator: torch.Generator,
                 temperature: float = 0.8, top_k: int = 40) -> torch.Tensor:
        idx = prompt
        for _ in range(new_tokens):
            logits = self(idx[:, -self.block_size:])[:, -1, :] / temperature
            top = torch.topk(logits, top_k).values[:, [-1]]
            probs = F.softmax(logits.masked_fill(logits < top, float("-inf")), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), y.reshape(-1))


def make_sampler(new_tokens: int):
    def sample(model: nn.Module, generator: torch.Generator) -> str:
        device = next(model.parameters()).device
        prompt = torch.tensor([list(SAMPLE_PROMPT)], dtype=torch.long, device=device)
        out = model.generate(prompt, new_tokens, generator)
        return bytes(out[0].tolist()).decode("utf-8", errors="replace")

    return sample


def build(config: TaskConfig, seed: int) -> Task:
    corpus, source = read_corpus(config.data) if config.data else default_corpus(config.corpus_bytes)
    if len(corpus) < 4 * (config.block_size + 1):
        raise UsageError(f"invalid value for data: {source} holds {len(corpus)} bytes; "
                         f"accepted: text of at least {4 * (config.block_size + 1)} bytes for block_size {config.block_size}")
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
    split = int(len(data) * (1 - EVAL_FRACTION))
    return Task(
        name="charlm",
        model=CharTransformer(config.block_size, config.n_layer, config.n_head, config.n_embd, config.dropout),
        train_data=CharChunks(data[:split], config.block_size),
        eval_data=CharChunks(data[split:], config.block_size),
        loss=lm_loss,
        sample=make_sampler(config.sample_chars) if config.sample_chars else None,
        shape={"task": "charlm", "block_size": config.block_size, "n_layer": config.n_layer,
               "n_head": config.n_head, "n_embd": config.n_embd},
        fingerprint=f"{source}#bytes={len(corpus)}#sha256={hashlib.sha256(corpus).hexdigest()[:16]}",
    )
