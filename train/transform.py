"""Decoded samples → compact examples and batches on the CPU (`Transform`); the device finishes them
(`train.augment.device_augment`).

A batch is compact: `audio` is the padded/cropped, mixed but otherwise raw log-mel [B, T, F] (float16 as stored
when no sample of the batch was mixed, else float32), `image` uint8 [B, 3, H, W] (or [B, frames, 3, H, W] for
"all"), `image_mix`/`lam` the mixup partner's uint8 frame and λ per sample, and `aug` the per-sample parameters
(frequency and time mask start/width, noise amplitude, roll shift, a noise seed) plus the normalisation constants.

The CPU does per sample only what cannot be batched (bench/loader.py): decoding one JPEG (to the official
loader's PIL pixels, `train.images`) and mixup (`train.augment`). Each batch counts which mixup ran (`batch["mixup"]`:
waveform or fbank), and the trainer logs the totals as `mixup_waveform` / `mixup_fbank`.

A sample without a modality (a video-only or audio-only clip: json `has_audio` / `has_video` false) is used where
the mode needs only what it has (`Transform.needs`: video-only samples in `videoonly`, audio-only ones in the audio
modes) and is otherwise skipped and counted, or, with `data.missing_modality: fill`, given the official loader's
stand-in (a raw fbank of 0.01, an image of 0.01 after normalisation). Examples say what was real (`has_audio`,
`has_video`, for `embed`).

With `data["segment"]` (model.variant sync) each frame used comes with the audio segment centred on it
(train/segments.py), cut from the (mixed) fbank after the frame is drawn: `audio` is [B, rows, F] for one frame,
[B, T, rows, F] for "all".
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds

from cavmae.shards.config import Config
from cavmae.shards.media import decode_flac
from cavmae.shards.schema import BadSample, one_line
from cavmae.shards.validate import SampleSpec, check_labels, check_sample
from cavmae.train.augment import draw_augmentation, mix_fbanks, mix_waveforms
from cavmae.train.failures import Failures
from cavmae.train.images import frame_pixels, stack_pixels
from cavmae.train.labels import LabelError, label_indices, soft_labels
from cavmae.train.segments import cut_segments, frame_centres

log = logging.getLogger(__name__)

# The official loader's stand-in for audio or an image it cannot load (reference 2.1, 2.3; cav-mae #5): an fbank
# of 0.01 before normalisation, an image of 0.01 after it.
FILL = 0.01


class MissingModality(BadSample):
    """A sample without the audio or the frames its mode needs (skipped and counted, as a bad sample)."""


class Transform:
    """Decoded samples → compact training/eval examples (`collate` batches them, `device_augment` finishes them).

    `aug` holds the stage's augmentation (freqm, timem, mixup, noise, label_smooth); `frame` is "random" (train),
    "middle", "all" (every frame, stacked) or a frame index. `audio` is the `audio:` config section as a dict (the
    fbank parameters used to recompute the fbank of a waveform mix; they must be those the shards were made with).
    `needs`: the modalities the model's mode reads, "a" and/or "v"; a sample without one of them is a
    MissingModality unless `data["missing_modality"]` is "fill" (see the module docstring). A modality the mode
    does not read is given the stand-in when absent. `data["segment"]`: {"rows", "centre", "rows_per_s"} pairs each
    frame with its audio segment (see the module docstring).
    """

    def __init__(self, data: dict[str, Any], aug: dict[str, Any], *, frame: str | int, num_frames: int,
                 num_classes: int, label_map: dict[str, int] | None, label_file: str | None, seed: int,
                 audio: dict[str, Any] | None = None, needs: str = "av"):
        self.data, self.aug, self.frame, self.num_frames = data, aug, frame, num_frames
        self.num_classes, self.label_map, self.label_file, self.seed = num_classes, label_map, label_file, seed
        self.audio, self.needs, self.fill = audio, needs, data.get("missing_modality") == "fill"
        self.segment = data.get("segment")
        self.rows = self.segment["rows"] if self.segment else data["target_length"]  # fbank rows the model takes
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

    def pixels(self, sample: dict[str, Any], rng: np.random.Generator,
               indices: list[int] | None = None) -> torch.Tensor:
        """uint8 [3, H, W] (or [F, 3, H, W] for "all") of the frames `indices` (default: drawn); `device_augment`
        normalises."""
        if not sample["frames"]:
            raise BadSample(f"sample {sample['key']!r} has no frames")
        if indices is None:
            indices = self.frame_indices(len(sample["frames"]), rng)
        frames = [frame_pixels(sample["frames"][i], self.data["image_size"]) for i in indices]
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
        aug = self.aug
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
        # segments follow the frames: draw them first (without segments, pixels draws them, as it always has)
        indices = self.frame_indices(len(sample["frames"]) or self.num_frames, rng) if self.segment else None
        image = self.pixels(sample, rng, indices) if both_v else self.stand_in("v")
        lam, mixup, image_mix = 1.0, None, None
        if partner is not None:
            self.check(partner)
            lam = float(rng.beta(10, 10))
            if both_a:
                fbank, mixup = self.mix_audio(sample, partner, fbank.float(), lam)
            if both_v:
                image_mix = self.pixels(partner, rng)
        if self.segment:
            fbank = self.segments(sample, fbank, indices)
        example = {"audio": fbank, "image": image, "image_mix": image_mix, "lam": lam, "key": sample["key"],
                   "video_id": sample["meta"].get("video_id"), "has_audio": real_a, "has_video": real_v,
                   "_mixup": mixup, "aug": draw_augmentation(aug, self.rows, fbank.shape[-1], rng)}
        if self.num_classes:
            first = label_indices(sample, self.label_map, self.label_file)
            check_labels(first, self.num_classes)
            second = label_indices(partner, self.label_map, self.label_file) if partner is not None else None
            example["label"] = soft_labels(self.num_classes, aug["label_smooth"], first, second, lam)
        return example

    def segments(self, sample: dict[str, Any], fbank: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """The segment [rows, F] of the frame used ([T, rows, F] for "all"), cut from `fbank` padded/cut to
        target_length rows."""
        s, total = self.segment, self.data["target_length"]
        meta = sample["meta"]
        centres = frame_centres(indices, self.num_frames, total, s["centre"], meta.get("frame_times_s"),
                                meta.get("clip_start_s") or 0.0, s["rows_per_s"])
        segments = cut_segments(fbank, centres, s["rows"], total)
        return segments if self.frame == "all" else segments[0]

    def mix_audio(self, sample: dict[str, Any], partner: dict[str, Any], fbank: torch.Tensor,
                  lam: float) -> tuple[torch.Tensor, str]:
        """The mixed (unpadded, unnormalised) fbank and which mixup made it: "waveform" (exact, both samples have
        a `.flac`) or "fbank" (mel power-domain approximation)."""
        if self.audio is None or sample["flac"] is None or partner["flac"] is None:
            return mix_fbanks(fbank, torch.from_numpy(partner["fbank"]).float(), lam), "fbank"
        from cavmae.shards.fbank import fbank as compute_fbank  # torchaudio: only for waveform mixup
        from cavmae.shards.fbank import waveform_seconds

        audio = Config(self.audio)
        waves = (decode_flac(s["flac"], int(audio.sample_rate), waveform_seconds(s["fbank"].shape[0], audio))
                 for s in (sample, partner))  # (no longer than its fbank says: checked before decoding)
        mix = mix_waveforms(*map(torch.from_numpy, waves), lam)
        return torch.from_numpy(compute_fbank(mix.numpy(), audio)).float(), "waveform"

    def filler(self, size: int, skipped: int) -> dict[str, Any]:
        """The batch of a micro-batch whose every sample was skipped (`skipped` of them, counted): `size` stand-ins,
        marked `empty`. The trainer learns nothing from it: one process passes over it; under DDP every rank must
        run each micro-batch's forward and backward (the gradients are all-reduced together), so a rank runs it with
        its loss times 0."""
        rng = np.random.default_rng(0)
        audio, image = self.stand_in("a"), self.stand_in("v")
        examples = [{"audio": audio, "image": image, "image_mix": None, "lam": 1.0, "key": "", "video_id": None,
                     "has_audio": False, "has_video": False, "_mixup": None, "_skipped": 0,
                     "aug": draw_augmentation(self.aug, self.data["target_length"], audio.shape[1], rng)}
                    for _ in range(size)]
        for example in examples if self.num_classes else ():
            example["label"] = torch.zeros(self.num_classes)
        examples[0]["_skipped"] = skipped
        return self.collate(examples) | {"empty": True}

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """A compact batch: fbanks zero-padded / cut to target_length in one [B, T, F] buffer (float16 when every
        sample is the stored float16 fbank, else float32), uint8 frames, the mixup partners' frames and λ when any
        sample was mixed, and the augmentation parameters as [B] tensors (see `device_augment`)."""
        d = self.data
        t, f = self.rows, examples[0]["audio"].shape[-1]
        dtype = torch.float16 if all(e["audio"].dtype == torch.float16 for e in examples) else torch.float32
        if examples[0]["audio"].dim() == 3:  # every frame's segment [T, rows, F], cut to size (Sync, "all")
            audio = torch.stack([e["audio"].to(dtype) for e in examples])
        else:
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
