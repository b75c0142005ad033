"""Sharded checkpoints (FSDP2): what Accelerate's save_state writes under sharding, read back in one process.

Under `--sharding fsdp2` every rank writes only its own shards, through torch.distributed.checkpoint (DCP):
`pytorch_model_fsdp_0/` (the model) and `optimizer_0/` (its optimizer), each holding one `__R_0.distcp` file per
rank and DCP's `.metadata`, beside the usual `scheduler.bin` and `random_states_R.pkl`. The commit protocol lists
every one of these files in the manifest like any other.

DCP's `.metadata` is a pickle that DCP's own reader unpickles when it loads a sharded checkpoint (Accelerate's
load_state, and `full_state` here): load sharded checkpoints only from places you trust.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

SHARDED_MODEL_DIR = "pytorch_model_fsdp_0"
SHARDED_OPTIMIZER_DIR = "optimizer_0"


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint directory holds sharded (DCP) model state rather than model.safetensors."""
    return (Path(checkpoint) / SHARDED_MODEL_DIR).is_dir()


def full_state(dcp_dir: Path) -> dict:
    """The whole state a DCP directory holds, gathered from every rank's shards, as plain tensors (one process,
    no process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="dtrain-dcp-") as temp:
        target = Path(temp) / "state.pt"
        dcp_to_torch_save(str(dcp_dir), str(target))
        return torch.load(target, weights_only=True)
