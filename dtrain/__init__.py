"""dtrain: a distributed-ready PyTorch trainer on Hugging Face Accelerate whose runs survive interruptions.

    from dtrain import Config, Trainer, Task, CheckpointManager

Names are imported lazily, so `import dtrain.checkpoint.retention` (pure logic) does not pull in torch.
"""

__version__ = "0.1.0"

# utils records the parent pid first thing, before anything heavy is imported: a launcher that dies while torch
# is still loading must be noticed too.
from dtrain.utils import PARENT_PID_AT_START, lazy_exports  # noqa: E402,F401

_EXPORTS = {
    "Config": "dtrain.config",
    "Trainer": "dtrain.training.trainer",
    "FitResult": "dtrain.training.trainer",
    "Task": "dtrain.tasks.base",
    "CheckpointManager": "dtrain.checkpoint.manager",
    "RetentionPolicy": "dtrain.checkpoint.retention",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("dtrain", _EXPORTS)
