"""Synthetic audio-visual datasets for the training tests (not a test module).

Each clip is a pure tone paired with frames of a solid colour; the class is decided jointly by the pitch and the
colour (2 x 2 = 4 classes), so neither modality alone can solve it. The end-to-end tests get their shards from the
real ingest (`ingest_datasets`: ffmpeg-made clips → `preprocess.ingest.ingest` on a local Ray → shards, manifest,
labels); the loader unit tests write small shards directly (`write_synthetic_shards`), since they need hand-made
members (corrupt ones, .flac) and no Ray.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image

from cavmae.shards.manifest import MANIFEST, write_rows
from cavmae.shards.schema import make_key, sample_members
from cavmae.shards.writer import ShardWriter
from tests.clips import make_clip

TONES = (300.0, 1800.0)
COLORS = ((220, 40, 40), (40, 60, 220))
LABEL_IDS = tuple(f"/m/class{i}" for i in range(4))


def label_index_csv(path: Path) -> Path:
    rows = ["index,mid,display_name"] + [f"{i},{mid},\"class {i}\"" for i, mid in enumerate(LABEL_IDS)]
    path.write_text("\n".join(rows) + "\n")
    return path


def tone_fbank(freq: float, seconds: float, rng: random.Random) -> np.ndarray:
    t = torch.arange(int(16000 * seconds)) / 16000
    wave = rng.uniform(0.2, 0.8) * torch.sin(2 * torch.pi * freq * rng.uniform(0.97, 1.03) * t)
    wave = wave + 0.01 * torch.randn(t.shape[0], generator=torch.Generator().manual_seed(rng.getrandbits(31)))
    fbank = torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    return fbank.numpy().astype(np.float16)


def color_frames(rgb: tuple[int, int, int], size: int, n: int, rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(n):
        c = tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in rgb)
        buf = io.BytesIO()
        Image.new("RGB", (size, size), c).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pair(index: int, pairs: int) -> tuple[float, tuple[int, int, int]]:
    """Retrieval fixture: the `index`-th of `pairs` (tone, colour) pairs, pitch and hue both rising with it."""
    hue = Image.new("HSV", (1, 1), (int(255 * index / pairs), 255, 220)).convert("RGB").getpixel((0, 0))
    return 250.0 * 1.45 ** index, hue


def write_synthetic_shards(folder: Path, n: int, per_shard: int, *, seed: int = 0, seconds: float = 1.3,
                           image_size: int = 64, num_frames: int = 4) -> list[Path]:
    """`n` samples of the 4-class task in shards of `per_shard` (the last one may be short), written directly
    with the real schema and writer, plus manifest.parquet (with sample offsets); returns the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, paths, members = [], [], []
    for i in range(n):
        tone, color = rng.randrange(2), rng.randrange(2)
        label = 2 * tone + color
        video_id = f"clip{seed}-{i:05d}"
        key = make_key(video_id)
        meta = {"video_id": video_id, "source": f"{video_id}.mp4", "labels": [LABEL_IDS[label]],
                "duration_s": seconds, "has_audio": True, "has_video": True}
        members += sample_members(key, meta, tone_fbank(TONES[tone], seconds, rng),
                                  color_frames(COLORS[color], image_size, num_frames, rng), label_indices=[label])
        shard = f"shard-{len(paths):06d}.tar"
        rows.append({"video_id": video_id, "key": key, "source": meta["source"], "status": "ok", "shard": shard,
                     "labels": meta["labels"], "duration_s": seconds})
        if (i + 1) % per_shard == 0 or i == n - 1:
            paths.append(folder / shard)
            with ShardWriter(folder, shard) as writer:
                writer.add(members)
            first = len(rows) - (len(rows) - 1) % per_shard - 1
            rows[first:] = writer.locate(rows[first:])  # each sample's offset and length, as ingest records them
            members = []
    write_rows(folder / MANIFEST, rows)
    return paths


# name: (samples, samples_per_shard, seed, pairs). "ddp" reuses the clips of "train" (same seed): 20 + 20 + 5 samples.
DATASETS = {"train": (96, 32, 0, 0), "val": (32, 32, 1, 0), "ddp": (45, 20, 0, 0), "pairs": (96, 48, 2, 8),
            "query": (8, 8, 3, 8)}
VARIANTS = 6  # distinct clips per class (or pair) and seed; the samples of a dataset are hard links to them
INGEST = ["video.num_frames=4", "video.image_size=64", "audio.keep_waveform=true"]


def clip_folder(folder: Path, clips: Path, n: int, *, seed: int, pairs: int = 0) -> Path | None:
    """`n` inputs `clip{seed}-{i}.mp4` in `folder` (hard links to clips made once in `clips`); returns a
    `video_id,labels` CSV for the class task (None for pairs: sample i is pair i % pairs, no labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = ["video_id,labels"]
    for i in range(n):
        if pairs:
            cls, variant = i % pairs, 0
            freq, rgb = pair(cls, pairs)
        else:
            tone, color = rng.randrange(2), rng.randrange(2)
            cls, variant, freq, rgb = 2 * tone + color, rng.randrange(VARIANTS), TONES[tone], COLORS[color]
        jitter = random.Random(f"{seed}-{cls}-{variant}")  # a variant is the same clip wherever it is used
        c = [max(0, min(255, v + jitter.randint(-30, 30))) for v in rgb]
        noise = f"aeval=val(0)*{jitter.uniform(1, 4):.2f}+0.03*(random(0)-0.5)"  # loudness varies; a noise floor
        clip = make_clip(clips, f"s{seed}-{'p' if pairs else 'c'}{cls}-v{variant}", seconds=1.3, size=(80, 64),
                         fps=10, channels=1, sample_rate=16000, tone_hz=freq * jitter.uniform(0.97, 1.03),
                         color="0x%02x%02x%02x" % tuple(c), extra=["-af", noise])
        video_id = f"clip{seed}-{i:05d}"
        os.link(clip, folder / f"{video_id}.mp4")
        rows.append(f"{video_id},{LABEL_IDS[cls] if not pairs else ''}")
    if pairs:
        return None
    labels = folder.with_name(f"{folder.name}_labels.csv")
    labels.write_text("\n".join(rows) + "\n")
    return labels


def ingest_datasets(root: Path) -> Path:
    """Every dataset of `DATASETS` as real ingest output in `root/NAME/` (shards, manifest.parquet, the frozen
    config; frames 64x64 from 80x64 video, 4 per clip, .flac kept), plus the label index `root/labels.csv`.

    Starts one local Ray for all of them and shuts it down (an already initialised Ray is used and left up)."""
    import ray

    from cavmae.preprocess.ingest import ingest
    from cavmae.shards.config import load_config
    from tests.conftest import LOCAL_RAY

    index = label_index_csv(root / "labels.csv")
    started = not ray.is_initialized()
    if started:
        ray.init(**LOCAL_RAY)
    try:
        for name, (n, per_shard, seed, pairs) in DATASETS.items():
            labels = clip_folder(root / "inputs" / name, root / "clips", n, seed=seed, pairs=pairs)
            cfg = load_config(None, INGEST + [f"shards.samples_per_shard={per_shard}"])
            summary = ingest([str(root / "inputs" / name)], root / name, cfg, labels_csv=labels and str(labels),
                             label_index_csv=labels and str(index))
            assert summary.ok == n and not summary.problems, summary.problems
    finally:
        if started:
            ray.shutdown()
    return root


TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64", "data.num_workers=0",
        "pretrain.log_every=1", "finetune.log_every=1", "video.num_frames=4"]
