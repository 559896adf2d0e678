"""`cavmae-prep inspect`: a picture of samples as the shards hold them (frames, log-mel, labels), the first thing
to look at to see that frames and audio line up.

Samples stream through `shards.reader` (one shard at a time): `--key` stops at the first match, `--random N` keeps
a seeded reservoir of N samples, so memory never grows with the set.
"""

from __future__ import annotations

import logging
import random
import tarfile
from typing import Any, Iterator

from shards.config import ConfigError
from shards.frozen import FROZEN_CONFIG, frozen_config
from shards.reader import decode_sample, list_shards, raw_samples
from shards.schema import BadSample, one_line
from shards.store import Store

from .inputs import LabelIndex
from .stats import shard_folder


log = logging.getLogger(__name__)


def _samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """The samples of `urls` that decode: a bad sample, or the rest of a shard that cannot be read, is skipped with
    a warning, as every reader skips them."""
    for url in urls:
        try:
            for raw in raw_samples([url]):
                try:
                    yield decode_sample(raw)
                except BadSample as exc:
                    log.warning("skipped: %s", one_line(exc))
        except (tarfile.TarError, OSError) as exc:
            log.warning("%s: unreadable from here on (%s)", url, one_line(exc))


def pick(urls: list[str], *, key: str | None = None, count: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """The sample with `key` (or with that video id), or `count` samples drawn uniformly (reservoir sampling,
    seeded), in the order of the shards."""
    if key is not None:
        for sample in _samples(urls):
            if key in (sample["key"], sample["meta"].get("video_id")):
                return [sample]
        raise ConfigError(f"--key {key}: no such sample in the {len(urls)} shard(s)")
    rng = random.Random(seed)
    chosen: list[tuple[int, dict[str, Any]]] = []
    for seen, sample in enumerate(_samples(urls)):
        if len(chosen) < count:
            chosen.append((seen, sample))
        elif (j := rng.randrange(seen + 1)) < count:
            chosen[j] = (seen, sample)
    if not chosen:
        raise ConfigError(f"no readable sample in {', '.join(urls[:3])}{' ...' if len(urls) > 3 else ''}")
    return [s for _, s in sorted(chosen, key=lambda x: x[0])]


def frame_shift_s(folder: Store, default_ms: float) -> float:
    """The fbank hop the shards were made with (their pipeline.yaml), else the given default."""
    if folder.is_file(FROZEN_CONFIG):
        return float(frozen_config(folder).audio.frame_shift_ms) / 1000
    return default_ms / 1000


def inspect(spec: str, out: str, *, key: str | None = None, count: int = 0, seed: int = 0,
            label_index_csv: str | None = None, default_shift_ms: float = 10.0) -> int:
    """Draw the sample sheet of `spec` into the PNG `out` (local path or URI); returns the number of samples."""
    from .plots import sheet_figure, to_png

    if key is None and count < 1:
        raise ConfigError("give --key KEY or --random N (N >= 1)")
    urls = list_shards(spec)
    names = LabelIndex.read(label_index_csv).display_names() if label_index_csv else {}
    samples = pick(urls, key=key, count=count, seed=seed)
    fig = sheet_figure(samples, frame_shift_s(shard_folder(spec, urls), default_shift_ms), names)
    store, name = Store.split(out)
    store.makedirs()
    store.write_bytes(name, to_png(fig))
    return len(samples)
