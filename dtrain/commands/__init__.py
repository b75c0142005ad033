"""Every `dtrain ...` subcommand (train, verify-resume, pipeline, ckpt, eval, plot, status) and the CLI parser that dispatches to them."""
