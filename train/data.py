"""Streaming training data: shards → compact batches on the CPU → augmented, normalised batches on the device.

The official per-sample order (reference §2.2-2.4) is kept exactly, but split in two places:

    CPU worker:  read tar  →  mixup (λ ~ Beta(10,10), waveform or fbank)  →  pad/crop fbank to target_length
                 →  draw this sample's augmentation parameters with the worker's RNG  →  collate
    device:      SpecAugment on the *unnormalised* log-mel  →  (x - mean) / std  →  uniform noise + circular roll
                 ;  image: (mixup of the two uint8 frames)  →  ImageNet normalisation      (`device_augment`)

A batch from the loaders is compact: `audio` is the padded/cropped, mixed but otherwise raw log-mel [B, T, F]
(float16 as stored when no sample of the batch was mixed, else float32), `image` uint8 [B, 3, H, W] (or
[B, frames, 3, H, W] for "all"), `image_mix`/`lam` the mixup partner's uint8 frame and λ per sample, and `aug`
the per-sample parameters (frequency and time mask start/width, noise amplitude, roll shift, a noise seed) plus
the normalisation constants. `device_augment(batch, device)` moves it to the device and does the rest as a few
batched ops (masks by broadcast comparisons, the roll as one gather with per-sample shifts). Every command goes
through it: training with the stage's augmentation, evaluation and retrieval with none (normalisation only).
A masked bin therefore still ends up at (0 - mean) / std ≈ 1.133, as the official loader produces. All random
draws except the noise tensor itself come from the sample's own numpy generator (a function of the run seed, the
epoch and the sample's position in it, `train.epochs.SampleRngs`); the noise tensor is drawn on the device from a
generator seeded with a number the batch's first sample drew, so a run stays reproducible from its seed (on one kind
of device) and resumes anywhere without replaying anything.

Speed (bench/loader.py): the CPU does per sample only what cannot be batched: reading the tar (the one tar layer,
`shards.tar`, our own header parser, ~4x faster than `tarfile`'s streaming mode: it matters at ~12 members per
sample), decoding npy/json, decoding one JPEG (PIL, as the official loader; a frame already stored at
the target size, what ingest writes, is only decoded) and mixup. Mixup mixes 0-255 pixels on the device, which
equals mixing normalised ones: normalisation is affine and λ + (1-λ) = 1.

Mixup is the official waveform-level one when both samples carry a `.flac` (ingest with `audio.keep_waveform:
true`): the waveforms are mixed and the fbank recomputed with `shards.fbank.fbank` and the `audio:` config.
Without a waveform it falls back to mixing the stored fbanks in the mel power domain (`mix_fbanks`). Each batch
counts which one ran (`batch["mixup"]`), and the trainer logs the totals as `mixup_waveform` / `mixup_fbank`.

Training reads the samples of an epoch in the order `train.epochs.EpochPlan` gives (a full permutation, the same
global steps on any number of GPUs and workers, every rank the same number of batches), each sample with one ranged
read of its bytes (`shards.index`), its mixup partner drawn from the whole set as the official loader does. Memory
is bounded by the batches in flight: there is no shuffle buffer. Evaluation streams each shard once, split by node
and by worker (`webdataset.DataPipeline`).

A sample without a modality (a video-only or audio-only clip: json `has_audio` / `has_video` false) is used where
the mode needs only what it has (`Transform.needs`: video-only samples in `videoonly`, audio-only ones in the audio
modes) and is otherwise skipped and counted, or, with `data.missing_modality: fill`, given the official loader's
stand-in (a raw fbank of 0.01, an image of 0.01 after normalisation). Examples say what was real (`has_audio`,
`has_video`, for `embed`).

A sample that fails to decode (bad JPEG, bad npy, a member outside the schema, a truncated shard) is skipped and
counted; the count rides along in each batch (`batch["skipped"]`) so the trainer can report it. We never replace it
with a constant tensor as the official loader does (that silently trains on garbage, issue #5).
"""

from __future__ import annotations

import logging
import math
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torchvision import transforms

from shards.config import Config
from shards.index import SampleIndex, SpanReader, read_raw_sample
from shards.media import decode_flac, open_jpeg
from shards.reader import decode_sample, is_remote, raw_samples
from shards.schema import BadSample, one_line
from shards.validate import SampleSpec, check_labels, check_sample
from train.epochs import EpochPlan, SampleRngs
from shards.errors import NoSamples, UserError  # noqa: F401 (train.data.NoSamples)

log = logging.getLogger(__name__)

# kaldi fbank floors mel energies at float32 eps before the log, so this is the log-mel of silence.
LOG_SILENCE = math.log(torch.finfo(torch.float32).eps)
# Batches in page-locked memory on CUDA: `device_augment`'s non_blocking copies then neither wait for the device
# nor block the host (from pageable memory they stall the host until the stream reaches them).
PIN = torch.cuda.is_available()
REMOTE_READS = 16  # concurrent ranged reads per loader worker from object storage (each is one round trip)


# The official loader's stand-in for audio or an image it cannot load (reference 2.1, 2.3; cav-mae #5): an fbank
# of 0.01 before normalisation, an image of 0.01 after it.
FILL = 0.01


class MissingModality(BadSample):
    """A sample without the audio or the frames its mode needs (skipped and counted, as a bad sample)."""


class LabelError(UserError):
    """A label id that the label index does not know (one line, naming the label and the file)."""


def shard_list(urls: Iterable[str], shown: int = 3) -> str:
    """'a.tar, b.tar, c.tar and 7 more' for one-line messages."""
    names = list(urls)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


MAX_FAILURES = 1000  # consecutive skips (samples or shards) before a stream gives up: a set where nothing decodes


class Failures:
    """Consecutive skips of one stream stage: each is logged with its key and shard (so the skip counter equals
    the warnings), and MAX_FAILURES in a row without one good sample raise NoSamples instead of looping forever
    over a set in which nothing decodes (random bytes, a non-tar file, every sample outside the config)."""

    def __init__(self) -> None:
        self.skipped = 0  # since the last sample handed on (rides along in the batches)
        self.in_a_row = 0
        self.urls: dict[str, None] = {}

    def skip(self, url: str, what: str, reason: Any) -> None:
        self.skipped += 1
        self.in_a_row += 1
        self.urls[url] = None
        log.warning("skipping %s of %s: %s", what, url, one_line(reason))
        if self.in_a_row >= MAX_FAILURES:
            raise NoSamples(f"no sample decoded in {self.in_a_row} tries in a row (shards: {shard_list(self.urls)}; "
                            f"last: {one_line(reason)})")

    def passed(self) -> int:
        """A good sample: the skips since the previous one (and reset)."""
        count, self.skipped, self.in_a_row, self.urls = self.skipped, 0, 0, {}
        return count


# ---------------------------------------------------------------------------------------------- audio steps

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

    Returns a new batch: every tensor on `device`, `audio` float32 [B, T, F], `image` float32 [B, (frames,) 3, H, W]
    and no `aug` / `image_mix` / `lam`. `noise` ([B, T, F] in [0, 1)) replaces the drawn noise tensor (tests)."""
    aug = batch["aug"]
    skip = ("aug", "image_mix", "lam")
    out = {k: (v.to(device, non_blocking=True) if device is not None else v) if torch.is_tensor(v) else v
           for k, v in batch.items() if k not in skip}
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    x = out["audio"].float()
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
    out["audio"] = x
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


# ---------------------------------------------------------------------------------------------- labels

def soft_labels(num_classes: int, smooth: float, first: list[int], second: list[int] | None = None,
                lam: float = 1.0) -> torch.Tensor:
    """Official label vector: every entry starts at smooth/K; without mixup positives are *set* to 1-smooth,
    with mixup they get += λ(1-smooth) (first sample) and += (1-λ)(1-smooth) (partner)."""
    y = torch.full((num_classes,), smooth / num_classes)
    if second is None:
        y[list(first)] = 1.0 - smooth
        return y
    for idx in first:
        y[idx] += lam * (1.0 - smooth)
    for idx in second:
        y[idx] += (1.0 - lam) * (1.0 - smooth)
    return y


def read_label_index(path: str | Path) -> dict[str, int]:
    """The official label CSV (`index,mid,display_name`) as label id → class index."""
    import csv

    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"index", "mid"} <= set(reader.fieldnames):
                raise LabelError(f"{path}: label index CSV needs the header index,mid,display_name")
            return {row["mid"]: int(row["index"]) for row in reader}
    except OSError as exc:
        raise LabelError(f"{path}: cannot read label index ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise LabelError(f"{path}: bad label index row ({exc})") from None


def label_indices(sample: dict[str, Any], label_map: dict[str, int] | None, label_file: str | None) -> list[int]:
    """Class indices of a sample: label ids from its metadata mapped through the label index when one is given,
    else its `.labels.txt` member."""
    if label_map is not None:
        out = []
        for label in sample["meta"].get("labels") or []:
            if label not in label_map:
                raise LabelError(f"unknown label id {label!r} (sample {sample['key']!r}) is not in {label_file}")
            out.append(label_map[label])
        return out
    if sample["labels"] is None:
        raise LabelError(f"sample {sample['key']!r} in {sample['url']} has no .labels.txt member; pass --labels")
    return sample["labels"]


# ---------------------------------------------------------------------------------------------- images

def frame_pixels(jpeg: bytes, size: int) -> torch.Tensor:
    """A stored frame as uint8 [3, size, size], decoded with PIL as the official loader does, then the official
    Resize(short side, bicubic) + CenterCrop (no random crop or flip), skipped when the frame is already at the
    target size (ingest's output). `device_augment` normalises. JPEG only, and a frame far larger than `size` is a
    BadSample before any pixel is decoded (`shards.media.open_jpeg`)."""
    image = open_jpeg(jpeg, size)
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)(image)
        image = transforms.CenterCrop(size)(image)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [..., 3, H, W] uint8 frames that are channel-last in memory (PIL's layout, what `frame_pixels` gives)
    without a strided copy: ~15x faster than `torch.stack` of the CHW views. The result is channel-last in memory
    too; `device_augment` makes it contiguous after normalising."""
    return torch.stack([x.movedim(-3, -1) for x in images]).movedim(-1, -3)


# ---------------------------------------------------------------------------------------------- manifest

def balance_weights(rows: list[dict[str, Any]], index: SampleIndex) -> np.ndarray:
    """Official class-balance weights (`gen_weight_file.py`): label weight 1000/(count+0.01), summed over a
    sample's labels; one per sample of `index` (a sample the manifest does not list weighs nothing)."""
    counts = Counter(label for r in rows for label in r["labels"] or [])
    by_key = {r["key"]: sum(1000.0 / (counts[label] + 0.01) for label in r["labels"] or []) for r in rows}
    return np.array([by_key.get(k.decode(), 0.0) for k in index.key], dtype=np.float64)


# ---------------------------------------------------------------------------------------------- pipeline stages

def decoded_samples(shards: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Decode every sample of every shard (`shards.reader.decode_sample` validates it), skipping (and counting in
    `_skipped`) what cannot be decoded; `Failures` gives up on a set where nothing decodes.

    A truncated or corrupt tar (any malformed header) loses the rest of that shard only."""
    failures = Failures()
    for shard in shards:
        url = shard["url"]
        try:
            for raw in raw_samples([url]):
                try:
                    sample = decode_sample(raw)
                except BadSample as exc:
                    what = f"sample {raw.get('__key__', '?')!r}"
                    failures.skip(url, what, str(exc).removeprefix(f"{url}: {what}: "))
                    continue
                sample["_skipped"] = failures.passed()
                yield sample
        except (tarfile.TarError, OSError, ValueError) as exc:
            failures.skip(url, "the rest of the shard", exc)


class Transform:
    """Decoded samples → compact training/eval examples (`collate` batches them, `device_augment` finishes them).

    `aug` holds the stage's augmentation (freqm, timem, mixup, noise, label_smooth); `frame` is "random" (train),
    "middle", "all" (every frame, stacked) or a frame index. `audio` is the `audio:` config section as a dict (the
    fbank parameters used to recompute the fbank of a waveform mix; they must be those the shards were made with).
    `needs`: the modalities the model's mode reads, "a" and/or "v"; a sample without one of them is a
    MissingModality unless `data["missing_modality"]` is "fill" (see the module docstring). A modality the mode
    does not read is given the stand-in when absent.
    """

    def __init__(self, data: dict[str, Any], aug: dict[str, Any], *, frame: str | int, num_frames: int,
                 num_classes: int, label_map: dict[str, int] | None, label_file: str | None, seed: int,
                 audio: dict[str, Any] | None = None, needs: str = "av"):
        self.data, self.aug, self.frame, self.num_frames = data, aug, frame, num_frames
        self.num_classes, self.label_map, self.label_file, self.seed = num_classes, label_map, label_file, seed
        self.audio, self.needs, self.fill = audio, needs, data.get("missing_modality") == "fill"
        std = torch.tensor(data["image_std"], dtype=torch.float64)
        # (x / 255 - mean) / std as one multiply-subtract on the batch (`device_augment`)
        self.pixel_scale = (1 / (255 * std)).tolist()
        self.pixel_shift = (torch.tensor(data["image_mean"], dtype=torch.float64) / std).tolist()
        # the uint8 pixel that normalises to FILL (within uint8 precision: |error| < 0.01)
        mean = torch.tensor(data["image_mean"], dtype=torch.float64)
        self.fill_pixel = torch.round(255 * (mean + FILL * std)).to(torch.uint8)

    def __call__(self, samples: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Examples of a decoded stream (evaluation: no mixup), skipping the samples `try_example` rejects."""
        rng = np.random.default_rng(self.seed * 100003 + wds.utils.pytorch_worker_seed())
        failures = Failures()
        skipped = 0
        for sample in samples:
            skipped += sample["_skipped"]
            try:
                example = self.example(sample, None, rng)
            except LabelError:
                raise
            except (OSError, ValueError) as exc:  # a bad JPEG or .flac in a good shard (BadSample is a ValueError)
                failures.skip(sample["url"], f"sample {sample['key']!r}", exc)
                continue
            example["_skipped"], skipped = skipped + failures.passed(), 0
            yield example

    def try_example(self, sample: dict[str, Any], partner: dict[str, Any] | None,
                    rng: np.random.Generator) -> dict[str, Any] | None:
        """`example`, or None (logged) for a sample that fails its checks or whose frames do not decode."""
        try:
            return self.example(sample, partner, rng)
        except LabelError:
            raise
        except (OSError, ValueError) as exc:  # BadSample is a ValueError
            log.warning("skipping sample %r of %s: %s", sample["key"], sample["url"], one_line(exc))
            return None

    def check(self, sample: dict[str, Any]) -> None:
        """What `decode_sample` cannot know (`shards.validate.check_sample`): the fbank's mel width must be the
        model's (`num_mel_bins` in `data`, when given), the frames at most `num_frames`. Frame sizes are checked as
        each frame is opened (`frame_pixels`: only those used are), label indices in `example` (after mapping)."""
        check_sample(sample, SampleSpec(num_mel_bins=self.data.get("num_mel_bins"), num_frames=self.num_frames))

    def frame_indices(self, available: int, rng: np.random.Generator) -> list[int]:
        if self.frame == "random":
            return [int(rng.integers(available))]
        if self.frame == "all":
            return [min(i, available - 1) for i in range(self.num_frames)]
        wanted = available // 2 if self.frame == "middle" else int(self.frame)  # official: frame 5 of 10
        return [min(wanted, available - 1)]  # official: step down to the last frame that exists

    def pixels(self, sample: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:
        """uint8 [3, H, W] (or [F, 3, H, W] for "all"); `device_augment` normalises."""
        if not sample["frames"]:
            raise BadSample(f"sample {sample['key']!r} has no frames")
        frames = [frame_pixels(sample["frames"][i], self.data["image_size"])
                  for i in self.frame_indices(len(sample["frames"]), rng)]
        return stack_pixels(frames) if self.frame == "all" else frames[0]

    @staticmethod
    def has(sample: dict[str, Any], modality: str) -> bool:
        """Whether a decoded sample holds the audio ("a") or the frames ("v")."""
        return sample["fbank"] is not None if modality == "a" else bool(sample["frames"])

    def stand_in(self, modality: str) -> torch.Tensor:
        """The official loader's stand-in: a raw fbank [target_length, F] of FILL, or frame(s) that normalise to
        FILL."""
        if modality == "a":
            return torch.full((self.data["target_length"], self.data.get("num_mel_bins", 128)), FILL)
        size = self.data["image_size"]
        image = self.fill_pixel.view(3, 1, 1).expand(3, size, size)
        return image.expand(self.num_frames, 3, size, size).clone() if self.frame == "all" else image.clone()

    def example(self, sample: dict[str, Any], partner: dict[str, Any] | None,
                rng: np.random.Generator) -> dict[str, Any]:
        """One sample's compact parts: the raw (mixed, unpadded) fbank, uint8 frame(s) (and the partner's with λ),
        and its augmentation parameters. Padding happens in `collate`, the rest in `device_augment`.

        A modality missing from the sample, or from its mixup partner, becomes the stand-in (as the official
        loader, whose mixed load fails when either file is missing); when the mode needs it and
        `missing_modality` is skip, the sample is a MissingModality and a partner without it cancels the mixup."""
        d, aug = self.data, self.aug
        self.check(sample)
        lacking = [m for m in self.needs if not self.has(sample, m)]
        if lacking and not self.fill:
            raise MissingModality(f"no {' and no '.join('audio' if m == 'a' else 'frames' for m in lacking)}, "
                                  f"which this mode reads (data.missing_modality: fill uses the official stand-in)")
        if partner is not None and not self.fill and not all(self.has(partner, m) for m in self.needs):
            partner = None
        real_a, real_v = self.has(sample, "a"), self.has(sample, "v")
        both_a = real_a and (partner is None or self.has(partner, "a"))
        both_v = real_v and (partner is None or self.has(partner, "v"))
        fbank = torch.from_numpy(sample["fbank"]) if both_a else self.stand_in("a")
        image = self.pixels(sample, rng) if both_v else self.stand_in("v")
        lam, mixup, image_mix = 1.0, None, None
        if partner is not None:
            self.check(partner)
            lam = float(rng.beta(10, 10))
            if both_a:
                fbank, mixup = self.mix_audio(sample, partner, fbank.float(), lam)
            if both_v:
                image_mix = self.pixels(partner, rng)
        example = {"audio": fbank, "image": image, "image_mix": image_mix, "lam": lam, "key": sample["key"],
                   "video_id": sample["meta"].get("video_id"), "has_audio": real_a, "has_video": real_v,
                   "_mixup": mixup, "aug": draw_augmentation(aug, d["target_length"], fbank.shape[1], rng)}
        if self.num_classes:
            first = label_indices(sample, self.label_map, self.label_file)
            check_labels(first, self.num_classes)
            second = label_indices(partner, self.label_map, self.label_file) if partner is not None else None
            example["label"] = soft_labels(self.num_classes, aug["label_smooth"], first, second, lam)
        return example

    def mix_audio(self, sample: dict[str, Any], partner: dict[str, Any], fbank: torch.Tensor,
                  lam: float) -> tuple[torch.Tensor, str]:
        """The mixed (unpadded, unnormalised) fbank and which mixup made it: "waveform" (exact, both samples have
        a `.flac`) or "fbank" (mel power-domain approximation)."""
        if self.audio is None or sample["flac"] is None or partner["flac"] is None:
            return mix_fbanks(fbank, torch.from_numpy(partner["fbank"]).float(), lam), "fbank"
        from shards.fbank import fbank as compute_fbank  # torchaudio: only for waveform mixup
        from shards.fbank import waveform_seconds

        audio = Config(self.audio)
        waves = (decode_flac(s["flac"], int(audio.sample_rate), waveform_seconds(s["fbank"].shape[0], audio))
                 for s in (sample, partner))  # (no longer than its fbank says: checked before decoding)
        mix = mix_waveforms(*map(torch.from_numpy, waves), lam)
        return torch.from_numpy(compute_fbank(mix.numpy(), audio)).float(), "waveform"

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """A compact batch: fbanks zero-padded / cut to target_length in one [B, T, F] buffer (float16 when every
        sample is the stored float16 fbank, else float32), uint8 frames, the mixup partners' frames and λ when any
        sample was mixed, and the augmentation parameters as [B] tensors (see `device_augment`)."""
        d = self.data
        t, f = d["target_length"], examples[0]["audio"].shape[1]
        dtype = torch.float16 if all(e["audio"].dtype == torch.float16 for e in examples) else torch.float32
        audio = torch.empty(len(examples), t, f, dtype=dtype)
        for row, e in zip(audio, examples):
            n = min(e["audio"].shape[0], t)
            row[:n] = e["audio"][:n]
            row[n:] = 0
        params = [e["aug"] for e in examples]
        aug: dict[str, Any] = {"freq": torch.tensor([p["freq"] for p in params]),
                               "time": torch.tensor([p["time"] for p in params]),
                               "masked": any(p["freq"][1] or p["time"][1] for p in params),
                               "mean": d["mean"], "std": d["std"],
                               "pixel_scale": self.pixel_scale, "pixel_shift": self.pixel_shift}
        if "shift" in params[0]:
            aug.update(noise=torch.tensor([p["noise"] for p in params], dtype=torch.float32),
                       shift=torch.tensor([p["shift"] for p in params]), seed=params[0]["seed"])
        batch = {"audio": audio, "image": stack_pixels([e["image"] for e in examples]), "aug": aug,
                 "key": [e["key"] for e in examples], "video_id": [e["video_id"] for e in examples],
                 # what was real, not a stand-in (an example made elsewhere without the flags has both)
                 "has_audio": [e.get("has_audio", True) for e in examples],
                 "has_video": [e.get("has_video", True) for e in examples],
                 "skipped": sum(e["_skipped"] for e in examples),
                 "mixup": dict(Counter(e["_mixup"] for e in examples if e["_mixup"]))}
        if any(e["image_mix"] is not None for e in examples):
            batch["image_mix"] = stack_pixels([e["image"] if e["image_mix"] is None else e["image_mix"]
                                               for e in examples])
            batch["lam"] = torch.tensor([e["lam"] for e in examples], dtype=torch.float32)
        if "label" in examples[0]:
            batch["label"] = torch.stack([e["label"] for e in examples])
        return batch


# ---------------------------------------------------------------------------------------------- loaders

class EpochBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches `first` .. `first + count - 1` of `epoch`, as `plan` orders them (see
    `train.epochs`): loader worker w of n builds micro-batches w, w+n, ... and the DataLoader yields them
    round-robin, so the order does not depend on n.

    A sample is read with one ranged read and decoded with `shards.reader.decode_sample`; its mixup partner is a
    sample of the whole index. A sample that cannot be read or decoded is skipped and counted (the batch is
    smaller); a bad partner only cancels that sample's mixup."""

    def __init__(self, index: SampleIndex, transform: Transform, plan: EpochPlan, epoch: int, first: int,
                 count: int):
        self.index, self.transform, self.plan, self.epoch = index, transform, plan, epoch
        self.order = plan.order(epoch)
        self.positions = plan.positions(first, count)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SpanReader()
        remote = any(is_remote(u) for u in self.index.urls)
        pool = ThreadPoolExecutor(REMOTE_READS) if remote else None
        rngs = SampleRngs(self.plan.seed, self.epoch)
        try:
            for i in range(worker, len(self.positions), workers):
                yield self.batch(self.positions[i], reader, pool, rngs)
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
            reader.close()

    def batch(self, positions: np.ndarray, reader: SpanReader, pool: ThreadPoolExecutor | None,
              rngs: SampleRngs) -> dict[str, Any]:
        mixup = self.transform.aug["mixup"]
        wanted = []
        for pos in positions:
            rng = rngs.at(int(pos), 0)
            partner = int(rng.integers(len(self.index))) if mixup > 0 and rng.random() < mixup else None
            wanted.append((int(self.order[pos]), partner))
        need = sorted({i for pair in wanted for i in pair if i is not None})
        samples = dict(zip(need, pool.map(self.sample, need, [reader] * len(need)) if pool is not None
                           else (self.sample(i, reader) for i in need)))
        examples, skipped = [], 0
        for (i, partner), pos in zip(wanted, positions):
            example = None if samples[i] is None else self.transform.try_example(
                samples[i], samples[partner] if partner is not None else None, rngs.at(int(pos), 1))
            if example is None:
                skipped += 1
                continue
            example["_skipped"] = 0
            examples.append(example)
        if not examples:
            raise NoSamples(f"epoch {self.epoch + 1}: no decodable sample in a batch (first: "
                            f"{self.index.url_of(wanted[0][0])} {self.index.key_of(wanted[0][0])!r}); see the log")
        examples[0]["_skipped"] = skipped
        return self.transform.collate(examples)

    def sample(self, i: int, reader: SpanReader) -> dict[str, Any] | None:
        """Decoded sample `i` of the index, or None (logged) when it cannot be read or decoded."""
        try:
            return decode_sample(read_raw_sample(reader, self.index, i))
        except (BadSample, tarfile.TarError, OSError, ValueError) as exc:
            log.warning("skipping sample %r of %s: %s", self.index.key_of(i), self.index.url_of(i), exc)
            return None


def train_loader(index: SampleIndex, transform: Transform, plan: EpochPlan, *, epoch: int, first: int, count: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches `first` .. `first + count - 1` of `epoch` (0-based), collated (`EpochBatches`)."""
    dataset = EpochBatches(index, transform, plan, epoch, first, count)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=min(num_workers, max(count, 1)),
                                       pin_memory=PIN)


def eval_loader(urls: list[str], transform: Transform, *, batch_size: int, num_workers: int) -> wds.WebLoader:
    """Every sample of `urls` once (split by node and worker), last batch kept."""
    pipe = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker, decoded_samples,
                            transform, wds.batched(batch_size, collation_fn=transform.collate, partial=True))
    return wds.WebLoader(pipe, batch_size=None, num_workers=min(num_workers, len(urls)), pin_memory=PIN)
