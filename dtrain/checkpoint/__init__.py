"""Checkpoints: the commit protocol, where checkpoints live, which one a name means, retention and verification.

- `manager`: the protocol (save, load, retention) the same for every storage, through the small `commit.Commit`
  interface: `local_commit` (rename in a directory), `store_commit` (manifest-last in an object store);
  `background` runs saves in a thread, `snapshot` and `writer` produce save_state's files in one pass.
- `location` decides where a run's checkpoints are; `resolve` which checkpoint latest/best/auto/a path means.
- `layout` names the files and verifies them; `records` and `lineage` follow runs; `retention` is pure logic.
- `storage` and `object_store`: the questions every reader asks of a directory or an object store.

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
