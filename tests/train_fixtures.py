"""Synthetic audio-visual shards for the training tests (not a test module).

Each sample is a pure tone (its fbank computed with the official kaldi parameters) paired with frames of a solid
colour; the class is decided jointly by the pitch and the colour (2 x 2 = 4 classes), so neither modality alone
can solve it. Shards are written with the real writer and schema, plus a manifest, like `ingest` output.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image

from shards.manifest import MANIFEST, write_rows
from shards.schema import make_key, sample_members
from shards.writer import write_shard

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
                           image_size: int = 64, num_frames: int = 4, prefix: str = "clip",
                           pairs: int = 0) -> list[Path]:
    """`n` samples in shards of `per_shard` (the last one may be short), with manifest.parquet; returns the shards.

    Default: the 4-class tone x colour task. `pairs` > 0: sample i is pair i % pairs (for retrieval)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows, paths, members = [], [], []
    for i in range(n):
        tone, color = rng.randrange(2), rng.randrange(2)
        label = 2 * tone + color
        freq, rgb = (TONES[tone], COLORS[color]) if not pairs else pair(i % pairs, pairs)
        video_id = f"{prefix}{seed}-{i:05d}"
        key = make_key(video_id)
        meta = {"video_id": video_id, "source": f"{video_id}.mp4", "labels": [LABEL_IDS[label]],
                "duration_s": seconds, "has_audio": True, "has_video": True}
        members += sample_members(key, meta, tone_fbank(freq, seconds, rng),
                                  color_frames(rgb, image_size, num_frames, rng), label_indices=[label])
        shard = f"shard-{len(paths):06d}.tar"
        rows.append({"video_id": video_id, "key": key, "source": meta["source"], "status": "ok", "shard": shard,
                     "labels": meta["labels"], "duration_s": seconds})
        if (i + 1) % per_shard == 0 or i == n - 1:
            paths.append(folder / shard)
            write_shard(paths[-1], members)
            members = []
    write_rows(folder / MANIFEST, rows)
    return paths


TINY = ["model.size=tiny", "model.target_length=128", "model.image_size=64", "data.num_workers=0",
        "data.shuffle_buffer=16", "pretrain.log_every=1", "finetune.log_every=1", "video.num_frames=4"]
