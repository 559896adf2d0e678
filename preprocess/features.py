"""Per-clip encodings: JPEG frames and the optional FLAC waveform (the fbank is part of the format:
`shards.fbank`).

Every encoder here is deterministic: the same input gives the same bytes on every run.
"""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image

_FLAC_CHUNK = 4608


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG of an HxWx3 uint8 RGB array with PIL (libjpeg), no metadata: deterministic bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def encode_flac(waveform: np.ndarray, sample_rate: int) -> bytes:
    """16-bit mono FLAC of a float waveform in [-1, 1), in memory, with no metadata that could vary.

    Samples are rounded to s16 (x * 32768, clipped), so a waveform that came from s16 round-trips exactly.
    """
    pcm = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="flac") as out:
        # bitexact: no "encoder=Lavf..." tag or version string, so the bytes do not depend on the FFmpeg build.
        out.flags |= av.container.Flags.bitexact.value
        stream = out.add_stream("flac", rate=int(sample_rate), layout="mono", format="s16")
        stream.codec_context.flags |= int(av.codec.context.Flags.bitexact)
        for start in range(0, pcm.size, _FLAC_CHUNK):
            frame = av.AudioFrame.from_ndarray(pcm[start:start + _FLAC_CHUNK].reshape(1, -1),
                                               format="s16", layout="mono")
            frame.sample_rate = int(sample_rate)
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()
