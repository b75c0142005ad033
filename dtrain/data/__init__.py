"""Where the order of samples lives: what each rank reads, from which position, through which loader.

- `order`: the map-style resumable batch sampler (order a pure function of seed and epoch, O(1) skip).
- `eval`: how evaluation samples are split across ranks.
- `loader`: DataLoader construction (generator, worker set-up).
"""

from dtrain.data.eval import ShardedEvalSampler
from dtrain.data.loader import make_loader
from dtrain.data.order import ResumableBatchSampler, epoch_generator

__all__ = ["ResumableBatchSampler", "ShardedEvalSampler", "epoch_generator", "make_loader"]
