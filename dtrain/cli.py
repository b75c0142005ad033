"""`python -m dtrain.cli ...` (e.g. `accelerate launch -m dtrain.cli pipeline run FILE`): the `dtrain` command,
whose parser and subcommands live in dtrain/commands/."""

import sys

from dtrain.commands.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
