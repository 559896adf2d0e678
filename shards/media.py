"""Opening the media members of a sample (`frame{i}.jpg`, `.flac`) as the one format their name claims.

Shards are untrusted. PIL picks a decoder by the bytes, not the name: EPS bytes in a `.jpg` member would make it run
Ghostscript. PyAV probes too: an ffconcat script in a `.flac` member would make FFmpeg open local files. So a frame is
opened by PIL's JPEG plugin only and a `.flac` member by FFmpeg's FLAC demuxer only, and a frame's header size is
checked against the configured frame size before a single pixel is decoded (a 30000x30000 header is refused here,
not by PIL's decompression-bomb limit after an allocation of gigabytes). Likewise a `.flac` member's STREAMINFO
(sample rate, channels, length) is checked against what the config and the sample allow before it is decoded: a
174-byte member claiming 1 Hz would otherwise be resampled to gigabytes.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

from .schema import BadSample, one_line

MAX_FRAME_SCALE = 4  # a stored frame may be at most this many times the configured frame size on each side


def open_jpeg(data: bytes, size: int) -> Image.Image:
    """A frame member opened as JPEG (header read, pixels not yet decoded); BadSample for anything else or for a
    frame wider or taller than MAX_FRAME_SCALE x `size` (ingest stores frames at `size`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["JPEG"])
    except Image.UnidentifiedImageError:  # its text names the BytesIO object's address: a new reason every run
        raise BadSample("frame is not a readable JPEG (not JPEG data)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(f"frame is not a readable JPEG ({one_line(exc)})") from None
    width, height = image.size
    if not (0 < width <= MAX_FRAME_SCALE * size and 0 < height <= MAX_FRAME_SCALE * size):
        raise BadSample(f"frame of {width}x{height} pixels is far larger than the configured size {size} "
                        f"(at most {MAX_FRAME_SCALE * size} per side)")
    return image


def open_flac(data: bytes) -> Any:
    """A `.flac` member opened by FFmpeg's FLAC demuxer only (PyAV container; use it as a context manager)."""
    import av

    if not data.startswith(b"fLaC"):  # the FLAC stream marker, first in every file our encoder writes
        raise BadSample(".flac member is not FLAC (no fLaC stream marker)")
    try:
        return av.open(io.BytesIO(data), format="flac")
    except (av.error.FFmpegError, ValueError) as exc:
        raise BadSample(f".flac member is not FLAC ({one_line(exc)})") from None


def flac_streaminfo(data: bytes) -> tuple[int, int, int]:
    """(sample rate, channels, total samples) as a FLAC member's STREAMINFO block declares them (read, not
    trusted: `decode_flac` also counts what it decodes). BadSample when the block is not where FLAC puts it."""
    if len(data) < 42 or not data.startswith(b"fLaC") or data[4] & 0x7F != 0 or data[5:8] != b"\0\0\x22":
        raise BadSample(".flac member is not FLAC (no STREAMINFO block)")
    packed = int.from_bytes(data[18:26], "big")  # rate 20 bits, channels-1 3, bits per sample-1 5, samples 36
    return packed >> 44, ((packed >> 41) & 0x7) + 1, packed & ((1 << 36) - 1)


def decode_flac(data: bytes, sample_rate: int, max_seconds: float) -> np.ndarray:
    """A `.flac` member as the float32 mono waveform at `sample_rate` (for our s16 FLAC at that rate: exactly the
    decoder's waveform, s16 / 32768). Used by reprocess (new fbank settings from the stored waveform) and by
    training (waveform mixup). PyAV is imported here: a trainer whose shards carry no `.flac` runs without it.

    Our members are mono at the configured rate and no longer than their clip: the STREAMINFO must say so (rate
    `sample_rate`, one channel, 1 .. `max_seconds` worth of samples) before anything is decoded, and decoding stops
    as soon as more samples come than were declared. BadSample when the member is not FLAC, declares anything
    else, does not decode or holds no audio."""
    import av

    rate, channels, declared = flac_streaminfo(data)
    limit = int(max_seconds * sample_rate)
    if rate != sample_rate or channels != 1 or not 0 < declared <= limit:
        raise BadSample(f".flac member declares {declared} samples of {channels} channel(s) at {rate} Hz; "
                        f"expected mono at {sample_rate} Hz, at most {limit} samples ({max_seconds:g} s)")
    frames, count = [], 0
    try:
        with open_flac(data) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(audio=0):
                count += frame.samples
                if count > declared:
                    raise BadSample(f".flac member holds more than the {declared} samples it declares")
                frames += resampler.resample(frame)
            frames += resampler.resample(None)
    except av.FFmpegError as exc:
        raise BadSample(f".flac member does not decode ({one_line(exc)})") from None
    if not frames:
        raise BadSample(".flac member holds no audio")
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
