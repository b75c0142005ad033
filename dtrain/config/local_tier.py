"""The node-local checkpoint tier's settings (docs/two-tier-checkpoints.md): where each node keeps its fast
checkpoints, how often it writes them, and how many other nodes keep a copy of each."""

from __future__ import annotations

from dataclasses import dataclass, field

from dtrain.errors import UsageError


def _opt(help: str) -> dict:
    return {"metadata": {"help": help, "choices": None}}


@dataclass
class LocalTierConfig:
    local_checkpoint_dir: str | None = field(default=None, **_opt(
        "node-local fast checkpoint tier (a RAM disk such as /dev/shm/RUN, or a local SSD); {node_rank} and "
        "{rank} in it are replaced per process; off when unset"))
    local_save_every_steps: int = field(default=0, **_opt("save to the local tier every N optimizer steps; 0 = off"))
    local_save_every_seconds: float = field(default=0.0, **_opt(
        "save to the local tier when N seconds passed since its last save; 0 = off"))
    # None = not given: 1 when the run has more than one node (local dir), else 0.
    local_replicas: int | None = field(default=None, **_opt(
        "how many other nodes keep a copy of each node's local checkpoints (default 1 with more than one node)"))

    def validate(self) -> None:
        if self.local_checkpoint_dir is not None and not self.local_checkpoint_dir.strip():
            _refuse("local_checkpoint_dir", "", "a directory")
        if self.local_save_every_steps < 0:
            _refuse("local_save_every_steps", self.local_save_every_steps, "an integer >= 0")
        if self.local_save_every_seconds < 0:
            _refuse("local_save_every_seconds", self.local_save_every_seconds, "a number >= 0")
        if self.local_replicas is not None and self.local_replicas < 0:
            _refuse("local_replicas", self.local_replicas, "an integer >= 0")
        cadence = self.local_save_every_steps or self.local_save_every_seconds or self.local_replicas
        if cadence and self.local_checkpoint_dir is None:
            name = next(n for n in ("local_save_every_steps", "local_save_every_seconds", "local_replicas")
                        if getattr(self, n))
            _refuse(name, getattr(self, name), "a value only with local_checkpoint_dir")
        if self.local_checkpoint_dir is not None:
            try:
                self.local_checkpoint_dir.format(node_rank=0, rank=0)
            except (KeyError, IndexError, ValueError):
                _refuse("local_checkpoint_dir", self.local_checkpoint_dir,
                        "a directory; the only placeholders are {node_rank} and {rank}")

    @property
    def enabled(self) -> bool:
        return self.local_checkpoint_dir is not None


def _refuse(name: str, value, accepted: str) -> None:
    raise UsageError(f"invalid value for {name}: {value!r}; accepted: {accepted}")
