"""Checkpoints: commit protocol, retention, resolving resume targets and verification."""

from dtrain.checkpoint.layout import verify_checkpoint
from dtrain.checkpoint.manager import CheckpointManager, SaveReport
from dtrain.checkpoint.resolve import resolve_resume
from dtrain.checkpoint.retention import CheckpointRecord, RetentionPolicy

__all__ = ["CheckpointManager", "CheckpointRecord", "RetentionPolicy", "SaveReport", "resolve_resume",
           "verify_checkpoint"]
