"""Checkpoints: commit protocol (manager), retention (pure), resolving resume targets, verification (layout).

Names are imported lazily so that the pure retention policy can be used without torch.
"""

from dtrain.utils import lazy_exports

_EXPORTS = {
    "CheckpointManager": "dtrain.checkpoint.manager",
    "SaveReport": "dtrain.checkpoint.manager",
    "CheckpointRecord": "dtrain.checkpoint.retention",
    "RetentionPolicy": "dtrain.checkpoint.retention",
    "resolve_resume": "dtrain.checkpoint.resolve",
    "verify_checkpoint": "dtrain.checkpoint.layout",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports("dtrain.checkpoint", _EXPORTS)
