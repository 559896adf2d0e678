"""A synthetic shard set in the official geometry, written with the project's own writer, for end-to-end runs.

    python bench/shardset.py /tmp/shards --samples 768 --per-shard 96            # 1024x128-ish fbank, 10 frames 224²
    python bench/shardset.py /tmp/shards --samples 64 --per-shard 16 --set video.image_size=64 --set video.num_frames=4

Each sample is what ingest stores for a 10-second clip: a float16 log-mel fbank (random values around the AudioSet
mean and spread, `fbank_rows` for 10 s), `video.num_frames` real JPEG frames at `video.image_size`² (smooth random
images with grain, encoded by PIL at quality 90, ~the size of real frames), the json member and 1-3 random label
indices of 527 (`.labels.txt`: `cavmae-train finetune --set finetune.num_classes=527` takes it). The folder gets
manifest.parquet and the frozen pipeline.yaml as ingest writes them, so `cavmae-train pretrain --shards` takes it.
Shards are made in parallel processes (one per shard); no PyAV, Ray or ffmpeg needed.
"""

import argparse
import io
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.shards.manifest import MANIFEST, write_rows  # noqa: E402
from cavmae.shards.schema import make_key, sample_members  # noqa: E402
from cavmae.shards.writer import write_shard  # noqa: E402

SECONDS = 10.0
CLASSES = 527  # label indices in the .labels.txt members (finetune with finetune.num_classes=527)
FROZEN_CONFIG = "pipeline.yaml"  # the name preprocess.ingest gives the frozen config


def frame_jpeg(rng: np.random.Generator, size: int) -> bytes:
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_one(job: "tuple[str, int, int, int, int, int, int, int]") -> list[dict]:
    """Shard `index` holding samples [first, first + count); returns its manifest rows."""
    folder, index, first, count, rows_, bins, size, frames = job
    rng = np.random.default_rng(index)
    members, rows = [], []
    shard = f"shard-{index:06d}.tar"
    for i in range(first, first + count):
        video_id = f"synthetic-{i:06d}"
        key = make_key(video_id)
        meta = {"video_id": video_id, "source": f"{video_id}.mp4", "labels": [], "duration_s": SECONDS,
                "has_audio": True, "has_video": True}
        fbank = (rng.standard_normal((rows_, bins), dtype=np.float32) * 4.5 - 5.0).astype(np.float16)
        labels = sorted(set(rng.integers(0, CLASSES, size=int(rng.integers(1, 4))).tolist()))  # as AudioSet: 1-3
        members += sample_members(key, meta, fbank, [frame_jpeg(rng, size) for _ in range(frames)],
                                  label_indices=labels)
        rows.append({"video_id": video_id, "key": key, "source": meta["source"], "status": "ok", "shard": shard,
                     "labels": [], "duration_s": SECONDS})
    write_shard(Path(folder) / shard, members)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for the shards, manifest.parquet and pipeline.yaml")
    ap.add_argument("--samples", type=int, default=768)
    ap.add_argument("--per-shard", type=int, default=96)
    ap.add_argument("--workers", type=int, default=8, help="processes writing shards")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (video.image_size, video.num_frames, audio.num_mel_bins ...)")
    args = ap.parse_args()
    cfg = load_config(None, args.sets, [])
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    rows_ = int(SECONDS * 1000 / cfg.audio.frame_shift_ms) - 2  # kaldi fbank rows of 10 s (snip_edges), 998
    bins, size, frames = int(cfg.audio.num_mel_bins), int(cfg.video.image_size), int(cfg.video.num_frames)
    jobs = [(str(folder), i, first, min(args.per_shard, args.samples - first), rows_, bins, size, frames)
            for i, first in enumerate(range(0, args.samples, args.per_shard))]
    with ProcessPoolExecutor(args.workers) as pool:
        rows = [r for part in pool.map(write_one, jobs) for r in part]
    write_rows(folder / MANIFEST, rows)
    (folder / FROZEN_CONFIG).write_text(cfg.to_yaml())
    total = sum(p.stat().st_size for p in folder.glob("*.tar"))
    print(f"{args.samples} samples in {len(jobs)} shards ({total / 2 ** 20:.0f} MiB): fbank {rows_}x{bins} float16, "
          f"{frames} JPEG frames {size}² per sample -> {folder}", flush=True)


if __name__ == "__main__":
    main()
