"""The data loaders: a training epoch's micro-batches in the planned order, and evaluation's one pass per shard.

Training reads the samples of an epoch in the order `train.epochs.EpochPlan` gives (a full permutation, the same
global steps on any number of GPUs and workers, every rank the same number of batches), each sample with one ranged
read of its bytes (`shards.index`), its mixup partner drawn from the whole set as the official loader does. Memory
is bounded by the batches in flight: there is no shuffle buffer. Evaluation streams each shard once, split by node
and by worker (`webdataset.DataPipeline`). Both hand on `train.transform.Transform`'s compact batches, finished on
the device by `train.augment.device_augment`.

Speed (bench/loader.py): reading the tar is the one tar layer, `shards.tar`, our own header parser, ~4x faster than
`tarfile`'s streaming mode: it matters at ~12 members per sample. A sample that cannot be read or decoded is a
counted skip (`train.failures`).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from cavmae.shards.checked import SHARD_ERRORS, Skip, checked, checked_samples
from cavmae.shards.errors import NoSamples
from cavmae.shards.index import SampleIndex, SpanReader, read_raw_sample
from cavmae.shards.reader import is_remote
from cavmae.train.epochs import EpochPlan, SampleRngs
from cavmae.train.failures import MAX_FAILURES, Failures, shard_list
from cavmae.train.transform import Transform

log = logging.getLogger(__name__)

# Batches in page-locked memory on CUDA: `device_augment`'s non_blocking copies then neither wait for the device
# nor block the host (from pageable memory they stall the host until the stream reaches them).
PIN = torch.cuda.is_available()
REMOTE_READS = 16  # concurrent ranged reads per loader worker from object storage (each is one round trip)


def decoded_samples(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Decode every sample of every shard (`shards.checked`; the transform checks it against the settings),
    skipping (and counting in `_skipped`) what cannot be decoded; `Failures` gives up on a set where nothing
    decodes. A truncated or corrupt tar (any malformed header) loses the rest of that shard only."""
    failures = Failures()

    def skip(s: Skip) -> None:
        failures.skip(s.url, s.what, s.reason if s.key is not None else s.error)

    for sample in checked_samples((shard["url"] for shard in shards), on_skip=skip):
        sample["_skipped"] = failures.passed()
        yield sample


class EpochBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches `first` .. `first + count - 1` of `epoch`, as `plan` orders them (see
    `train.epochs`): loader worker w of n builds micro-batches w, w+n, ... and the DataLoader yields them
    round-robin, so the order does not depend on n.

    A sample is read with one ranged read and decoded with `shards.checked.checked`; its mixup partner is a
    sample of the whole index. A sample that cannot be read or decoded is skipped and counted (the batch is
    smaller; a batch of skipped samples only is `Transform.filler`, which the trainer does not learn from); a bad
    partner only cancels that sample's mixup. MAX_FAILURES skips in a row stop a set where nothing decodes."""

    def __init__(self, index: SampleIndex, transform: Transform, plan: EpochPlan, epoch: int, first: int,
                 count: int):
        self.index, self.transform, self.plan, self.epoch = index, transform, plan, epoch
        self.order = plan.order(epoch)
        self.positions = plan.positions(first, count)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SpanReader()
        remote = any(is_remote(u) for u in self.index.urls)
        pool = ThreadPoolExecutor(REMOTE_READS) if remote else None
        rngs = SampleRngs(self.plan.seed, self.epoch)
        in_a_row = 0  # samples skipped since this worker's last good one
        try:
            for i in range(worker, len(self.positions), workers):
                batch = self.batch(self.positions[i], reader, pool, rngs)
                in_a_row = in_a_row + batch["skipped"] if batch.get("empty") else 0
                if in_a_row >= MAX_FAILURES:
                    raise NoSamples(f"epoch {self.epoch + 1}: no decodable sample in {in_a_row} tries in a row "
                                    f"(shards: {shard_list(self.index.urls)}); see the log")
                yield batch
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            reader.close()

    def batch(self, positions: np.ndarray, reader: SpanReader, pool: ThreadPoolExecutor | None,
              rngs: SampleRngs) -> dict[str, Any]:
        mixup = self.transform.aug["mixup"]
        wanted = []
        for pos in positions:
            rng = rngs.at(int(pos), 0)
            partner = int(rng.integers(len(self.index))) if mixup > 0 and rng.random() < mixup else None
            wanted.append((int(self.order[pos]), partner))
        need = sorted({i for pair in wanted for i in pair if i is not None})
        samples = dict(zip(need, pool.map(self.sample, need, [reader] * len(need)) if pool is not None
                           else (self.sample(i, reader) for i in need)))
        examples, skipped = [], 0
        for (i, partner), pos in zip(wanted, positions):
            example = None if samples[i] is None else self.transform.try_example(
                samples[i], samples[partner] if partner is not None else None, rngs.at(int(pos), 1))
            if example is None:
                skipped += 1
                continue
            example["_skipped"] = 0
            examples.append(example)
        if not examples:  # every sample skipped (a video-only one in a multimodal batch of 1): skipped, counted
            return self.transform.filler(len(positions), skipped)
        examples[0]["_skipped"] = skipped
        return self.transform.collate(examples)

    def sample(self, i: int, reader: SpanReader) -> dict[str, Any] | None:
        """Decoded sample `i` of the index, or None (logged) when it cannot be read or decoded."""
        try:
            return checked(read_raw_sample(reader, self.index, i))
        except SHARD_ERRORS as exc:  # (SAMPLE_ERRORS too)
            log.warning("skipping sample %r of %s: %s", self.index.key_of(i), self.index.url_of(i), exc)
            return None


def as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's collate_fn for batches `Transform.collate` already made (its default, `default_convert`,
    walks every list and dict of a batch looking for numpy arrays: ~5 µs per sample for nothing)."""
    return batch


def train_loader(index: SampleIndex, transform: Transform, plan: EpochPlan, *, epoch: int, first: int, count: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches `first` .. `first + count - 1` of `epoch` (0-based), collated (`EpochBatches`)."""
    dataset = EpochBatches(index, transform, plan, epoch, first, count)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(num_workers, max(count, 1)),
                                       collate_fn=as_is, pin_memory=PIN)


def eval_loader(urls: list[str], transform: Transform, *, batch_size: int, num_workers: int) -> wds.WebLoader:
    """Every sample of `urls` once (split by node and worker), last batch kept."""
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, decoded_samples,
                            transform, wds.batched(batch_size, collation_fn=transform.collate, partial=True))
    return wds.WebLoader(pipe, batch_size=None, num_workers=min(num_workers, len(urls)), collate_fn=as_is,
                         pin_memory=PIN)
