"""What a `.fbank.npy` member is: the official log-mel fbank of a 16 kHz mono waveform.

It lives in `shards/` because it is part of the format: ingest computes it from the decoded audio (`preprocess/`),
and training recomputes it from a waveform mixup of two `.flac` members (`train/`); both must give the same numbers.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import Config


def fbank(waveform: np.ndarray, audio: Config) -> np.ndarray:
    """Log-mel fbank exactly as the official loader computes it: float16 [T, audio.num_mel_bins].

    The waveform (mono float32 at audio.sample_rate) is mean-subtracted, then
    torchaudio.compliance.kaldi.fbank(htk_compat=True, use_energy=False, dither=0.0, ...) with the frame
    shift/length, window and mel bins of the config (Kaldi defaults otherwise).
    """
    import torchaudio.compliance.kaldi as kaldi  # here: the trainer imports this module without torchaudio

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


def waveform_seconds(rows: int, audio: Config) -> float:
    """The longest waveform (seconds) whose fbank has `rows` rows: what a sample's `.flac` may hold at most."""
    shift = int(audio.sample_rate * audio.frame_shift_ms * 0.001)
    length = int(audio.sample_rate * audio.frame_length_ms * 0.001)
    return (length + rows * shift) / audio.sample_rate
