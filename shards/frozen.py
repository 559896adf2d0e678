"""The settings a shard set was made with: the `pipeline.yaml` that ingest froze beside its shards.

The file is untrusted (shard folders are downloaded): only what describes the samples is ever read from it
(`FROZEN_KEYS`: the audio, video and clip sections and `shards.pattern`), never where or how a job runs (`ray.*`,
the rest of `shards.*`): that comes from the user's own config. Of those, training takes the sample-side facts
(`SAMPLE_FACTS`: how the fbank was computed, how many seconds of audio and how many frames of what size a sample
holds) from the shards rather than from its own config, so the model's geometry, its audio length
(`model.target_length` follows `clip.length_s` unless set) and waveform mixup follow the data. A run that sets one of
them explicitly to another value, or a `--shards` list that mixes sets made differently, is refused with one line
naming both values: otherwise it would surface as a shape error at the first forward pass, or never (a different
`frame_shift_ms`; a clip padded to 1024 rows of which 70 % are zeros).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from .config import MAX_CONFIG_BYTES, Config, ConfigError, load_config
from .store import Store

log = logging.getLogger(__name__)

FROZEN_CONFIG = "pipeline.yaml"
SAMPLE_SECTIONS = ("audio", "video", "clip")        # what a sample's bytes depend on (its config digest)
PREP_SECTIONS = SAMPLE_SECTIONS + ("shards", "ray")  # what a frozen pipeline.yaml records
FROZEN_KEYS = SAMPLE_SECTIONS + ("shards.pattern",)  # what is read back from one: the samples and their shards' names
SAMPLE_FACTS = ("audio.sample_rate", "audio.num_mel_bins", "audio.frame_shift_ms", "audio.frame_length_ms",
                "audio.window_type", "video.num_frames", "video.image_size", "clip.length_s")


def frozen_config(store: Store) -> Config:
    """The settings a shard folder's samples were made with: its pipeline.yaml's `FROZEN_KEYS` over today's defaults
    (every other setting is the default)."""
    with tempfile.TemporaryDirectory(prefix="cavmae-cfg-") as tmp:
        path = Path(tmp) / FROZEN_CONFIG
        path.write_bytes(store.read_bytes(FROZEN_CONFIG, MAX_CONFIG_BYTES + 1))  # enough to be refused if larger
        try:
            return load_config(path, sections=FROZEN_KEYS)
        except ConfigError as exc:  # name the folder's file, not our temporary copy
            raise ConfigError(str(exc).replace(str(path), store.uri(FROZEN_CONFIG))) from None


def fact(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return cfg[section][key]


def shard_set_configs(urls: list[str]) -> dict[str, Config]:
    """{pipeline.yaml location: its config} for every folder `urls` come from that has one (a folder without one,
    e.g. shards written by other tools or served over HTTP, has no entry)."""
    found: dict[str, Config] = {}
    seen: set[str] = set()
    for url in urls:
        store, _ = Store.split(url)
        if store.uri() in seen:
            continue
        seen.add(store.uri())
        try:
            present = store.is_file(FROZEN_CONFIG)
        except (OSError, ValueError):  # a store that cannot list (HTTP): no frozen config to read
            present = False
        if present:
            found[store.uri(FROZEN_CONFIG)] = frozen_config(store)
    return found


def adopt_shard_settings(cfg: Config, urls: list[str], flag: str = "--shards") -> Config:
    """`cfg` with the sample-side facts of the shards `urls` were made with.

    Raises ConfigError when the shards' folders disagree on a fact, or when the run set a fact explicitly (config
    file, preset, --set) to another value than the shards'. Shards with no pipeline.yaml beside them keep the run's
    settings, with a warning."""
    sets = shard_set_configs(urls)
    if not sets:
        log.warning("%s: no %s beside the shards; assuming they were made with this run's audio/video settings",
                    flag, FROZEN_CONFIG)
        return cfg
    (first, base), *others = sets.items()
    for dotted in SAMPLE_FACTS:
        for where, other in others:
            if fact(other, dotted) != fact(base, dotted):
                raise ConfigError(f"{flag} mixes shard sets made with different settings: '{dotted}' is "
                                  f"{fact(base, dotted)!r} in {first} but {fact(other, dotted)!r} in {where}")
    for dotted in SAMPLE_FACTS:
        if dotted in cfg.explicit and fact(cfg, dotted) != fact(base, dotted):
            raise ConfigError(f"'{dotted}' is {fact(cfg, dotted)!r} in this run but {fact(base, dotted)!r} in the "
                              f"shards' {first}; drop the setting (training follows the shards) or reprocess them")
    return cfg.with_overrides(f"{dotted}={json.dumps(fact(base, dotted))}" for dotted in SAMPLE_FACTS)
