"""Where the order of samples lives: what each rank reads, from which position, through which loader.

- `source`: what the Trainer holds (`TrainSource`): the loader from a position, the position now, a digest of
  the next micro-batch; `build` chooses `ordered.OrderedSource` for map-style data or `stream.StatefulSource`
  for streams and samplers with their own state.
- `order`: the map-style resumable batch sampler (order a pure function of seed and epoch, O(1) skip).
- `stream`: IterableDatasets: sharding across ranks, exact resume from state or by replay.
- `loader`: DataLoader construction; reading a user's own DataLoader (`LoaderSettings`).
- `workers`: worker seeds as a pure function of (seed, epoch, rank, worker / micro-batch).
- `eval`: how evaluation samples are split across ranks.
"""

from dtrain.data.eval import ShardedEvalSampler
from dtrain.data.loader import LoaderSettings, make_loader, settings_from_dataloader
from dtrain.data.order import ResumableBatchSampler, epoch_generator
from dtrain.data.build import build_train_source
from dtrain.data.ordered import OrderedSource
from dtrain.data.source import TrainSource

__all__ = ["LoaderSettings", "OrderedSource", "ResumableBatchSampler", "ShardedEvalSampler", "TrainSource",
           "build_train_source", "epoch_generator", "make_loader", "settings_from_dataloader"]
