"""One input video → its WebDataset samples (one per clip, or one per window).

`build_samples` is what the ingest job calls per input: pure (no global state, no files written),
deterministic (the same input and config give the same bytes), and raises `BadInput` for inputs that cannot
become samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


from shards.config import Config
from shards.schema import make_key, sample_members

from .decode import BadInput, Clip, iter_clips
from .features import encode_flac, encode_jpeg, fbank

__all__ = ["BadInput", "BuiltSample", "build_samples", "clip_meta"]

_DIGITS = 6


@dataclass
class BuiltSample:
    key: str
    meta: dict
    members: list[tuple[str, bytes]]


def _num(x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise BadInput(f"non-finite value in metadata ({x})")
    return round(x, _DIGITS)


def clip_meta(clip: Clip, *, video_id: str, source: str, labels: list[str], audio_frames: int,
              config_digest: str) -> dict:
    """The sample's JSON metadata (exactly the schema's META_FIELDS)."""
    return {
        "video_id": video_id,
        "source": source,
        "labels": list(labels),
        "duration_s": _num(clip.duration_s),
        "fps": _num(clip.fps),
        "frame_times_s": [_num(t) for t in clip.frame_times_s],
        "audio_frames": int(audio_frames),
        "sample_rate": int(clip.sample_rate),
        "has_audio": bool(clip.has_audio),
        "has_video": bool(clip.has_video),
        "config_digest": config_digest,
        "window": clip.window,
        "clip_start_s": _num(clip.clip_start_s),
    }


def build_samples(path: str, video_id: str, source: str, labels: list[str],
                  label_indices: list[int] | None, cfg: Config) -> list[BuiltSample]:
    """Decode `path` once and return its samples in window order. Raises BadInput for a bad input."""
    digest = cfg.digest("audio", "video", "clip")
    windows = cfg.clip.mode == "windows"
    quality = int(cfg.video.jpeg_quality)
    out: list[BuiltSample] = []
    for clip in iter_clips(path, cfg):
        fb = fbank(clip.waveform, cfg.audio) if clip.has_audio else None
        flac = (encode_flac(clip.waveform, clip.sample_rate)
                if clip.has_audio and cfg.audio.keep_waveform else None)
        jpegs = [encode_jpeg(frame, quality) for frame in clip.frames] if clip.has_video else []
        meta = clip_meta(clip, video_id=video_id, source=source, labels=labels,
                         audio_frames=0 if fb is None else fb.shape[0], config_digest=digest)
        key = make_key(video_id, clip.window if windows else None)
        members = sample_members(key, meta, fb, jpegs, flac, label_indices)
        out.append(BuiltSample(key=key, meta=meta, members=members))
    return out
