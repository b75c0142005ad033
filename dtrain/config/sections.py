"""The config's sections: small validated dataclasses, one per concern, and the Config that holds them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtrain.checksum import ALGORITHMS, DEFAULT_CHECKSUM, check_algorithm
from dtrain.config.local_tier import LocalTierConfig
from dtrain.durations import parse_duration
from dtrain.errors import UsageError

ALGORITHMS_ACCEPTED = tuple(ALGORITHMS)


def _opt(help: str, choices: tuple | None = None, **kwargs) -> dict:
    return {"metadata": {"help": help, "choices": choices}, **kwargs}


BUILTIN_TASKS = ("charlm", "regression", "causal-lm")
HF_ONLY_FIELDS = ("model", "model_config", "tokenizer", "streaming", "gradient_checkpointing", "peft", "peft_config")
PEFT_METHODS = ("none", "lora")
# None = not given: peft's own default (r 8, alpha 8, dropout 0, the target modules peft knows for the architecture).
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


@dataclass
class TaskConfig:
    task: str = field(default="charlm", **_opt("built-in task (charlm, regression, causal-lm) or "
                                               "package.module:function"))
    data: str | None = field(default=None, **_opt("task input; charlm: a text file or folder (default: Python's "
                                                  "stdlib sources); causal-lm: also a datasets directory or name"))
    block_size: int = field(default=64, **_opt("context length in characters (charlm)"))
    n_layer: int = field(default=4, **_opt("transformer layers (charlm) / hidden layers (regression)"))
    n_head: int = field(default=4, **_opt("attention heads (charlm)"))
    n_embd: int = field(default=128, **_opt("embedding / hidden width"))
    dropout: float = field(default=0.1, **_opt("dropout probability"))
    corpus_bytes: int = field(default=2_000_000, **_opt("charlm: bytes taken from the default corpus"))
    sample_chars: int = field(default=300, **_opt("characters (causal-lm: tokens) generated per eval sample; 0 = none"))
    # causal-lm: a Hugging Face transformers model (extra: pip install -e ".[hf]")
    model: str | None = field(default=None, **_opt("causal-lm: a model directory (save_pretrained) or hub id"))
    model_config: str | None = field(default=None, **_opt("causal-lm: a config.json for a randomly initialised model"))
    tokenizer: str | None = field(default=None, **_opt("causal-lm: tokenizer directory or hub id "
                                                       "(default: the model's, else byte-level)"))
    streaming: bool = field(default=False, **_opt("causal-lm: read --data as a stream (IterableDataset)"))
    eval_fraction: float = field(default=0.05, **_opt("causal-lm: share of the data held out for evaluation"))
    sample_prompt: str = field(default="def ", **_opt("causal-lm: prompt of the eval samples"))
    gradient_checkpointing: bool = field(default=False, **_opt("causal-lm: recompute activations in backward"))
    # causal-lm: a PEFT adapter on a frozen base (extra: pip install -e ".[hf]"); checkpoints hold the adapter only
    peft: str = field(default="none", **_opt("causal-lm: train an adapter on the frozen model", PEFT_METHODS))
    lora_r: int | None = field(default=None, **_opt("--peft lora: the adapter's rank (default: peft's, 8)"))
    lora_alpha: float | None = field(default=None, **_opt("--peft lora: the scaling alpha (default: peft's, 8)"))
    lora_dropout: float | None = field(default=None, **_opt("--peft lora: dropout before the adapter (default 0)"))
    lora_target_modules: str | None = field(default=None, **_opt(
        "--peft lora: module names to adapt, A,B or all-linear (default: what peft picks for the architecture)"))
    peft_config: str | None = field(default=None, **_opt(
        "causal-lm: a peft config (adapter_config.json as PeftConfig.save_pretrained writes it, or its directory) "
        "instead of the lora flags"))

    def validate(self) -> None:
        _check(self.block_size >= 1, "block_size", self.block_size, "an integer >= 1")
        _check(self.n_layer >= 1, "n_layer", self.n_layer, "an integer >= 1")
        _check(self.n_head >= 1, "n_head", self.n_head, "an integer >= 1")
        _check(self.n_embd >= 1 and self.n_embd % self.n_head == 0, "n_embd", self.n_embd,
               f"a positive multiple of n_head ({self.n_head})")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        _check(self.sample_chars >= 0, "sample_chars", self.sample_chars, "an integer >= 0")
        _check(self.corpus_bytes >= 1024, "corpus_bytes", self.corpus_bytes, "an integer >= 1024")
        if self.task not in BUILTIN_TASKS:
            module, _, function = self.task.partition(":")
            _check(bool(module) and function.isidentifier(), "task", self.task,
                   f"{', '.join(BUILTIN_TASKS)}, or package.module:function")
        self._validate_causal_lm()

    def _validate_causal_lm(self) -> None:
        _check(not (self.model and self.model_config), "model_config", self.model_config,
               "no value when model is set (model loads its own config)")
        _check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction, "a number in [0, 1)")
        _check(bool(self.sample_prompt) or self.sample_chars == 0, "sample_prompt", self.sample_prompt,
               "a non-empty text (or sample_chars 0)")
        for name in ("model", "model_config", "tokenizer"):
            _check(getattr(self, name) != "", name, "", "a path or hub id")
        self._validate_peft()
        if self.task in ("charlm", "regression"):  # user tasks may read these fields too
            given = [name for name in HF_ONLY_FIELDS if getattr(self, name) not in (None, False, "none")]
            _check(not given, given[0] if given else "", getattr(self, given[0]) if given else None,
                   "a value only with task causal-lm")

    def _validate_peft(self) -> None:
        given = [name for name in LORA_FIELDS if getattr(self, name) is not None]
        if given and self.peft != "lora":
            _check(False, given[0], getattr(self, given[0]), "a value only with peft lora")
        if given and self.peft_config:
            _check(False, given[0], getattr(self, given[0]), "no value with peft_config (the file holds it)")
        _check(self.lora_r is None or self.lora_r >= 1, "lora_r", self.lora_r, "an integer >= 1")
        _check(self.lora_alpha is None or (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)), "lora_alpha",
               self.lora_alpha, "a positive number")
        _check(self.lora_dropout is None or 0.0 <= self.lora_dropout < 1.0, "lora_dropout", self.lora_dropout,
               "a number in [0, 1)")
        if self.lora_target_modules is not None:
            names = [name.strip() for name in self.lora_target_modules.split(",")]
            _check(all(names), "lora_target_modules", self.lora_target_modules,
                   "module names separated by commas (A,B), or all-linear")
        _check(self.peft_config != "", "peft_config", "", "a peft config file (adapter_config.json) or its directory")


@dataclass
class TrainConfig:
    seed: int = field(default=1234, **_opt("random seed (data order, init, dropout)"))
    epochs: int = field(default=3, **_opt("epochs to train; 0 = no epoch limit"))
    max_steps: int = field(default=600, **_opt("optimizer steps to train; 0 = no step limit"))
    batch_size: int = field(default=32, **_opt("samples per process per micro-batch"))
    grad_accum: int = field(default=1, **_opt("micro-batches per optimizer step"))
    lr: float = field(default=3e-3, **_opt("peak learning rate"))
    weight_decay: float = field(default=0.01, **_opt("AdamW weight decay"))
    warmup_steps: int = field(default=50, **_opt("linear warm-up steps before the cosine decay"))
    min_lr_ratio: float = field(default=0.1, **_opt("final learning rate as a fraction of --lr"))
    grad_clip: float = field(default=1.0, **_opt("max gradient norm; 0 = off"))
    # None = not set by dtrain: the launcher decides (`accelerate launch --mixed_precision`, `--cpu`, or its
    # config file); the value actually used is written back into the config and the checkpoints.
    mixed_precision: str | None = field(default=None, **_opt(
        "autocast precision; default: what the launcher says (accelerate launch --mixed_precision or its "
        "config file), else no", ("no", "fp16", "bf16")))
    # None = not set by dtrain: the launcher decides (an Accelerate config with `distributed_type: FSDP`).
    sharding: str | None = field(default=None, **_opt(
        "shard parameters, gradients and optimizer state across the ranks (FSDP2, also on CPUs with gloo); "
        "default: what the launcher says (an accelerate config with distributed_type FSDP), else none",
        ("none", "fsdp2")))
    device: str = field(default="auto", **_opt("where to train; auto: the launcher's --cpu, else cuda if "
                                               "available, else cpu", ("auto", "cpu", "cuda")))
    num_workers: int = field(default=0, **_opt("DataLoader worker processes"))
    max_time: str | None = field(default=None, **_opt(
        "stop with a checkpoint before this wall-clock budget of the invocation runs out, HH:MM:SS or "
        "DD:HH:MM:SS; exit 124 (resumable)"))
    collective_timeout_seconds: float = field(default=600.0, **_opt(
        "how long a rank waits for the others in a collective (the exit barrier: at most 30 s) before it "
        "fails with an error: a dead or hung peer costs this long, never more"))

    def validate(self) -> None:
        _check(self.epochs >= 0, "epochs", self.epochs, "an integer >= 0")
        _check(self.max_steps >= 0, "max_steps", self.max_steps, "an integer >= 0")
        _check(self.epochs > 0 or self.max_steps > 0, "max_steps", self.max_steps,
               "a positive integer when epochs is 0 (one of them must end the run)")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "an integer >= 1")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "a positive number")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        if self.max_time is not None:
            parse_duration(self.max_time)  # raises on a bad value, naming the field
        _check(1 <= self.collective_timeout_seconds <= 86400, "collective_timeout_seconds",
               self.collective_timeout_seconds, "a number of seconds from 1 to 86400")


@dataclass
class EvalConfig:
    eval_every_steps: int = field(default=100, **_opt("evaluate every N optimizer steps; 0 = only at the end"))
    eval_max_batches: int = field(default=20, **_opt("batches per process per evaluation; 0 = whole eval split"))
    log_every_steps: int = field(default=10, **_opt("log training metrics every N optimizer steps"))
    monitor: str = field(default="val_loss", **_opt("eval metric for best checkpoints and early stopping"))
    mode: str = field(default="min", **_opt("whether a lower or higher monitor is better", ("min", "max")))
    early_stopping_patience: int = field(default=0, **_opt("evals without improvement before stopping; 0 = off"))
    log_with: str = field(default="none", **_opt("Accelerate tracker", ("none", "tensorboard", "wandb", "all")))

    def validate(self) -> None:
        for name in ("eval_every_steps", "eval_max_batches", "early_stopping_patience"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        _check(self.log_every_steps >= 1, "log_every_steps", self.log_every_steps, "an integer >= 1")
        _check(bool(self.monitor), "monitor", self.monitor, "an eval metric name such as val_loss")


@dataclass
class CheckpointConfig:
    save_every_steps: int = field(default=0, **_opt("save every N optimizer steps; 0 = off"))
    save_every_epochs: int = field(default=0, **_opt("save every N epochs; 0 = off"))
    # On by default: without it a crash, kill -9 or power loss loses the whole run (the end is always saved).
    save_every_seconds: float = field(default=600.0, **_opt("save when N seconds passed since the last save, so a "
                                                            "crash loses at most that much; 0 = off"))
    keep_last: int = field(default=3, **_opt("keep the newest N checkpoints; 0 = rule off"))
    keep_best: int = field(default=0, **_opt("keep the best K checkpoints by --monitor; 0 = rule off"))
    keep_every_steps: int = field(default=0, **_opt("never prune checkpoints whose step is a multiple of N"))
    resume: str = field(default="none", **_opt("none, latest, best, auto, or a checkpoint PATH"))
    init_from: str | None = field(default=None, **_opt("fresh start from the weights of this checkpoint dir or .safetensors file"))
    overwrite: bool = field(default=False, **_opt("allow a fresh start where checkpoints already exist"))
    async_save: bool = field(default=False, **_opt("write checkpoints in the background"))
    verify_checksums: bool = field(default=True, **_opt("check every file's checksum before resuming (latest/auto "
                                                        "skip a damaged checkpoint, a named one is refused)"))
    checksum: str = field(default=DEFAULT_CHECKSUM, **_opt("the manifest's per-file checksum", ALGORITHMS_ACCEPTED))
    allow_config_change: bool = field(default=False, **_opt("resume even if model-shaping fields changed"))
    strict_resume: bool = field(default=False, **_opt("exit 2 when the resume certificate shows that the next step "
                                                      "would differ from the interrupted run's (else a warning)"))
    allow_inexact_resume: bool = field(default=False, **_opt("resume a stream with another number of processes, "
                                                             "accepting that some samples are repeated or skipped"))
    agree_every_steps: int = field(default=1, **_opt("steps between the ranks' agreement on interrupts and "
                                                     "timed saves (one small all-reduce); raise if it is costly"))
    signal_grace_seconds: float = field(default=30.0, **_opt("time launchers allow after a signal; warn when saves take longer"))
    checkpoint_dir: str | None = field(default=None, **_opt(
        "where checkpoints go: a directory, or an object store URI such as s3://bucket/prefix (needs the s3 "
        "extra); default OUTPUT_DIR/checkpoints"))

    def validate(self) -> None:
        for name in ("save_every_steps", "save_every_epochs", "keep_last", "keep_best", "keep_every_steps"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
        check_algorithm(self.checksum)  # one of ALGORITHMS, its package installed
        _check(self.save_every_seconds >= 0, "save_every_seconds", self.save_every_seconds, "a number >= 0")
        _check(self.agree_every_steps >= 1, "agree_every_steps", self.agree_every_steps, "an integer >= 1")
        _check(self.signal_grace_seconds > 0, "signal_grace_seconds", self.signal_grace_seconds, "a number > 0")
        _check(bool(self.resume), "resume", self.resume, "none, latest, best, auto, or a checkpoint path")
        _check(self.checkpoint_dir is None or bool(self.checkpoint_dir.strip()), "checkpoint_dir",
               self.checkpoint_dir, "a directory, or a URI such as s3://bucket/prefix")


SECTIONS = {"task": TaskConfig, "train": TrainConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
            "local_tier": LocalTierConfig}


@dataclass
class Config:
    output_dir: str | None = None
    quick: bool = False
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    local_tier: LocalTierConfig = field(default_factory=LocalTierConfig)

    def validate(self) -> "Config":
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / task_short_name(self.task.task))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """All fields by their flag name, without sections."""
        out = {"output_dir": self.output_dir, "quick": self.quick}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out


# Fields that only matter for a quick smoke run; flags and config files still win over them.
QUICK_PRESET = {
    "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, "corpus_bytes": 100_000,
    "epochs": 0, "max_steps": 30, "batch_size": 8, "warmup_steps": 5,
    "eval_every_steps": 10, "eval_max_batches": 2, "log_every_steps": 5, "sample_chars": 60,
}

TOP_LEVEL_FIELDS = {
    "output_dir": "where everything of a run goes (default runs/<task>)",
    "quick": "a tiny smoke run: small model, few steps",
}


def task_short_name(task: str) -> str:
    return task.rsplit(":", 1)[-1] if ":" in task else task


def _check(ok: bool, name: str, value: Any, accepted: str) -> None:
    if not ok:
        raise UsageError(f"invalid value for {name}: {value!r}; accepted: {accepted}")


