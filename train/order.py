"""`cavmae-train order`: the micro-batches one rank reads in one epoch, as training computes them
(`train.epochs`), one line per micro-batch with its sample keys in order: what GPU R of W sees, without a GPU."""

from __future__ import annotations

from cavmae.shards.config import Config
from cavmae.train import stage as st


def run(cfg: Config, *, shards: str, epoch: int, world_size: int, rank: int, stage: str) -> None:
    """Print the keys of rank `rank` of `world_size` in `epoch` (1-based) with the sizes of `stage`."""
    if not 0 <= rank < world_size:
        raise st.UsageError(f"--rank must be in 0..{world_size - 1}; got {rank}")
    section = cfg[stage]
    urls = st.shard_urls(shards, "--shards")
    index, plan = st.epoch_plan(urls, cfg, section, stage, balanced=stage == "finetune" and section.balanced,
                                world_size=world_size, rank=rank)
    order = plan.order(epoch - 1)
    for positions in plan.positions(0, plan.batches):
        print(" ".join(index.key_of(i) for i in order[positions]))
