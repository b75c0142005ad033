"""Checkpoints: commit protocol (manager), retention (pure), resolving resume targets, verification (layout).

Names are imported lazily so that the pure retention policy can be used without torch.
"""

_EXPORTS = {
    "CheckpointManager": "dtrain.checkpoint.manager",
    "SaveReport": "dtrain.checkpoint.manager",
    "CheckpointRecord": "dtrain.checkpoint.retention",
    "RetentionPolicy": "dtrain.checkpoint.retention",
    "resolve_resume": "dtrain.checkpoint.resolve",
    "verify_checkpoint": "dtrain.checkpoint.layout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dtrain.checkpoint' has no attribute {name!r}")
