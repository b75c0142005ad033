"""Errors that map to the exit codes of the contract."""


class UsageError(Exception):
    """Bad usage, bad config, an unusable resume target or a refused overwrite: exit 2, one line, no traceback."""

    exit_code = 2


class CheckpointError(Exception):
    """A checkpoint could not be written or committed; earlier checkpoints are untouched. Exit 1."""

    exit_code = 1


class Interrupted(Exception):
    """Training stopped on a signal after its checkpoint was committed: exit 128 + signal number."""

    def __init__(self, signum: int, checkpoint: str | None = None):
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class OutOfTime(Interrupted):
    """Training stopped by `--max-time` after its checkpoint was committed: exit 124 (as `timeout` does)."""

    def __init__(self, checkpoint: str | None = None):
        Exception.__init__(self, "stopped by --max-time")
        self.signum = 0
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 124
