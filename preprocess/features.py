"""Per-clip features: the official log-mel fbank, JPEG frames, and the optional FLAC waveform.

Every encoder here is deterministic: the same input gives the same bytes on every run.
"""

from __future__ import annotations

import io

import av
import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from PIL import Image

from shards.config import Config

_FLAC_CHUNK = 4608


def fbank(waveform: np.ndarray, audio: Config) -> np.ndarray:
    """Log-mel fbank exactly as the official loader computes it: float16 [T, audio.num_mel_bins].

    The waveform (mono float32 at audio.sample_rate) is mean-subtracted, then
    torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, dither=0.0, ...) with the frame
    shift/length, window and mel bins of the config (Kaldi defaults otherwise).
    """
    wav = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).reshape(1, -1)
    wav = wav - wav.mean()
    with torch.inference_mode():
        feats = kaldi.fbank(
            wav, htk_compat=True, sample_frequency=float(audio.sample_rate), use_energy=False,
            window_type=audio.window_type, num_mel_bins=int(audio.num_mel_bins), dither=0.0,
            frame_shift=float(audio.frame_shift_ms), frame_length=float(audio.frame_length_ms),
        )
    return feats.numpy().astype(np.float16)


def fbank_rows(num_samples: int, audio: Config) -> int:
    """Rows kaldi.fbank gives for `num_samples` samples (snip_edges=True)."""
    shift = int(audio.sample_rate * audio.frame_shift_ms * 0.001)
    length = int(audio.sample_rate * audio.frame_length_ms * 0.001)
    return 0 if num_samples < length else 1 + (num_samples - length) // shift


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
