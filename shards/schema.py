"""The sample schema: keys, member names, and the safe encoders/decoders of every member.

One video clip (or one window of it) is one WebDataset sample:

    {key}.json          metadata (see `META_FIELDS`)
    {key}.fbank.npy     float16 [T, num_mel_bins], unpadded, unnormalised
    {key}.frame{i}.jpg  the extracted frames, i = 0 .. num_frames-1
    {key}.flac          optional 16 kHz mono waveform
    {key}.labels.txt    optional label indices as text, "3,17" (not `.cls`: stock webdataset decodes `.cls`
                        as a single int and fails on multi-label samples)

WebDataset splits a member name at the first dot of its base name, so keys never contain dots or slashes.
Shards are untrusted input: decoding accepts only the member names above and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

import numpy as np

META_FIELDS = (
    "video_id", "source", "labels", "duration_s", "fps", "frame_times_s", "audio_frames", "sample_rate",
    "has_audio", "has_video", "config_digest", "window", "clip_start_s",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MEMBER = re.compile(r"^(json|fbank\.npy|frame(\d{1,3})\.jpg|flac|labels\.txt)$")
KEY_MAX = 96


class BadSample(ValueError):
    """A shard member that does not follow the schema (the message names the key and member)."""


def make_key(video_id: str, window: int | None = None) -> str:
    """Deterministic, dot- and slash-free key for a video id (plus window index).

    The id is kept as is when it is already safe; otherwise unsafe characters become '_' and a short hash
    of the original id keeps distinct ids distinct ('a.b' and 'a_b' must not collide).
    """
    safe = _UNSAFE.sub("_", video_id)[:KEY_MAX]
    if safe != video_id or not safe:
        safe = f"{safe}_{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"
    return safe if window is None else f"{safe}_w{window:04d}"


def member_suffix(name: str) -> str:
    """Suffix of a member name after its key, validated against the schema ('frame3.jpg', 'json', ...)."""
    suffix = name.split(".", 1)[1] if "." in name else ""
    if not _MEMBER.match(suffix):
        raise BadSample(f"member {name!r} is not part of the cavmae sample schema")
    return suffix


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def sample_members(key: str, meta: dict[str, Any], fbank: np.ndarray | None, jpegs: list[bytes],
                   flac: bytes | None = None, label_indices: list[int] | None = None) -> list[tuple[str, bytes]]:
    """All members of one sample in their fixed order (the order is part of byte-identical output)."""
    if _UNSAFE.search(key):
        raise BadSample(f"key {key!r} contains characters other than letters, digits, '_' and '-'")
    members = [(f"{key}.json", encode_json(meta))]
    if fbank is not None:
        members.append((f"{key}.fbank.npy", encode_npy(fbank.astype(np.float16))))
    members += [(f"{key}.frame{i}.jpg", jpeg) for i, jpeg in enumerate(jpegs)]
    if flac is not None:
        members.append((f"{key}.flac", flac))
    if label_indices:
        members.append((f"{key}.labels.txt", ",".join(str(i) for i in label_indices).encode()))
    return members


def decode_member(suffix: str, data: bytes) -> Any:
    """Safe decode of one member: json → dict, npy → array (no pickle), labels → list[int]; images and flac
    stay bytes (the consumer decodes them with PIL / PyAV, which parse only media)."""
    if suffix == "json":
        return json.loads(data)
    if suffix == "fbank.npy":
        return decode_npy(data)
    if suffix == "labels.txt":
        text = data.decode().strip()
        return [int(x) for x in text.split(",")] if text else []
    return data
