"""`from dtrain.export import load_exported`: the model of a `dtrain ckpt export` file (see dtrain/commands/export.py)."""

from dtrain.commands.export import export_checkpoint, load_exported, read_export_metadata

__all__ = ["export_checkpoint", "load_exported", "read_export_metadata"]
