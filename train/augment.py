"""Audio augmentation and mixup: the per-sample parameters drawn on the CPU, the batched steps on the device.

The official per-sample order (reference §2.2-2.4) is kept exactly, but split in two places:

    CPU worker:  read tar  →  mixup (λ ~ Beta(10,10), waveform or fbank)  →  pad/crop fbank to target_length
                 →  draw this sample's augmentation parameters with the worker's RNG  →  collate
    device:      SpecAugment on the *unnormalised* log-mel  →  (x - mean) / std  →  uniform noise + circular roll
                 ;  image: (mixup of the two uint8 frames)  →  ImageNet normalisation      (`device_augment`)

`device_augment(batch, device)` moves a compact batch (`train.transform.Transform.collate`) to the device and does
the rest as a few batched ops (masks by broadcast comparisons, the roll as one gather with per-sample shifts). Every
command goes through it: training with the stage's augmentation, evaluation and retrieval with none (normalisation
only). A masked bin therefore still ends up at (0 - mean) / std ≈ 1.133, as the official loader produces. All random
draws except the noise tensor itself come from the sample's own numpy generator (a function of the run seed, the
epoch and the sample's position in it, `train.epochs.SampleRngs`); the noise tensor is drawn on the device from a
generator seeded with a number the batch's first sample drew, so a run stays reproducible from its seed (on one kind
of device) and resumes anywhere without replaying anything. Mixup mixes 0-255 pixels on the device, which equals
mixing normalised ones: normalisation is affine and λ + (1-λ) = 1.

Mixup is the official waveform-level one when both samples carry a `.flac` (ingest with `audio.keep_waveform:
true`): the waveforms are mixed (`mix_waveforms`) and the fbank recomputed with `shards.fbank.fbank` and the
`audio:` config. Without a waveform it falls back to mixing the stored fbanks in the mel power domain
(`mix_fbanks`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

# kaldi fbank floors mel energies at float32 eps before the log, so this is the log-mel of silence.
LOG_SILENCE = math.log(torch.finfo(torch.float32).eps)


def draw_augmentation(aug: dict[str, Any], target_length: int, num_bins: int,
                      rng: np.random.Generator) -> dict[str, Any]:
    """One sample's augmentation parameters, drawn on the CPU (applied later, batched, by `device_augment`).

    SpecAugment (torchaudio's rule): one frequency mask then one time mask, each of width ~ U[0, param) and a start
    uniform over the positions where it fits. Noise: amplitude ~ U(0, 1) / 10 and a circular time shift in
    [-T, T), official values. `seed` seeds the device generator that draws the noise tensor of the batch."""
    out: dict[str, Any] = {}
    for name, param, size in (("freq", aug["freqm"], num_bins), ("time", aug["timem"], target_length)):
        width = min(int(rng.random() * param), size) if param > 0 else 0
        out[name] = (int(rng.random() * (size - width)) if width else 0, width)
    if aug["noise"]:
        out["noise"] = float(rng.random()) / 10
        out["shift"] = int(rng.integers(-target_length, target_length))
        out["seed"] = int(rng.integers(2 ** 62))
    return out


def device_augment(batch: dict[str, Any], device: torch.device | str | None = None, *,
                   noise: torch.Tensor | None = None) -> dict[str, Any]:
    """A loader batch moved to `device` and finished there, batched over samples: SpecAugment on the raw log-mel
    (masked bins set to 0), `(x - mean) / std`, then (when the batch carries noise parameters) `x + U[0,1)·amp`
    and a circular roll along time by each sample's shift; images mixed (mixup, 0-255) and ImageNet-normalised.

    Returns a new batch: every tensor on `device`, `audio` float32 [B, T, F] ([B, frames, T, F] for per-frame
    segments, which are only normalised), `image` float32 [B, (frames,) 3, H, W]
    and no `aug` / `image_mix` / `lam`. `noise` ([B, T, F] in [0, 1)) replaces the drawn noise tensor (tests)."""
    aug = batch["aug"]
    skip = ("aug", "image_mix", "lam")
    out = {k: (v.to(device, non_blocking=True) if device is not None else v) if torch.is_tensor(v) else v
           for k, v in batch.items() if k not in skip}
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    x = out["audio"].float()
    if x.dim() == 4:  # every frame's audio segment [B, frames, rows, F] (Sync evaluation): normalised only
        if aug["masked"] or "shift" in aug:
            raise ValueError("per-frame audio segments take no SpecAugment, noise or roll (evaluation only)")
        x = x.flatten(0, 1)
    b, t, f = x.shape
    dev = x.device
    if aug["masked"]:
        (fs, fw), (ts, tw) = move(aug["freq"]).unbind(1), move(aug["time"]).unbind(1)
        bins, frames = torch.arange(f, device=dev), torch.arange(t, device=dev)
        fmask = (bins >= fs[:, None]) & (bins < (fs + fw)[:, None])  # [B, F]
        tmask = (frames >= ts[:, None]) & (frames < (ts + tw)[:, None])  # [B, T]
        x = x.masked_fill(fmask[:, None, :] | tmask[:, :, None], 0.0)
    x = (x - aug["mean"]) / aug["std"]
    if "shift" in aug:
        if noise is None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(aug["seed"])
            noise = torch.rand(x.shape, generator=gen, device=dev)
        x = x + move(noise) * move(aug["noise"])[:, None, None]
        index = (torch.arange(t, device=dev)[None, :] - move(aug["shift"])[:, None]) % t  # torch.roll, per sample
        x = x.gather(1, index[:, :, None].expand(b, t, f))
    out["audio"] = x.view(out["audio"].shape)
    image = out["image"].float()
    if "image_mix" in batch:
        lam = move(batch["lam"]).view(-1, *[1] * (image.dim() - 1))
        image = image * lam + move(batch["image_mix"]).float() * (1 - lam)
    scale = move(torch.tensor(aug["pixel_scale"])).view(3, 1, 1)  # built on the host: a blocking copy would sync
    shift = move(torch.tensor(aug["pixel_shift"])).view(3, 1, 1)
    out["image"] = (image * scale).sub_(shift).contiguous()
    return out


def mix_fbanks(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Mix two log-mel spectrograms in the mel *power* domain: log(λ·e^a + (1-λ)·e^b).

    The official code mixes waveforms and recomputes the fbank; mixing mel energies is the same up to the
    cross term between the two signals (which averages out for independent sources) and needs no waveform.
    `b` is padded with silence or cut to the length of `a`, as the official partner waveform is.
    """
    n = a.shape[0]
    if b.shape[0] < n:
        b = torch.nn.functional.pad(b, (0, 0, 0, n - b.shape[0]), value=LOG_SILENCE)
    b = b[:n]
    return torch.logaddexp(a + math.log(lam), b + math.log1p(-lam))


def mix_waveforms(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Official waveform mixup (reference §2.4): both mean-subtracted, `b` zero-padded or cut to the length of
    `a`, mixed λ·a + (1-λ)·b, and the mix mean-subtracted again."""
    a, b = a - a.mean(), b - b.mean()
    n = a.shape[0]
    b = torch.nn.functional.pad(b, (0, n - b.shape[0])) if b.shape[0] < n else b[:n]
    mix = lam * a + (1 - lam) * b
    return mix - mix.mean()
