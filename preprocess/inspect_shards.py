"""`cavmae-prep inspect`: a picture of samples as the shards hold them (frames, log-mel, labels), the first thing
to look at to see that frames and audio line up.

Samples stream through `shards.reader` (one shard at a time): `--key` stops at the first match, `--random N` keeps
a seeded reservoir of N samples, so memory never grows with the set. Each sample is checked against the shards' own
sample settings (`shards.checked.checked_samples`, `shards.validate.check_sample`) before it is kept: one that
fails is skipped with a warning, so its frames are never decoded (a JPEG header claiming 12000x12000 is refused
by its header).
"""

from __future__ import annotations

import random
from typing import Any

from cavmae.shards.checked import checked_samples
from cavmae.shards.config import Config, ConfigError
from cavmae.shards.errors import NoSamples
from cavmae.shards.frozen import adopt_shard_settings
from cavmae.shards.reader import list_shards
from cavmae.shards.store import Store, regular_files
from cavmae.shards.validate import SampleSpec

from .inputs import LabelIndex


def pick(urls: list[str], *, key: str | None = None, count: int = 0, seed: int = 0,
         spec: SampleSpec = SampleSpec()) -> list[dict[str, Any]]:
    """The sample with `key` (or with that video id), or `count` samples drawn uniformly (reservoir sampling,
    seeded), in the order of the shards; only samples that fit `spec`."""
    if key is not None:
        for sample in checked_samples(urls, spec.check):
            if key in (sample["key"], sample["meta"].get("video_id")):
                return [sample]
        raise ConfigError(f"--key {key}: no such sample in the {len(urls)} shard(s)")
    rng = random.Random(seed)
    chosen: list[tuple[int, dict[str, Any]]] = []
    for seen, sample in enumerate(checked_samples(urls, spec.check)):
        if len(chosen) < count:
            chosen.append((seen, sample))
        elif (j := rng.randrange(seen + 1)) < count:
            chosen[j] = (seen, sample)
    if not chosen:
        raise NoSamples(f"no decodable sample in {', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}")
    return [s for _, s in sorted(chosen, key=lambda x: x[0])]


def inspect(spec: str, out: str, cfg: Config, *, key: str | None = None, count: int = 0, seed: int = 0,
            label_index_csv: str | None = None) -> int:
    """Draw the sample sheet of `spec` into the PNG `out` (local path or URI); returns the number of samples. The
    sample settings (fbank hop and width, frames) are the shards' own (their pipeline.yaml), else `cfg`'s."""
    from .plots import sheet_figure, to_png

    if key is None and count < 1:
        raise ConfigError("give --key KEY or --random N (N >= 1)")
    urls = regular_files(list_shards(spec))
    cfg = adopt_shard_settings(cfg, urls, flag="inspect")
    names = LabelIndex.read(label_index_csv).display_names() if label_index_csv else {}
    samples = pick(urls, key=key, count=count, seed=seed, spec=SampleSpec.of(cfg))
    fig = sheet_figure(samples, float(cfg.audio.frame_shift_ms) / 1000, names)
    store, name = Store.split(out)
    store.makedirs()
    store.write_bytes(name, to_png(fig))
    return len(samples)
