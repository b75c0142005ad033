"""Pipelines: stages of training runs in order, each resumable, skipped when done, redone when stale.

`spec` reads the pipeline file, `state` tells where every stage stands (from its own outputs), `runner` runs
the stages; `dtrain pipeline run|status` are in dtrain/commands/pipeline.py.
"""
