"""`cavmae-prep verify SHARDS...`: read a shard set through before trusting it with a week of training.

Each shard is checked by `verify_shard`, a pure function of the shard's URL, its manifest rows and the sample
settings it was made with (plain data in, a list of one-line problems out), so a job framework can run it as a Ray
task; `verify` runs it shard after shard. Every member is read through the one tar layer (`shards.tar`: truncation,
sparse or compressed files, bad headers), every sample grouped, decoded (each member by its kind of
`shards.schema.MEMBER_KINDS`) and checked as every reader does (`shards.checked`), here against the settings in
full (mel bins, number and size of frames, every frame's pixels, FLAC), and
the manifest's spans must be exactly the shard's samples.

`list_members` gives `--list`: one JSON object per regular member, the name, size and SHA-256 `tarfile` gives.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

from cavmae.shards.checked import SHARD_ERRORS, Skip, checked, checked_groups
from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples
from cavmae.shards.frozen import FROZEN_CONFIG, shard_set_configs
from cavmae.shards.index import SpanReader
from cavmae.shards.manifest import shard_manifests
from cavmae.shards.media import open_jpeg
from cavmae.shards.reader import list_shards, open_stream
from cavmae.shards.samples import span_group
from cavmae.shards.schema import BadSample, one_line
from cavmae.shards.store import Store, regular_files
from cavmae.shards.tar import read_members
from cavmae.shards.validate import SampleSpec

from .jobs import RowJob, run_row_job


def _open(url: str) -> Any:
    return open_stream(url)


def check_sample(sample: dict[str, Any], cfg: Config) -> None:
    """What a decoded sample must be under the settings its shards were made with; BadSample otherwise. The
    readers' one validator (`shards.validate.check_sample`, the FLAC stream's header included) first, then what
    only a full read can tell: every frame there and decoded at the frame size."""
    SampleSpec.of(cfg, flac=True).check(sample)
    frames, size = int(cfg.video.num_frames), int(cfg.video.image_size)
    if sample["meta"].get("has_video") is not False and len(sample["frames"]) != frames:
        raise BadSample(f"{len(sample['frames'])} frames, the shards' settings {frames}")
    for i, data in enumerate(sample["frames"]):
        image = open_jpeg(data, size)
        if image.size != (size, size):
            raise BadSample(f"frame{i} is {image.size[0]}x{image.size[1]}, the shards' settings {size}x{size}")
        image.load()


def verify_shard(url: str, rows: list[dict[str, Any]] | None, settings: dict[str, Any]) -> tuple[int, list[str]]:
    """(samples that decode and pass `check_sample`, one line per problem) of one shard; `rows` are its manifest
    rows (None: no manifest to check against), `settings` the sample-side config it was made with (a dict)."""
    cfg = Config(settings)
    problems: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    broken: list[Skip] = []

    def skipped(skip: Skip) -> None:
        if skip.key is None:
            broken.append(skip)
            text = one_line(skip.error)
            problems.append(text if text.startswith(url) else f"{url}: {text}")
        else:
            spans.setdefault(skip.key, skip.span)
            problems.append(skip.line())

    passed = set()
    for group, _ in checked_groups(url, partial(check_sample, cfg=cfg), skipped):
        spans.setdefault(group.key, (group.start, group.end - group.start))
        passed.add(group.key)
    good = len(passed)
    if broken:
        if rows is not None:  # the manifest's spans name which samples the damage took
            for key, problem in _damaged(url, [r for r in rows if r["key"] not in passed], cfg):
                if problem is None:
                    good += 1
                else:
                    problems.append(f"{url}: sample {key!r} (in manifest.parquet) is damaged: {problem}")
        return good, problems
    if rows is not None:
        listed = {r["key"]: (r.get("offset"), r.get("length")) for r in rows}
        problems += [f"{url}: sample {k!r} is in the shard but not in manifest.parquet" for k in spans
                     if k not in listed]
        problems += [f"{url}: sample {k!r} is in manifest.parquet but not in the shard" for k in listed
                     if k not in spans]
        problems += [f"{url}: sample {k!r} is listed {n} times in manifest.parquet"
                     for k, n in Counter(r["key"] for r in rows).items() if n > 1]
        for key, (offset, length) in listed.items():
            if key in spans and None not in (offset, length) and (offset, length) != spans[key]:
                at = spans[key]
                problems.append(f"{url}: sample {key!r}: manifest.parquet puts it at bytes {offset}..{offset + length}"
                                f", the shard holds it at {at[0]}..{at[0] + at[1]}")
    return good, problems


def _damaged(url: str, rows: list[dict[str, Any]], cfg: Config) -> Iterator[tuple[str, str | None]]:
    """(key, None or what is wrong) of each manifest row, its sample read alone at the span the row records (the
    one span parser, `shards.samples.span_group`)."""
    reader = SpanReader()
    try:
        for r in rows:
            try:
                data = reader.read(url, int(r["offset"]), int(r["length"]))
                checked(span_group(data, url, r["key"], "manifest.parquet puts").raw(), partial(check_sample, cfg=cfg))
                yield r["key"], None
            except (*SHARD_ERRORS, TypeError) as exc:  # (TypeError: a row without an integer span)
                yield r["key"], one_line(exc).removeprefix(f"{url}: ")
    finally:
        reader.close()


@dataclass
class Verified:
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.shards} shard(s), {self.samples} good sample(s), {len(self.problems)} problem(s)")


def _verify_rows(item: tuple[str, list[dict[str, Any]] | None, dict[str, Any]], _cfg: Config) -> list[dict[str, Any]]:
    """The job's task body: one shard's row (its good samples and problems; 'failed' on the progress bar when it
    has problems)."""
    url, rows, settings = item
    good, problems = verify_shard(url, rows, settings)
    return [{"url": url, "good": good, "problems": problems, "status": "failed" if problems else "ok"}]


VERIFY = RowJob("verify", rows=_verify_rows, unit="shard")


def verify(spec: list[str], cfg: Config, *, workers: int | None = None, address: str | None = None,
           progress: bool = False) -> tuple[list[str], Verified]:
    """Every problem of the shards of `spec`, in shard order, and the `Verified` summary: one task per shard
    (`preprocess.jobs`, local Ray or a cluster). Each folder's frozen `pipeline.yaml` gives its samples' settings
    (`cfg` for shards without one); NoSamples when no sample of the whole set decodes."""
    urls = list_shards(spec)
    manifests = shard_manifests(urls)
    frozen = shard_set_configs(urls)
    items = [(url, manifests[url], frozen.get(Store.split(url)[0].uri(FROZEN_CONFIG), cfg).to_dict())
             for url in urls]
    found = run_row_job(VERIFY, items, Store.split(urls[0])[0], cfg, workers=workers, address=address,
                        progress=progress, desc="verify")
    done = Verified(shards=len(urls), samples=sum(r["good"] for r in found),
                    problems=[p for r in found for p in r["problems"]])
    if not done.samples:
        raise NoSamples(f"no decodable sample in {len(urls)} shard(s) ({len(done.problems)} problem(s); the first: "
                        f"{done.problems[0] if done.problems else 'the shards hold no sample'})")
    return done.problems, done


def list_members(spec: list[str], problems: list[str]) -> Iterator[dict[str, Any]]:
    """{"shard", "name", "size", "sha256"} of every regular member of every shard (what `tarfile` reads), in tar
    order. A shard that cannot be read faithfully (`shards.tar.ShardError`, or any tar error) ends the listing
    after its members before the damage, its one-line reason added to `problems`; a shard that is not a regular
    file is refused before any is read (`NotRegular`)."""
    try:
        for url in regular_files(list_shards(spec)):
            with _open(url) as stream:
                for name, data, _, _ in read_members(stream, url):
                    yield {"shard": url, "name": name, "size": len(data),
                           "sha256": hashlib.sha256(data).hexdigest()}
    except tarfile.TarError as exc:
        problems.append(one_line(exc))
