"""The one check of a decoded sample against the settings it is read with, used by every reader (training, stats,
inspect, predict, verify, reprocess), through `shards.checked`.

`shards.reader.decode_sample` checks what a sample is on its own (schema, key, finite 2-D fbank). What depends on
the settings is checked here, before any reader uses the sample: otherwise a hostile sample first in a shard sets
the fbank width the rest are measured against (and the `data.mean/std` stats recommend), or a 633-byte JPEG whose
header claims 12000x12000 costs gigabytes when its pixels are decoded. Frame headers are read, not their pixels
(`shards.media.open_jpeg`), so the check stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config
from .media import open_flac, open_jpeg
from .schema import BadSample


@dataclass(frozen=True)
class SampleSpec:
    """What a sample read with some settings must look like; None leaves that part unchecked."""

    num_mel_bins: int | None = None   # the fbank's width
    num_frames: int | None = None     # at most this many frames
    image_size: int | None = None     # frames no larger than `open_jpeg` allows for this size
    num_classes: int | None = None    # `.labels.txt` indices below this
    flac: bool = False                # the `.flac` member opens as FLAC (`shards.media.open_flac`: its header)

    @classmethod
    def of(cls, cfg: Config, num_classes: int | None = None, flac: bool = False) -> "SampleSpec":
        """The spec of the sample-side settings of `cfg` (for shards: `shards.frozen.adopt_shard_settings` first)."""
        return cls(num_mel_bins=int(cfg.audio.num_mel_bins), num_frames=int(cfg.video.num_frames),
                   image_size=int(cfg.video.image_size), num_classes=num_classes or None, flac=flac)

    def check(self, sample: dict[str, Any]) -> None:
        """`check_sample(sample, self)`: the validator a reader hands to `shards.checked`."""
        check_sample(sample, self)


def check_sample(sample: dict[str, Any], spec: SampleSpec) -> None:
    """BadSample unless the decoded `sample` (`shards.reader.decode_sample`) fits `spec`: the fbank's mel width,
    the number of frames, each frame's JPEG header size, the label indices' range, the FLAC stream's header. Its
    cost is headers only, less than the decode it guards (BENCHMARKS.md, loader stages)."""
    fbank = sample["fbank"]  # None for a video-only sample (`decode_sample`)
    if fbank is not None and spec.num_mel_bins is not None and fbank.shape[1] != spec.num_mel_bins:
        raise BadSample(f"fbank has {fbank.shape[1]} mel bins, the settings say {spec.num_mel_bins}")
    frames = sample["frames"]
    if spec.num_frames is not None and len(frames) > spec.num_frames:
        raise BadSample(f"{len(frames)} frames, the settings say {spec.num_frames}")
    if spec.image_size is not None:
        for jpeg in frames:
            open_jpeg(jpeg, spec.image_size)
    if spec.num_classes is not None and sample["labels"]:
        check_labels(sample["labels"], spec.num_classes)
    if spec.flac and sample["flac"] is not None:
        open_flac(sample["flac"]).close()


def check_labels(indices: list[int], num_classes: int) -> None:
    """BadSample unless every class index is in 0..num_classes-1."""
    if any(not 0 <= i < num_classes for i in indices):
        raise BadSample(f"label indices {indices} outside 0..{num_classes - 1}")
