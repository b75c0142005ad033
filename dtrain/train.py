"""dtrain's entry script: `accelerate launch dtrain/train.py [ARGS]` (also torchrun, python, `dtrain train`).

Parse the config, set up Accelerate, build the task, train (dtrain/commands/train.py, dtrain/training/run.py).
Exit codes: 0 finished, 1 failed, 2 bad usage, 128+N stopped by signal N after a committed checkpoint; the main
process also records the outcome in OUTPUT_DIR/exit_status.json, since launchers replace these codes with their own.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script: import the dtrain package from the repository, and keep this folder (whose module
    # names are generic, e.g. `config`) off the import path.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from dtrain.commands.train import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]  # and `train`, loaded on first use (below)


def __getattr__(name: str):
    if name == "train":  # `from dtrain.train import train`: kept lazy, so `--help` does not import torch
        from dtrain.training.run import train

        return train
    raise AttributeError(f"module 'dtrain.train' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
