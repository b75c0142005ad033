"""Which tier a `--resume latest|auto` comes from: the newest step that is complete for every rank somewhere.

Every node's first process reports what its tier holds newer than the persistent tier's latest: for each
`node_{j}/step_N` it keeps (its own, and the replicas it keeps for peers) that verifies (sizes, and checksums
when asked), the world size it was written with and whose RNG files it has. The reports are gathered on every
rank, so every rank picks the same step: the newest N for which every node j of this run has `node_{j}/step_N`
with the RNG files of all of j's ranks on some node. Then:

- every node holds its own copy: the tier is "local";
- some node came back empty (a replaced machine, a wiped RAM disk): a node holding its replica sends it the files
  (replication.exchange, committed with the same protocol), and the tier is "peer";
- no step newer than the persistent tier's latest is complete: the persistent tier, as without a local tier.

A step chosen from a fast tier is then promoted: committed to the persistent tier (`CheckpointManager.
commit_copy`) before training goes on, unless that tier already holds it, so a local checkpoint is promoted once
and the persistent tier's lineage (parents, retention, fallback) stays whole. A sharded run's local checkpoint
indexes each rank's shards on their own, which no copy turns into one persistent DCP checkpoint: it is promoted
right after it is loaded, by a save of that state under its own trainer state (`CheckpointManager.commit_loaded`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from accelerate.logging import get_logger

from dtrain.checkpoint.layout import MANIFEST, file_owner, parse_step, read_trainer_state, step_dir_name, step_dirs, \
    verify_checkpoint
from dtrain.checkpoint.local_tier import LocalTier, node_dir_name
from dtrain.checkpoint.names import regular_files
from dtrain.checkpoint.replication import exchange
from dtrain.checkpoint.sharded import local_shard_ranks
from dtrain.checkpoint.snapshot import is_fsdp2
from dtrain.distributed import gather_objects, run_and_agree
from dtrain.errors import CheckpointError

logger = get_logger(__name__)

RNG_FILE = re.compile(r"random_states_([0-9]+)\.pkl")


@dataclass
class TierChoice:
    step: int
    tier: str  # "local" or "peer"
    path: Path  # this node's copy, in its own tier
    sharded: bool = False  # a sharded run's (each rank's shards on their own): promoted after it is loaded


def holdings(tier: LocalTier, above: int | None, checksums: bool) -> list[tuple[int, int, int, bool, list[int]]]:
    """(owner node, step, world size, whether it holds shards, the ranks it can resume: RNG file, and shards if
    sharded) of each complete checkpoint this node's tier keeps above step `above`."""
    found = []
    for owner, directory in sorted(tier.node_dirs().items()):
        for path in step_dirs(directory):
            step = parse_step(path.name)
            if above is not None and step <= above:
                continue
            check = verify_checkpoint(path, checksums)
            if not check.ok:
                logger.warning(f"skipping damaged local checkpoint {path}: {check.reason}", main_process_only=False)
                continue
            try:
                world_size = int(read_trainer_state(path).get("world_size", 0))
            except (OSError, ValueError):
                continue
            ranks = sorted(int(m.group(1)) for m in map(RNG_FILE.fullmatch, regular_files(path)) if m)
            shards = local_shard_ranks(path)  # a sharded run's: each rank needs its own shards too
            if shards:
                ranks = sorted(set(ranks) & set(shards))
            found.append((owner, step, world_size, bool(shards), ranks))
    return found


def choose(tier: LocalTier, persistent_step: int | None, checksums: bool) -> TierChoice | None:
    """The newest step complete for every rank in the fast tiers, newer than `persistent_step`, brought to every
    node that lacks its own copy; None: resume from the persistent tier. Call on every rank."""
    nodes, world, sharded_run = tier.nodes, tier.accelerator.num_processes, is_fsdp2(tier.accelerator)
    report: list = []
    ok, error = run_and_agree(lambda: report.extend(holdings(tier, persistent_step, checksums)), tier.is_first,
                              tier.device)
    if not ok:
        logger.warning(f"could not read the local tier ({error}); resuming from the persistent tier")
        return None
    keepers: dict[tuple[int, int], list[int]] = {}  # (owner node, step) -> nodes that keep a complete copy
    for holder, held in enumerate(gather_objects((nodes.index, report))):
        node, entries = held
        for owner, step, world_size, sharded, ranks in entries:
            if owner < nodes.count and world_size == world and sharded == sharded_run \
                    and set(nodes.members[owner]) <= set(ranks):
                keepers.setdefault((owner, step), []).append(node)
    steps = sorted({step for _, step in keepers}, reverse=True)
    step = next((s for s in steps if all((j, s) in keepers for j in range(nodes.count))), None)
    if step is None:
        return None
    missing = [j for j in range(nodes.count) if j not in keepers[(j, step)]]
    for j in missing:  # the same order on every rank: one transfer at a time, between two first processes
        holder = keepers[(j, step)][0]
        _transfer(tier, j, holder, step)
    return TierChoice(step, "peer" if missing else "local", tier.base / node_dir_name(nodes.index) / step_dir_name(step),
                      sharded_run)


def _transfer(tier: LocalTier, owner: int, holder: int, step: int) -> None:
    """Node `holder` sends node `owner`'s copy of `step` to node `owner`, which commits it in its own tier."""
    nodes = tier.nodes
    me = nodes.index

    def move() -> None:
        if me == holder:
            exchange(tier, tier.base / node_dir_name(owner) / step_dir_name(step), owner, step, nodes.first(owner),
                     None)
        elif me == owner:
            exchange(tier, None, owner, step, None, nodes.first(holder))

    ok, error = run_and_agree(move, tier.is_first and me in (owner, holder), tier.device, tier.group)
    if not ok:
        raise CheckpointError(f"node {owner} could not get its copy of {step_dir_name(step)} from node {holder} "
                              f"({error or 'it failed on another rank'})")
    logger.warning(f"node {owner} came back without its local checkpoint {step_dir_name(step)}: received the "
                   f"replica node {holder} keeps", main_process_only=True)


def needs_promotion(checkpoints, step: int) -> bool:
    """Whether the persistent tier lacks a complete checkpoint of `step` (a local one is promoted only once)."""
    name = step_dir_name(step)
    return not (name in checkpoints.storage.step_names() and checkpoints.storage.verify(name).ok)


def promote(checkpoints, choice: TierChoice, rank: int) -> bool:
    """Commits the chosen full-state local checkpoint (a persistent one already, file by file) to the persistent
    tier (every rank), unless it already holds it. Each rank copies the files it would have written itself (its
    RNG file; rank 0 also the shared state). A sharded one is promoted once loaded (`promote_loaded`)."""
    name = step_dir_name(choice.step)
    if not needs_promotion(checkpoints, choice.step):
        return False
    names = [n for n in regular_files(choice.path) if n != MANIFEST and file_owner(n) == rank]
    report = checkpoints.commit_copy(choice.step, choice.path, names)
    logger.info(f"promoted the local checkpoint {name} to the persistent tier ({report.path}, "
                f"{report.total_seconds:.2f}s)")
    return True


def promote_loaded(checkpoints, choice: TierChoice, saved: dict) -> bool:
    """Commits the state just loaded from a sharded local checkpoint to the persistent tier (every rank), as a
    persistent sharded checkpoint under the local one's own trainer state (its lineage included), unless that
    tier already holds the step."""
    if not needs_promotion(checkpoints, choice.step):
        return False
    report = checkpoints.commit_loaded(choice.step, saved)
    logger.info(f"promoted the local checkpoint {step_dir_name(choice.step)} to the persistent tier, its shards "
                f"saved again by every rank ({report.path}, {report.total_seconds:.2f}s)")
    return True
