"""Loader throughput: samples/s per CPU core delivered as training batches, our shards vs the official data route.

Official route (reference §2): a 16 kHz wav per clip and one JPEG per frame folder (`frame_{i}/{id}.jpg`); each
sample loads the wav, computes the kaldi fbank (torchaudio), pads to 1024, normalises, adds noise and rolls, and
opens a random frame with PIL for Resize(224, bicubic) + CenterCrop + ToTensor + Normalize.
Ours: the same augmentation from WebDataset shards that store the fbank (float16) and the JPEG frames, so the
fbank computation is skipped; image decoding remains. Both run in one process (num_workers=0) with one torch
thread, so samples/s is per core.

    .venv/bin/python -m bench.loader [--clips 48] [--batches 12] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torchaudio
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from shards.config import load_config  # noqa: E402
from shards.schema import sample_members  # noqa: E402
from shards.writer import write_shard  # noqa: E402
from train import stage  # noqa: E402
from train.data import image_transform, noise_and_roll, pad_or_crop, train_loader  # noqa: E402
from train_fixtures import color_frames  # noqa: E402

SECONDS, FRAMES, SIZE = 10.0, 10, 224


def kaldi_fbank(wave_: torch.Tensor) -> torch.Tensor:
    return torchaudio.compliance.kaldi.fbank(
        wave_ - wave_.mean(), htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
        num_mel_bins=128, dither=0.0, frame_shift=10)


def make_data(root: Path, clips: int) -> tuple[list[Path], list[str]]:
    """The same clips both ways: wav + frame folders, and one shard."""
    rng = random.Random(0)
    members, items = [], []
    t = np.arange(int(16000 * SECONDS)) / 16000
    for i in range(clips):
        vid = f"clip{i:04d}"
        audio = (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * np.random.default_rng(i).standard_normal(t.size))
        pcm = (audio * 32767).astype(np.int16)
        with wave.open(str(root / f"{vid}.wav"), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm.tobytes())
        jpegs = color_frames((rng.randrange(256), rng.randrange(256), rng.randrange(256)), SIZE, FRAMES, rng)
        for k, jpeg in enumerate(jpegs):
            (root / f"frame_{k}").mkdir(exist_ok=True)
            (root / f"frame_{k}" / f"{vid}.jpg").write_bytes(jpeg)
        fbank = kaldi_fbank(torch.from_numpy(pcm.astype(np.float32) / 32768).unsqueeze(0)).numpy()
        members += sample_members(vid, {"video_id": vid}, fbank, jpegs)
        items.append(vid)
    write_shard(root / "shard-000000.tar", members)
    return [root / "shard-000000.tar"], items


def official_batches(root: Path, items: list[str], batch_size: int, batches: int, cfg) -> int:
    """The official per-sample work (pretraining augmentation), batched like a DataLoader with shuffle."""
    image = image_transform(SIZE, cfg.data.image_mean, cfg.data.image_std)
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    n = 0
    for _ in range(batches):
        audio, images = [], []
        for vid in rng.sample(items, batch_size):
            with wave.open(str(root / f"{vid}.wav"), "rb") as w:
                pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
            fbank = pad_or_crop(kaldi_fbank(torch.from_numpy(pcm.astype(np.float32) / 32768).unsqueeze(0)), 1024)
            fbank = noise_and_roll((fbank - cfg.data.mean) / cfg.data.std, gen)
            audio.append(fbank)
            images.append(image(Image.open(root / f"frame_{rng.randrange(FRAMES)}" / f"{vid}.jpg").convert("RGB")))
        torch.stack(audio), torch.stack(images)
        n += batch_size
    return n


def our_batches(urls: list[Path], batch_size: int, batches: int, cfg) -> int:
    tf = stage.transform(cfg, stage.augmentation(cfg.pretrain), frame="random")
    loader = train_loader([str(u) for u in urls], tf, batch_size=batch_size, num_batches=batches, seed=0,
                          shuffle_buffer=cfg.data.shuffle_buffer, num_workers=0)
    return sum(b["audio"].shape[0] for b in loader)


def timed(fn) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=48)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(None, ["data.shuffle_buffer=16", f"video.num_frames={FRAMES}"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        urls, items = make_data(root, args.clips)
        our_batches(urls, args.batch_size, 1, cfg)  # warm caches and imports for both routes
        official_batches(root, items, args.batch_size, 1, cfg)
        rows = [("official (wav + fbank + JPEG folders)", *timed(lambda: official_batches(
                    root, items, args.batch_size, args.batches, cfg))),
                ("ours (shards, stored fbank)", *timed(lambda: our_batches(urls, args.batch_size, args.batches, cfg)))]
    base = rows[0][1] / rows[0][2]
    print(f"{'route':40s} {'samples':>8s} {'seconds':>8s} {'samples/s/core':>15s} {'ratio':>6s}")
    for name, n, sec in rows:
        print(f"{name:40s} {n:8d} {sec:8.2f} {n / sec:15.1f} {n / sec / base:6.1f}x")
    print(f"(10 s clips, target_length 1024, {SIZE}px frames, pretraining augmentation, batch {args.batch_size}, "
          f"1 process, 1 torch thread)")


if __name__ == "__main__":
    main()
