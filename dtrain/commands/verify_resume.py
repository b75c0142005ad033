"""`dtrain verify-resume [ARGS]`: proves, for the user's own config, that stopping and resuming changes nothing.

It trains the config for `--verify-steps` steps straight, then again with a stop (handled exactly like a
signal: coordinated interrupt save) at `--stop-at` and a resume from that checkpoint, and compares the two
final checkpoints state by state: weights, optimizer, scheduler, RNG of every rank, and trainer progress.
Works under `accelerate launch` too (every rank runs the three phases).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as safe_load
from safetensors.torch import load_file

from dtrain.checkpoint.sharded import SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR, full_state, is_sharded
from dtrain.commands.common import run_main
from dtrain.config import Config, config_from_args
from dtrain.errors import Interrupted, UsageError

PROGRESS_FIELDS = ("global_step", "epoch", "step_in_epoch", "epoch_samples_seen", "samples_seen", "best_metric",
                   "best_step", "evals_without_improvement", "stopped_early", "last_eval")


def build_parser():
    from dtrain.commands.train import build_parser as train_parser

    parser = train_parser(prog="dtrain verify-resume")
    parser.description = "Train a few steps straight and with a stop + resume; report whether both ends match."
    parser.add_argument("--verify-steps", type=int, default=20, help="optimizer steps of each run (default 20)")
    parser.add_argument("--stop-at", type=int, default=None, help="step at which the second run is stopped "
                        "(default: just past the middle)")
    return parser


def run_variant(config: Config, output_dir: Path, resume: str, stop_at: int | None) -> None:
    from dtrain.training.run import train

    variant = copy.deepcopy(config)
    variant.output_dir = str(output_dir)
    variant.checkpoint.resume, variant.checkpoint.overwrite = resume, True
    try:
        train(variant, stop_at_step=stop_at)
    except Interrupted:
        if stop_at is None:
            raise


def compare_checkpoints(a: Path, b: Path) -> list[tuple[str, bool, str]]:
    """(state, identical, detail) for each part of two checkpoints."""
    rows = []
    wa, wb = _weights(a), _weights(b)
    diverged = [k for k in wa if k not in wb or not torch.equal(wa[k], wb[k])]
    rows.append(("model weights", not diverged, f"first differing: {diverged[:3]}" if diverged else f"{len(wa)} tensors"))
    if is_sharded(a):
        rows.append(("optimizer state", _equal(full_state(a / SHARDED_OPTIMIZER_DIR),
                                               full_state(b / SHARDED_OPTIMIZER_DIR)), ""))
    for name, label in (("optimizer.bin", "optimizer state"), ("scheduler.bin", "scheduler state")):
        if (a / name).exists():
            same = _equal(safe_load(a / name), safe_load(b / name))
            rows.append((label, same, ""))
    for file in sorted(a.glob("random_states_*.pkl")):
        sa, sb = safe_load(file), safe_load(b / file.name)
        for key in ("random_state", "numpy_random_seed", "torch_manual_seed", "torch_cuda_manual_seed"):
            if key in sa:
                rows.append((f"RNG {file.stem.split('_')[-1]} {key}", _equal(sa[key], sb.get(key)), ""))
    ta, tb = (json.loads((p / "trainer_state.json").read_text()) for p in (a, b))
    for key in PROGRESS_FIELDS:
        rows.append((f"trainer {key}", ta.get(key) == tb.get(key), f"{ta.get(key)!r} vs {tb.get(key)!r}"
                     if ta.get(key) != tb.get(key) else ""))
    return rows


def _weights(checkpoint: Path) -> dict:
    """The model's tensors: model.safetensors, or every rank's shards gathered (a sharded checkpoint)."""
    if is_sharded(checkpoint):
        return _flat(full_state(checkpoint / SHARDED_MODEL_DIR))
    return load_file(str(checkpoint / "model.safetensors"))


def _flat(state: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return isinstance(y, (list, tuple)) and len(x) == len(y) and all(_equal(i, j) for i, j in zip(x, y))
    if hasattr(x, "shape") and hasattr(x, "tolist"):  # numpy arrays
        return hasattr(y, "tolist") and x.tolist() == y.tolist()
    return x == y


def verify(args) -> bool:
    from dtrain.checkpoint.location import run_checkpoints
    from dtrain.checkpoint.resolve import find_latest
    from dtrain.commands.common import is_rank_zero

    config = config_from_args(args)
    steps = args.verify_steps
    stop_at = args.stop_at if args.stop_at is not None else steps // 2 + 1
    if not 0 < stop_at < steps:
        raise UsageError(f"invalid value for stop_at: {stop_at}; accepted: 1 .. {steps - 1} (below --verify-steps)")
    config.train.max_steps, config.train.epochs = steps, 0
    config.checkpoint.save_every_steps = config.checkpoint.save_every_epochs = 0
    config.checkpoint.save_every_seconds, config.checkpoint.keep_last = 0, 0
    config.checkpoint.checkpoint_dir = None  # each variant keeps its own checkpoints, in its own dir
    root = Path(config.output_dir) / "verify-resume"
    run_variant(config, root / "straight", "none", None)
    run_variant(config, root / "resumed", "none", stop_at)
    run_variant(config, root / "resumed", "latest", None)
    ends = [find_latest(run_checkpoints(root / name)).path for name in ("straight", "resumed")]
    rows = compare_checkpoints(*ends)
    identical = all(ok for _, ok, _ in rows)
    if is_rank_zero():
        print(f"\nverify-resume: {steps} steps straight vs stopped at step {stop_at} and resumed ({root})")
        for name, ok, detail in rows:
            print(f"  {'identical' if ok else 'DIVERGED ':<10} {name}{'  ' + detail if detail and not ok else ''}")
        print("RESULT: identical: resuming is exact" if identical else
              "RESULT: DIVERGED: the states marked above differ after a resume")
    return identical


def main(argv: list[str] | None = None) -> int:
    outcome = {}
    code = run_main(lambda: outcome.update(ok=verify(build_parser().parse_args(argv))))
    return code or (0 if outcome.get("ok") else 1)


if __name__ == "__main__":
    sys.exit(main())
