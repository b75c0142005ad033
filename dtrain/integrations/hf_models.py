"""Hugging Face models and tokenizers for the causal-lm task.

A model comes from a directory written by `save_pretrained` (or a hub id), from a `config.json` (randomly
initialised, seeded by the run's seed), or, with neither, is a small GPT-2 shaped by --n-layer/--n-head/--n-embd
so the task runs offline from nothing. The tokenizer is --tokenizer, else the model directory's, else a
byte-level tokenizer whose 256 ids are the bytes themselves (built with `tokenizers`, so `AutoTokenizer` reloads
it from a saved directory).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from accelerate.logging import get_logger

from dtrain.config import TaskConfig
from dtrain.errors import UsageError

logger = get_logger(__name__)

HF_EXTRA = 'pip install -e ".[hf]"'
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def require_hf(module: str = "transformers"):
    """Imports a module of the hf extra; without it, the one error a user sees names the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"task causal-lm needs Hugging Face transformers and datasets, and {module} cannot be "
                         f"imported ({exc}); install the extra: {HF_EXTRA}") from None


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(".json") or text.count("/") > 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what the ByteLevel pre-tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = dict(zip(printable, printable)), 0
    for byte in range(256):
        if byte not in chars:
            chars[byte], extra = 256 + extra, extra + 1
    return {byte: chr(code) for byte, code in sorted(chars.items())}


def byte_level_tokenizer():
    """A tokenizer whose ids are the UTF-8 bytes of the text (256 ids, no merges, no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=1 << 30)


def load_tokenizer(config: TaskConfig):
    """--tokenizer, else the model directory's tokenizer, else the byte-level one."""
    from transformers import AutoTokenizer

    field, source = "tokenizer", config.tokenizer
    if source is None and config.model:
        model_dir = Path(config.model).expanduser()
        if not model_dir.exists() or any((model_dir / name).exists() for name in TOKENIZER_FILES):
            field, source = "model", config.model  # a hub id, or a directory holding a tokenizer
    if source is None:
        if config.model:
            logger.info(f"{config.model} holds no tokenizer: using the byte-level one (256 ids)")
        return byte_level_tokenizer()
    path = Path(source).expanduser()
    if not path.exists() and _looks_like_path(source):
        raise UsageError(f"invalid value for {field}: {source!r} does not exist; accepted: a tokenizer "
                         f"directory (save_pretrained) or a hub id")
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else source)
    except Exception as exc:  # transformers raises OSError, ValueError, ... for anything it cannot load
        raise UsageError(f"invalid value for {field}: cannot load a tokenizer from {source!r}: "
                         f"{_first_line(exc)}") from None


def read_model_config(source: str):
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"invalid value for model_config: {source!r} is not a file; accepted: a config.json "
                         f"as save_pretrained writes it")
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"invalid value for model_config: {source!r} is not a transformers model config "
                         f"(JSON with a known model_type): {_first_line(exc)}") from None


def default_model_config(config: TaskConfig, tokenizer):
    """A small GPT-2 for offline use, shaped by the generic task fields."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=len(tokenizer), n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=config.dropout,
                      embd_pdrop=config.dropout, attn_pdrop=config.dropout,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _from_config(model_config, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    # The initial weights are a function of the seed alone, whatever drew on the global RNG before.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return AutoModelForCausalLM.from_config(model_config)
        except ValueError as exc:  # a config class without a causal-LM model (e.g. BERT's)
            raise UsageError(f"invalid value for model_config: {type(model_config).__name__} has no causal-LM "
                             f"model in transformers: {_first_line(exc)}") from None


def _from_pretrained(source: str):
    from transformers import AutoModelForCausalLM

    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise UsageError(f"invalid value for model: {source!r} is not a model directory (no config.json); "
                         f"accepted: a directory written by save_pretrained, or a hub id")
    if not path.exists() and _looks_like_path(source):
        raise UsageError(f"invalid value for model: {source!r} does not exist; accepted: a directory written "
                         f"by save_pretrained, or a hub id")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else source)
    except Exception as exc:  # OSError (no weights), ValueError (not a causal LM), connection errors ...
        raise UsageError(f"invalid value for model: cannot load a causal LM from {source!r}: "
                         f"{_first_line(exc)}") from None


def max_positions(model_config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model_and_tokenizer(config: TaskConfig, seed: int):
    """The model (fp32, train mode) and tokenizer a TaskConfig names, checked against each other."""
    require_hf()
    tokenizer = load_tokenizer(config)
    if config.model:
        model = _from_pretrained(config.model)
    else:
        model_config = read_model_config(config.model_config) if config.model_config else \
            default_model_config(config, tokenizer)
        model = _from_config(model_config, seed)
    model.float()  # master weights in fp32; --mixed-precision decides the compute precision
    vocabulary = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocabulary:
        raise UsageError(f"invalid value for tokenizer: it has {len(tokenizer)} ids but the model's vocabulary "
                         f"holds {vocabulary} (vocab_size); accepted: a tokenizer whose ids fit the model")
    positions = max_positions(model.config)
    if positions is not None and config.block_size > positions:
        raise UsageError(f"invalid value for block_size: {config.block_size}; accepted: at most the model's "
                         f"{positions} positions")
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, tokenizer


def enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(f"invalid value for gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}  # the non-reentrant form works with DDP and unused parameters
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False  # a KV cache is of no use in training and conflicts with recomputation


# The config fields that decide the model's tensors: resuming with other values is refused.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer",
                "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "head_dim",
                "max_position_embeddings", "n_positions", "tie_word_embeddings")


def model_shape(model) -> dict:
    values = model.config.to_dict()
    return {name: values[name] for name in SHAPE_FIELDS if name in values}
