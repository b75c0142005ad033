"""Where checkpoint bytes go: a local directory (rename commit) or an object store (manifest-last commit).

Both answer the same questions for everything that reads or prunes checkpoints (resolution, retention, the
lineage, `dtrain ckpt`): which step names exist, what a pointer says, a checkpoint's trainer state, whether it
verifies, and how to delete one. How a checkpoint is written differs: local_commit.py and store_commit.py.
Which one a path or URI means is decided in location.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Union

from dtrain.checkpoint.layout import (Verification, read_pointer, read_trainer_state, step_dirs, verify_checkpoint,
                                      write_pointer)
from dtrain.checkpoint.object_store import ObjectStore
from dtrain.utils import remove_tree

# A checkpoint given by the user or found by resolution: a local directory, or the URI of a step prefix.
CheckpointLocation = Union[Path, str]


class CheckpointStorage(Protocol):
    is_remote: bool

    def url(self, *names: str) -> str: ...
    def step_names(self) -> list[str]: ...
    def read_pointer(self, name: str) -> str | None: ...
    def write_pointer(self, name: str, target: str) -> None: ...
    def delete_pointer(self, name: str) -> None: ...
    def read_trainer_state(self, step_name: str) -> dict: ...
    def verify(self, step_name: str, checksums: bool = False) -> Verification: ...
    def delete(self, step_name: str) -> None: ...
    def location(self, step_name: str) -> CheckpointLocation: ...
    def remember_trainer_states(self) -> None: ...


class LocalDirectory:
    """Checkpoints as directories of one POSIX directory that every rank sees."""

    is_remote = False

    def __init__(self, path: str | os.PathLike):
        self.dir = Path(path)

    def __repr__(self) -> str:
        return f"LocalDirectory({str(self.dir)!r})"

    def url(self, *names: str) -> str:
        return str(self.dir.joinpath(*names))

    def location(self, step_name: str) -> Path:
        return self.dir / step_name

    def step_names(self) -> list[str]:
        return [p.name for p in step_dirs(self.dir)]

    def read_pointer(self, name: str) -> str | None:
        return read_pointer(self.dir, name)

    def write_pointer(self, name: str, target: str) -> None:
        write_pointer(self.dir, name, target)

    def delete_pointer(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def read_trainer_state(self, step_name: str) -> dict:
        return read_trainer_state(self.dir / step_name)

    def remember_trainer_states(self) -> None:
        pass  # reading a local file costs less than remembering it

    def verify(self, step_name: str, checksums: bool = False) -> Verification:
        return verify_checkpoint(self.dir / step_name, checksums)

    def delete(self, step_name: str) -> None:
        remove_tree(self.dir / step_name)


class RemoteStore(ObjectStore):
    """An ObjectStore seen through the CheckpointStorage questions."""

    is_remote = True

    def location(self, step_name: str) -> str:
        return self.url(step_name)
