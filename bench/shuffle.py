"""Shuffle quality and read cost of an epoch: the shard-resampling loader this project used before vs a true
permutation vs ours (`train.epochs`).

Quality (order only, no data read), for `--shards` x `--per-shard` samples, one rank, 4 loader workers, batches of
`--batch-size`; the position of a sample is its place in the shard set (shard-major):
- **before**: every worker draws shards with replacement (`webdataset.ResampledShards`, deterministic per worker),
  streams their samples through a `webdataset.shuffle` buffer of `--buffer` samples and batches them; the loader
  yields the workers' batches round-robin; the epoch is cut after N / batch batches (`with_epoch`);
- **permutation**: `numpy.random.permutation` of all samples cut into batches;
- **ours**: `EpochPlan.order` + `EpochPlan.positions`, what `cavmae-train` reads.
Columns: distinct shards per batch (mean), samples seen once / never / more than once in an epoch, and the
correlation of sample positions at lag 1 and lag `batch` (a perfect shuffle: ~0).

Read cost, with real shards (`--read-samples` samples of ~0.1 MB in shards of `--per-shard`) on local disk and on
an S3-compatible server on 127.0.0.1 (moto, when installed): time per sample, requests per sample and bytes read
per sample, streaming whole shards (what the resampling loader did) vs one ranged read per sample in permutation
order (ours), one at a time and 16 in flight as a loader worker reads from object storage. A localhost server
shows the request count and per-request overhead, not a real store's latency.

    .venv/bin/python -m bench.shuffle [--shards 200] [--per-shard 128] [--batch-size 48] [--buffer 1000]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cavmae.shards.index import SpanReader, read_raw_sample, sample_index  # noqa: E402
from cavmae.shards.reader import raw_samples  # noqa: E402
from cavmae.shards.writer import write_shard  # noqa: E402
from cavmae.train.epochs import EpochPlan  # noqa: E402
from cavmae.train.loaders import REMOTE_READS  # noqa: E402

WORKERS = 4
STREAM_BUFFER = 1 << 20  # a stream reads whole shards in requests of this size (`shards.reader.open_stream`)


def before_order(shards: int, per_shard: int, batch: int, buffer: int, seed: int = 0) -> list[list[int]]:
    """The batches of the resampling loader (one rank, WORKERS workers), sample positions shard-major."""
    urls = [f"shard-{i:06d}.tar" for i in range(shards)]

    def worker(w: int):
        pipe = wds.DataPipeline(
            wds.ResampledShards(urls, seed=seed + 7919 * w, deterministic=True),
            lambda src: ({"pos": int(s["url"][6:12]) * per_shard + k} for s in src for k in range(per_shard)),
            wds.shuffle(buffer, initial=buffer, rng=random.Random(seed + w)),
            wds.batched(batch, collation_fn=lambda xs: [x["pos"] for x in xs], partial=False))
        return iter(pipe)

    streams = [worker(w) for w in range(WORKERS)]
    count = shards * per_shard // batch
    return [next(streams[i % WORKERS]) for i in range(count)]


def ours_order(shards: int, per_shard: int, batch: int, seed: int = 0) -> list[list[int]]:
    n = shards * per_shard
    plan = EpochPlan(size=n, samples=n, global_batch=batch, accum_steps=1, world_size=1, rank=0, seed=seed)
    order = plan.order(0)
    return [order[p].tolist() for p in plan.positions(0, plan.batches)]


def quality(batches: list[list[int]], n: int, per_shard: int, batch: int) -> dict[str, float]:
    flat = np.array([p for b in batches for p in b], dtype=np.float64)
    seen = np.bincount(flat.astype(np.int64), minlength=n)
    return {"shards/batch": float(np.mean([len({p // per_shard for p in b}) for b in batches])),
            "once": float(np.mean(seen == 1)), "never": float(np.mean(seen == 0)), "twice+": float(np.mean(seen > 1)),
            "lag1": float(np.corrcoef(flat[:-1], flat[1:])[0, 1]),
            f"lag{batch}": float(np.corrcoef(flat[:-batch], flat[batch:])[0, 1])}


def write_read_set(root: Path, samples: int, per_shard: int) -> list[str]:
    """Shards of samples with the size of a first-mode sample (fbank ~0.25 MB f16 would be larger; 1 JPEG frame
    ~15 KB x 10): 12 members, ~0.1 MB each sample."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(0, samples, per_shard):
        members = []
        for i in range(s, min(s + per_shard, samples)):
            key = f"s{i:07d}"
            members += [(f"{key}.json", b'{"video_id": "%s"}' % key.encode()),
                        (f"{key}.fbank.npy", rng.bytes(40_000))]
            members += [(f"{key}.frame{k}.jpg", rng.bytes(6_000)) for k in range(10)]
        urls.append(str(root / f"shard-{s // per_shard:06d}.tar"))
        write_shard(urls[-1], members)
    return urls


class CountingReader(SpanReader):
    """A SpanReader that counts its requests and bytes."""

    def __init__(self):
        super().__init__()
        self.requests = self.bytes = 0

    def read(self, url: str, offset: int, length: int) -> bytes:
        self.requests += 1
        self.bytes += length
        return super().read(url, offset, length)


def read_costs(urls: list[str]) -> list[tuple[str, float, float, float]]:
    """(how, ms/sample, requests/sample, KB/sample) for streaming every shard vs ranged reads in permutation order."""
    index = sample_index(urls)
    n = len(index)
    start = time.perf_counter()
    streamed = sum(1 for _ in raw_samples(urls))
    stream_s = time.perf_counter() - start
    order = [int(i) for i in np.random.default_rng(0).permutation(n)]
    reader = CountingReader()
    start = time.perf_counter()
    for i in order:
        read_raw_sample(reader, index, i)
    ranged_s = time.perf_counter() - start
    reader.close()
    start = time.perf_counter()
    with ThreadPoolExecutor(REMOTE_READS) as pool:  # as a loader worker reads from object storage
        list(pool.map(lambda i: read_raw_sample(reader, index, i), order))
    parallel_s = time.perf_counter() - start
    reader.close()
    assert streamed == n
    last = np.r_[np.flatnonzero(np.diff(index.shard)), n - 1]  # the last sample of every shard
    shard_bytes = int((index.offset[last] + index.length[last]).sum()) + 1024 * len(urls)  # + end-of-archive
    buffered = sum(-(-int(index.offset[i] + index.length[i] + 1024) // STREAM_BUFFER) for i in last)
    return [("stream whole shards", stream_s * 1e3 / n, buffered / n, shard_bytes / n / 1e3),
            ("ranged read per sample", ranged_s * 1e3 / n, reader.requests / 2 / n, reader.bytes / 2 / n / 1e3),
            (f"ranged, {REMOTE_READS} in flight", parallel_s * 1e3 / n, reader.requests / 2 / n,
             reader.bytes / 2 / n / 1e3)]


def s3_urls(local: list[str]):
    """Start moto's S3 server on 127.0.0.1, upload the shards, return (urls, server) or (None, None)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None, None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION":
                       "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"})
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="bench")
    for url in local:
        client.upload_file(url, "bench", f"set/{Path(url).name}")
    return [f"s3://bench/set/{Path(u).name}" for u in local], server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--per-shard", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--buffer", type=int, default=1000)
    parser.add_argument("--read-samples", type=int, default=512)
    args = parser.parse_args()
    n, b = args.shards * args.per_shard, args.batch_size
    rows = [("before: ResampledShards + buffer", before_order(args.shards, args.per_shard, b, args.buffer)),
            ("true permutation", [p.tolist() for p in np.array_split(np.random.default_rng(0).permutation(n)[
                : n // b * b], n // b)]),
            ("ours (train.epochs)", ours_order(args.shards, args.per_shard, b))]
    print(f"shuffle quality: {args.shards} shards x {args.per_shard} samples, batch {b}, {WORKERS} workers, "
          f"buffer {args.buffer} (before)")
    head = ["shards/batch", "once", "never", "twice+", "lag1", f"lag{b}"]
    print(f"{'loader':34s} " + " ".join(f"{h:>12s}" for h in head))
    for name, batches in rows:
        q = quality(batches, n, args.per_shard, b)
        print(f"{name:34s} " + " ".join(f"{q[h]:12.3f}" for h in head))
    with tempfile.TemporaryDirectory() as tmp:
        local = write_read_set(Path(tmp), args.read_samples, args.per_shard)
        print(f"\nread cost: {args.read_samples} samples in shards of {args.per_shard}")
        print(f"{'store':10s} {'how':28s} {'ms/sample':>10s} {'requests/sample':>16s} {'KB/sample':>10s}")
        for name, urls in (("local", local), ("s3 (moto)", None)):
            server = None
            if urls is None:
                urls, server = s3_urls(local)
                if urls is None:
                    print("s3: moto is not installed, skipped")
                    continue
            try:
                for how, ms, req, kb in read_costs(urls):
                    print(f"{name:10s} {how:28s} {ms:10.3f} {req:16.4f} {kb:10.1f}")
            finally:
                if server is not None:
                    server.stop()


if __name__ == "__main__":
    main()
