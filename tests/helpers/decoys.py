"""Decoys for tests of hostile inputs: a file and a directory outside everything dtrain may touch."""

from __future__ import annotations

import os
from pathlib import Path


class Decoys:
    """A file and a directory outside every checkpoint and output dir; `intact()` says nobody touched them."""

    def __init__(self, root: Path):
        self.dir = root / "decoy-dir"
        self.dir.mkdir()
        (self.dir / "keep.txt").write_text("keep me")
        self.file = root / "decoy.txt"
        self.file.write_text("precious")
        os.utime(self.file, (1_000_000, 1_000_000))
        self._mtime = self.file.stat().st_mtime_ns

    def intact(self) -> bool:
        return (self.file.read_text() == "precious" and self.file.stat().st_mtime_ns == self._mtime
                and (self.dir / "keep.txt").read_text() == "keep me")
