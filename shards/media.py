"""Opening the media members of a sample (`frame{i}.jpg`, `.flac`) as the one format their name claims.

Shards are untrusted. PIL picks a decoder by the bytes, not the name: EPS bytes in a `.jpg` member would make it run
Ghostscript. PyAV probes too: an ffconcat script in a `.flac` member would make FFmpeg open local files. So a frame is
opened by PIL's JPEG plugin only and a `.flac` member by FFmpeg's FLAC demuxer only, and a frame's header size is
checked against the configured frame size before a single pixel is decoded (a 30000x30000 header is refused here,
not by PIL's decompression-bomb limit after an allocation of gigabytes).
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


def decode_flac(data: bytes, sample_rate: int) -> np.ndarray:
    """A `.flac` member as the float32 mono waveform at `sample_rate` (for our s16 FLAC at that rate: exactly the
    decoder's waveform, s16 / 32768). Used by reprocess (new fbank settings from the stored waveform) and by
    training (waveform mixup). PyAV is imported here: a trainer whose shards carry no `.flac` runs without it.
    BadSample when the member is not FLAC, does not decode or holds no audio."""
    import av

    try:
        with open_flac(data) as container:
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            frames = [out for frame in container.decode(audio=0) for out in resampler.resample(frame)]
            frames += resampler.resample(None)
    except av.FFmpegError as exc:
        raise BadSample(f".flac member does not decode ({one_line(exc)})") from None
    if not frames:
        raise BadSample(".flac member holds no audio")
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
