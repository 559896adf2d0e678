"""One input video → its WebDataset samples (one per clip, or one per window).

`iter_samples` (streaming, what the ingest job uses) and `build_samples` (a list) are pure (no global state, no
files written), deterministic (the same input and config give the same bytes), and raise `BadInput` for inputs
that cannot become samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

from cavmae.shards import schema
from cavmae.shards.config import Config
from cavmae.shards.fbank import fbank
from cavmae.shards.schema import make_key, record_members

from .decode import BadInput, Clip, Segment, iter_clips
from .features import encode_flac, encode_jpeg

__all__ = ["BadInput", "BuiltSample", "build_samples", "clip_meta", "iter_samples"]

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
              config_digest: str, segment: Segment | None = None, dataset: dict | None = None) -> dict:
    """The sample's JSON metadata: the schema's META_FIELDS, and its LIST_FIELDS for an input of a dataset list:
    `segment`, the input's listed segment of its original video; `dataset`, what its list says beyond labels
    (format, split, fold)."""
    meta = {
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
        "audio_start_s": None if clip.audio_start_s is None else _num(clip.audio_start_s),
    }
    if segment is not None:
        meta["segment"] = {"listed_s": [_num(segment.start_s), _num(segment.end_s)],
                           "in_file_s": [_num(t) for t in clip.segment_s],
                           "file_is_segment": bool(clip.file_is_segment)}
    if dataset is not None:
        meta["dataset"] = dataset
    return meta


def iter_samples(path: str, video_id: str, source: str, labels: list[str],
                 label_indices: list[int] | None, cfg: Config, *, segment: Segment | None = None,
                 dataset: dict | None = None) -> Iterator[BuiltSample]:
    """Decode `path` once (within `segment` when given), yielding its samples in window order as each window
    completes.

    Raises BadInput for a bad input (possibly after some windows were yielded: see `build_samples`)."""
    digest = cfg.digest("audio", "video", "clip")
    windows = cfg.clip.mode == "windows"
    quality = int(cfg.video.jpeg_quality)
    for clip in iter_clips(path, cfg, segment=segment):
        fb = fbank(clip.waveform, cfg.audio) if clip.has_audio else None
        flac = (encode_flac(clip.waveform, clip.sample_rate)
                if clip.has_audio and cfg.audio.keep_waveform else None)
        jpegs = [encode_jpeg(frame, quality) for frame in clip.frames] if clip.has_video else []
        meta = clip_meta(clip, video_id=video_id, source=source, labels=labels,
                         audio_frames=0 if fb is None else fb.shape[0], config_digest=digest, segment=segment,
                         dataset=dataset)
        key = make_key(video_id, clip.window if windows else None)
        record = {"meta": meta, "fbank": fb, "frames": jpegs, "flac": flac, "labels": label_indices}
        record.update((k.field, k.produce(clip, meta)) for k in schema.MEMBER_KINDS if k.produce is not None)
        members = record_members(key, record)
        yield BuiltSample(key=key, meta=meta, members=members)


def build_samples(path: str, video_id: str, source: str, labels: list[str],
                  label_indices: list[int] | None, cfg: Config, *, segment: Segment | None = None,
                  dataset: dict | None = None) -> list[BuiltSample]:
    """All samples of `path` (an input is all or nothing: BadInput means none of its samples count)."""
    return list(iter_samples(path, video_id, source, labels, label_indices, cfg, segment=segment,
                             dataset=dataset))
