"""`cavmae-prep reprocess SRC --out DST --set ...`: re-derive a shard set from an existing one.

The new config is SRC's sample settings (the audio, video and clip sections and `shards.pattern` of its frozen
`pipeline.yaml`, `shards.frozen.FROZEN_KEYS`) with `--config` / `--set` laid over them; everything else, where and
how the job runs included (`ray.*`, the rest of `shards.*`), is the user's: a downloaded folder never chooses the
cluster to join. What changed in the sample-defining sections (audio, video, clip) decides how each sample is
remade, for the whole set:


- nothing (only shards.*, ray.*, ... changed): **repack**. Every member is copied unchanged (the samples'
  config digest is the same); only the grouping into shards follows the new `shards.*`.
- only fbank settings (`audio.num_mel_bins`, `frame_shift_ms`, `frame_length_ms`, `window_type`, or
  `keep_waveform` switched off) and SRC stored the waveform (`audio.keep_waveform: true`): **waveform**.
  The fbank is recomputed from each sample's `.flac` (the exact 16 kHz s16 waveform the decoder produced,
  so the result equals a fresh ingest byte for byte); frames are kept; the JSON gets the new digest. No
  source video is opened.
- anything else (video.*, clip.*, `audio.sample_rate` and `channel_policy`, which act before the stored
  16 kHz waveform, `keep_waveform` switched on, `allow_missing`, or fbank changes without stored waveforms):
  **source**. Each video is decoded again from the `source` path of the manifest. SRC's manifest is untrusted,
  so a source is read only inside the folders (or URI prefixes) the user names with `--sources`; without them
  the job is refused before any work, and each source outside them becomes a failed row naming it, never
  opened or even looked up. Sources that are gone become failed rows naming the file; when no source is left
  to read, the job is refused before any work.

In every mode a sample of SRC is decoded and checked by the readers' one loop (`shards.checked`) before it is used,
and every member the mode does not make anew (`REDERIVED`) is carried over byte for byte in the table's order
(`shards.schema.MEMBER_KINDS`), so a member kind added to the table survives every mode.

Work is planned and run exactly like ingest (`preprocess.jobs`: plan file; work units of `ray.videos_per_task`
videos of one output shard, each writing a part file, then one assembly task per shard writing the shard and
its fragment; manifest last; `ray.video_timeout_s` per video), so an interrupted reprocess is
resumed by running the same command again, DST's bytes do not depend on the task size or the worker count,
and DST is an ordinary shard folder that `ingest` can extend. Videos keep SRC's order (its shards in order), so
reprocessing a set made by one ingest run gives the same shards as ingesting anew with the new settings.
Failed and skipped rows of SRC are carried over to DST's manifest (`ingest --retry-failed` into DST
retries them).

A unit reads only its videos' samples of SRC: by ranged reads at the `offset`/`length` SRC's manifest records
(adjacent samples in one read), or, for older sets without them, by streaming SRC's shards up to its last
sample. A SRC shard that cannot be read fails the rest of the unit with the reason, not the job.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterable, Iterator

import pyarrow.fs as pafs

from cavmae.shards import schema
from cavmae.shards.checked import SHARD_ERRORS, checked
from cavmae.shards.config import Config, ConfigError, read_config_file
from cavmae.shards.errors import NotFound
from cavmae.shards.frozen import FROZEN_CONFIG, SAMPLE_SECTIONS, frozen_config
from cavmae.shards.manifest import read_manifest
from cavmae.shards.media import decode_flac
from cavmae.shards.names import shard_index
from cavmae.shards.samples import read_groups, span_group
from cavmae.shards.schema import BadSample, member_kind, one_line, order_members, record_members
from cavmae.shards.store import Store, is_uri
from cavmae.shards.validate import SampleSpec

from .ingest import Summary
from .inputs import InputError
from .jobs import ShardJob, run_shard_job
from .units import RestFails, local_copy, manifest_row

FBANK_KEYS = ("audio.num_mel_bins", "audio.frame_shift_ms", "audio.frame_length_ms", "audio.window_type")
MODES = {"repack": "repack only (members copied unchanged)",
         "waveform": "from the stored waveforms (.flac), no video decoded",
         "source": "from the source videos"}
FLAC_SLACK_S = 1.0  # how much longer than its clip a stored waveform may declare itself
READ_BYTES = 8 << 20  # the most one ranged read of SRC gathers (adjacent samples of a unit's videos)


class SourcesGone(NotFound):
    """Reprocessing needs the source videos and none of them is there (the message is one line)."""


@dataclass
class ReprocessSummary(Summary):
    mode: str = ""
    changed: tuple[str, ...] = ()
    carried: int = 0     # failed/skipped rows of SRC carried over unchanged

    def how(self) -> str:
        what = ", ".join(self.changed) if self.changed else "no sample setting"
        return f"reprocess {MODES.get(self.mode, self.mode)} (changed: {what})"


def reprocess_config(src: str | os.PathLike, config: str | None = None, sets: list[str] = ()) -> Config:
    """SRC's frozen config with the user file `config` (any subset of keys) and then `sets` laid over it."""
    store = Store.of(src)
    if not store.is_file(FROZEN_CONFIG):
        raise NotFound(f"{store.uri()}: not a shard folder (no {FROZEN_CONFIG})")
    base = frozen_config(store)
    flat: list[str] = []
    if config is not None:
        user = read_config_file(config)
        flat = [f"{k}={json.dumps(v)}" for k, v in _flatten(user) if not k.startswith("presets.")]
    return base.with_overrides([*flat, *sets])


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def changed_settings(old: Config, new: Config, sections: tuple[str, ...] = SAMPLE_SECTIONS) -> list[str]:
    out = []
    for sec in sections:
        a, b = old.to_dict().get(sec, {}), new.to_dict().get(sec, {})
        out += [f"{sec}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def choose_mode(old: Config, new: Config) -> tuple[str, list[str]]:
    """('repack' | 'waveform' | 'source', the changed sample settings) — see the module docstring."""
    changed = changed_settings(old, new)
    if not changed:
        return "repack", changed
    audio_only = all(c in FBANK_KEYS or (c == "audio.keep_waveform" and not new.audio.keep_waveform)
                     for c in changed)
    if audio_only and old.audio.keep_waveform:
        return "waveform", changed
    return "source", changed


def reprocess(src: str | os.PathLike, out: str | os.PathLike, cfg: Config, *, sources: Iterable[str] = (),
              workers: int | None = None, address: str | None = None, progress: bool = False) -> ReprocessSummary:
    """Re-derive SRC's samples with `cfg` (see `reprocess_config`) into the shard folder `out`; resumable. Source
    mode reads source videos only inside the folders or URI prefixes `sources` (InputError when none given)."""
    start = time.time()
    src_store, store = Store.of(src), Store.of(out)
    if src_store.uri().rstrip("/") == store.uri().rstrip("/"):
        raise ConfigError(f"{store.uri()}: --out must differ from the source shard folder")
    if not src_store.is_file(FROZEN_CONFIG):
        raise NotFound(f"{src_store.uri()}: not a shard folder (no {FROZEN_CONFIG})")
    old = frozen_config(src_store)
    mode, changed = choose_mode(old, cfg)
    src_rows = read_manifest(src_store)
    if not src_rows:
        raise NotFound(f"{src_store.uri()}: no manifest.parquet (or it is empty)")
    digest = cfg.digest(*SAMPLE_SECTIONS)

    videos = _videos_in_source_order(src_rows, old.shards.pattern, src_store.uri())
    roots = tuple(sources)
    refused: list[str] = []
    gone: list[str] = []
    if mode == "source":
        need = f"reprocessing needs the source videos ({', '.join(changed)} changed)"
        if not roots:
            raise InputError(f"{need}: name the folder(s) or URI prefix(es) they may be read from with "
                             f"--sources DIR|URI (repeatable)")
        refused = [v["source"] for v in videos if not source_allowed(v["source"], roots)]
        if videos and len(refused) == len(videos):
            raise InputError(f"{need} but none of the {len(refused)} lies inside --sources "
                             f"{' '.join(roots)}: {_some(refused)}")
        outside = set(refused)
        gone = [v["source"] for v in videos if v["source"] not in outside and not _source_exists(v["source"])]
        if videos and len(gone) + len(refused) == len(videos):
            raise SourcesGone(f"{need} but all {len(gone)} inside --sources are gone: {_some(gone)}")

    unread = {**{s: f"source video is gone: {s}" for s in gone},
              **{s: f"source is outside --sources: {s}" for s in refused}}
    summary = ReprocessSummary(mode=mode, changed=tuple(changed))

    def pick(rows: list[dict[str, Any]], planned: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        holds = {r["video_id"] for r in rows}
        todo = [v for v in videos if v["video_id"] not in holds and v["video_id"] not in planned
                and v["source"] not in unread]
        carried = [{**r, "config_digest": digest} for r in src_rows
                   if r["status"] != "ok" and r["video_id"] not in holds]
        gone_rows = [manifest_row(*_who(v), "failed", unread[v["source"]], digest)
                     for v in videos if v["source"] in unread and v["video_id"] not in holds]
        summary.already = len(holds & {v["video_id"] for v in videos})
        summary.carried, summary.failed = len(carried), len(gone_rows)
        summary.problems += [f"failed: {r['source']}: {r['error']}" for r in gone_rows]
        return todo, carried + gone_rows

    run = run_shard_job(reprocess_job(src_store.uri(), mode, roots), store, cfg, pick, workers=workers, address=address,
                        progress=progress, desc=f"reprocess ({mode})")
    summary.videos = run.items
    summary.ok = sum(r["status"] == "ok" for r in run.new)
    summary.failed += sum(r["status"] == "failed" for r in run.new)
    summary.problems += [f"failed: {r['source']}: {r['error']}" for r in run.new if r["status"] == "failed"]
    summary.seconds = time.time() - start
    return summary


def reprocess_job(src: str, mode: str, roots: tuple[str, ...] = ()) -> ShardJob:
    """The job that remakes SRC's videos in `mode`, reading sources only inside `roots` (one per run: SRC, the
    mode and the roots travel with it to the tasks)."""
    return ShardJob("reprocess", samples=partial(_remake_item, mode=mode, roots=roots), who=_who,
                    ahead=partial(_read_ahead, src=src, mode=mode), cost=partial(_expected_cost, mode=mode))


def _expected_cost(item: dict[str, Any], *, mode: str) -> float:
    """What a video is expected to cost: the size of its source (source mode, local sources), else the bytes of
    its samples in SRC (as many windows, as much to re-read); 0 when unknown."""
    if mode == "source":
        try:
            return 0.0 if is_uri(item["source"]) else float(os.path.getsize(item["source"]))
        except OSError:
            return 0.0
    return float(sum(n for _, _, n in item["spans"])) if item.get("spans") else float(len(item["keys"]))


def _videos_in_source_order(rows: list[dict[str, Any]], pattern: str, src: str) -> list[dict[str, Any]]:
    """The ok videos of SRC as plan items, in SRC's order (its shards in order, then video id, window), with each
    sample's [shard, offset, length] where the manifest has them (for ranged reads).

    SRC's manifest is untrusted: a shard it names must be a plain file name inside SRC, a sample key appears
    once. Shards named by SRC's `shards.pattern` sort by index, any others (an earlier pattern) after them by
    name."""
    def position(name: str) -> tuple[int, int, str]:
        try:
            return 0, shard_index(pattern, name), name
        except ValueError:
            return 1, 0, name

    by_vid: dict[str, list[dict[str, Any]]] = {}
    seen: set[str] = set()
    for r in rows:
        if r["status"] == "ok":
            name = r["shard"]
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise ConfigError(f"{src}: manifest.parquet names shard {name!r} for {r['video_id']!r}, "
                                  f"which is not a file name inside the folder")
            if r["key"] in seen:  # (each is read at its own span: a repeated key would be copied twice)
                raise ConfigError(f"{src}: manifest.parquet lists sample {r['key']!r} more than once")
            seen.add(r["key"])
            by_vid.setdefault(r["video_id"], []).append(r)
    items = []
    for vid, rs in by_vid.items():
        rs.sort(key=lambda r: (position(r["shard"]), r["window"] if r["window"] is not None else -1))
        shards = list(dict.fromkeys(r["shard"] for r in rs))
        spans = [[r["shard"], r.get("offset"), r.get("length")] for r in rs]
        ranged = all(_is_int(o) and _is_int(n) for _, o, n in spans)  # older sets: no spans, streamed
        items.append({"video_id": vid, "source": rs[0]["source"], "labels": list(rs[0]["labels"] or []),
                      "keys": [r["key"] for r in rs], "shards": shards, "spans": spans if ranged else None})
    items.sort(key=lambda it: (position(it["shards"][0]), it["video_id"]))
    return items


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def source_allowed(source: Any, roots: tuple[str, ...]) -> bool:
    """Whether `source` (a path or URI from SRC's manifest: untrusted) lies inside one of the user's `roots`, judged
    without opening or listing anything remote. A local path must be absolute and, links resolved, inside a root
    folder (a link inside pointing out is outside); so must a `file://` URI under a `file://` root (a local path
    spelled as a URI: its links are resolved the same way, before anything is opened). Any other URI must extend a
    root URI by plain path segments (no `.`, `..` or empty ones) and carry the root's query exactly (the query can
    name the endpoint to contact): object stores (s3, gs, ...) have no links, a name is the object it names, and
    HDFS resolves none unless its cluster enables them (off by default since Hadoop 2)."""
    if not isinstance(source, str) or not source:
        return False
    for root in roots:
        if is_uri(root) != is_uri(source):
            continue
        if _file_path(root) is not None and _file_path(source) is not None:
            if _inside(_file_path(source), _file_path(root)):
                return True
        elif is_uri(root):
            base, _, query = source.partition("?")
            root_base, _, root_query = root.partition("?")
            prefix = root_base.rstrip("/") + "/"
            rest = base[len(prefix):] if base.startswith(prefix) else ""
            if query == root_query and rest and all(seg not in ("", ".", "..") for seg in rest.split("/")):
                return True
        elif _inside(source, root):
            return True
    return False


def _file_path(location: str) -> str | None:
    """The local path a `file://` URI names, decoded as the store decodes it (`%2E%2E` is `..`); "" when it names
    none; None for anything else."""
    if location.partition("://")[0].lower() != "file":
        return None
    try:
        return pafs.FileSystem.from_uri(location)[1]
    except (ValueError, OSError, TypeError):
        return ""


def _inside(path: str, root: str) -> bool:
    """Whether the absolute `path`, links resolved, lies strictly inside the folder `root` (links resolved)."""
    if not os.path.isabs(path):
        return False
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real != top and os.path.commonpath([real, top]) == top


def _some(paths: list[Any]) -> str:
    return ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _source_exists(source: str) -> bool:
    try:
        if is_uri(source):
            store, name = Store.split(source)
            return store.is_file(name)
        return os.path.isfile(source)
    except (OSError, ValueError):
        return False


def _who(item: dict[str, Any]) -> tuple[str, str, list[str]]:
    return item["video_id"], item["source"], list(item["labels"])


# ---- the tasks ---------------------------------------------------------------------------------------------
def _read_ahead(items: list[dict[str, Any]], cfg: Config, *, src: str, mode: str) -> Iterator[tuple[str, Any]]:
    """(video_id, SRC's samples of it, or None when not needed) per item of a unit, read in order. SRC's shard
    unreadable from here on (a malformed header, a missing sample): the rest of the unit fails with the reason;
    what is already in the part stays."""
    olds = _old_samples(Store.of(src), items)  # (source mode too: labels and a listed segment come from them)
    try:
        yield from olds
    except SHARD_ERRORS as exc:
        raise RestFails(one_line(f"source shard: {exc}")) from None


def _remake_item(item: dict[str, Any], ahead: tuple[str, Any], cfg: Config, *,
                 mode: str, roots: tuple[str, ...]) -> list[tuple[str, dict, list[tuple[str, bytes]]]]:
    vid, old = ahead
    assert vid == item["video_id"]
    return _remake(item, old, cfg, mode, cfg.digest(*SAMPLE_SECTIONS), roots)


# the sample fields (`shards.schema.MEMBER_KINDS`) each mode makes anew; every other member is carried over as it is
REDERIVED = {"repack": (), "waveform": ("meta", "fbank", "flac"),
             "source": ("meta", "fbank", "frames", "flac", "labels")}  # + the kinds ingest produces (`rederived`)


def rederived(mode: str) -> set[str]:
    """The fields `mode` makes anew: its own, and in source mode every kind with an ingest producer."""
    made = set(REDERIVED[mode])
    if mode == "source":
        made.update(k.field for k in schema.MEMBER_KINDS if k.produce is not None)
    return made


def _remake(item: dict[str, Any], old: list[tuple[str, dict[str, Any]]] | None, cfg: Config, mode: str,
            digest: str, roots: tuple[str, ...]) -> list[tuple[str, dict, list[tuple[str, bytes]]]]:
    """[(key, meta, members)] of one video. SRC's samples (raw, as `shards.samples` groups them) are untrusted:
    each goes through the readers' one decoder and validator (`shards.checked`) first, in every mode; the frames
    and FLAC are held to SRC's settings where the mode keeps them. Every member the mode does not make anew is
    carried over byte for byte (`REDERIVED`), so a kind added to the table survives every mode."""
    spec = SampleSpec() if mode == "source" else SampleSpec(
        num_frames=int(cfg.video.num_frames), image_size=int(cfg.video.image_size), flac=True)
    olds = [(key, raw, checked(raw, spec.check)) for key, raw in old or ()]
    made = rederived(mode)
    if mode == "repack":
        return [(key, sample["meta"], _members(raw)) for key, raw, sample in olds]
    if mode == "waveform":
        return [_from_waveform(key, raw, sample, cfg, digest, made) for key, raw, sample in olds]
    from cavmae.preprocess.decode import BadInput, Segment
    from cavmae.preprocess.sample import build_samples

    indices, segment, dataset = None, None, None
    if olds:
        indices = olds[0][2]["labels"] or None
        segment, dataset = listed_segment(olds[0][2]["meta"])
    if not source_allowed(item["source"], roots):  # (a plan saved by an earlier run with other --sources)
        raise BadInput(f"source is outside --sources: {item['source']}")
    with local_copy(item["source"]) as path:
        if not is_uri(item["source"]) and not os.path.exists(path):
            raise BadInput(f"source video is gone: {item['source']}")
        samples = build_samples(path, item["video_id"], item["source"], item["labels"], indices, cfg,
                                segment=segment and Segment(*segment), dataset=dataset)
    by_key = {key: raw for key, raw, _ in olds}
    first = olds[0][1] if olds else {}  # a window SRC did not have takes what its video's first sample carries
    return [(s.key, s.meta, order_members(s.members + _members(by_key.get(s.key, first), s.key, made)))
            for s in samples]


def _members(raw: dict[str, Any], key: str | None = None, leave: set[str] = frozenset()) -> list[tuple[str, bytes]]:
    """A raw sample's members as (name, bytes) in tar order, named for `key` (default its own), less the kinds
    whose field is in `leave`."""
    key = key or raw["__key__"]
    return [(f"{key}.{suffix}", data) for suffix, data in raw.items()
            if not suffix.startswith("__") and member_kind(suffix).field not in leave]


def listed_segment(meta: dict[str, Any]) -> tuple[tuple[float, float] | None, dict | None]:
    """The segment a dataset list gave the sample's video (json `segment.listed_s`) and its `dataset` entry, so a
    sample remade from its source covers the same segment; SRC is untrusted, so anything malformed is a BadSample."""
    segment, dataset = meta.get("segment"), meta.get("dataset")
    listed = segment.get("listed_s") if isinstance(segment, dict) else None
    if segment is not None and not (isinstance(listed, list) and len(listed) == 2
                                    and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in listed)
                                    and 0 <= listed[0] < listed[1]):
        raise BadSample(f"json 'segment' is not {{listed_s: [start, end]}} ({str(segment)[:60]})")
    if dataset is not None and not isinstance(dataset, dict):
        raise BadSample("json 'dataset' is not an object")
    return (None if listed is None else (float(listed[0]), float(listed[1]))), dataset


def _from_waveform(key: str, raw: dict[str, Any], sample: dict[str, Any], cfg: Config, digest: str,
                   made: set[str]) -> tuple[str, dict, list[tuple[str, bytes]]]:
    from cavmae.preprocess.decode import BadInput
    from cavmae.shards.fbank import fbank

    meta, flac = sample["meta"], sample["flac"]
    fb = None
    if meta.get("has_audio"):
        if flac is None:
            raise BadInput(f"sample {key} has no stored waveform (.flac); reprocess needs its source video")
        # (waveform mode keeps clip.*: a stored waveform is at most one clip long)
        fb = fbank(decode_flac(flac, cfg.audio.sample_rate, cfg.clip.length_s + FLAC_SLACK_S), cfg.audio)
    meta["audio_frames"] = 0 if fb is None else int(fb.shape[0])
    meta["config_digest"] = digest
    new = record_members(key, {"meta": meta, "fbank": fb, "flac": flac if cfg.audio.keep_waveform else None})
    return key, meta, order_members(new + _members(raw, key, made))


def _old_samples(src: Store, items: list[dict[str, Any]]) -> Iterator[tuple[str, list]]:
    """(video_id, [(key, members)]) for each item in order: by ranged reads of exactly the items' samples where
    SRC's manifest gave every one's span, else by streaming SRC's shards."""
    if all(it.get("spans") for it in items):
        return _ranged_samples(src, items)
    return _streamed_samples(src, items)


def _ranged_samples(src: Store, items: list[dict[str, Any]]) -> Iterator[tuple[str, list]]:
    """`_old_samples` by ranged reads at the manifest's (offset, length): a unit of a few videos reads those
    videos' samples, not the shards they lie in. Adjacent samples (consecutive videos keep SRC's order) come in
    one read of up to READ_BYTES, so memory holds at most one read and one video, as streaming does. The spans
    are untrusted: each must lie inside its shard and hold exactly the members of its key."""
    todo = [(it["video_id"], key, *span) for it in items for key, span in zip(it["keys"], it["spans"])]
    files: dict[str, tuple[Any, int]] = {}
    buf_shard, buf_start, buf = None, 0, b""
    got: list[tuple[str, list[tuple[str, bytes]]]] = []
    try:
        for n, (vid, key, shard, offset, length) in enumerate(todo):
            if not (shard == buf_shard and buf_start <= offset and offset + length <= buf_start + len(buf)):
                end = offset + length
                for _, _, next_shard, next_offset, next_length in todo[n + 1:]:
                    if next_shard != shard or next_offset != end or end + next_length - offset > READ_BYTES:
                        break
                    end += next_length
                buf_shard, buf_start, buf = shard, offset, _read_span(src, files, shard, offset, end - offset)
            data = buf[offset - buf_start:offset + length - buf_start]
            got.append((key, span_group(data, src.uri(shard), key, "manifest.parquet puts").raw()))
            if n + 1 == len(todo) or todo[n + 1][0] != vid:
                yield vid, got
                got = []
    finally:
        for f, _ in files.values():
            f.close()


def _read_span(src: Store, files: dict[str, tuple[Any, int]], shard: str, offset: int, length: int) -> bytes:
    if shard not in files:
        files[shard] = (src.open_input(shard), src.size(shard))
    f, size = files[shard]
    if not (0 <= offset and 0 < length and offset + length <= size):
        raise ValueError(f"{src.uri(shard)}: manifest.parquet puts a sample at bytes {offset}..{offset + length}, "
                         f"outside the shard's {size}")
    f.seek(offset)
    data = f.read(length)
    if len(data) != length:
        raise OSError(f"{src.uri(shard)}: {len(data)} of {length} bytes at offset {offset} (shard truncated?)")
    return data


def _streamed_samples(src: Store, items: list[dict[str, Any]]) -> Iterator[tuple[str, list]]:
    """`_old_samples` streaming SRC's shards from their start (one video buffered at a time when SRC's order
    is kept, as it is by the plan): for sets whose manifest has no sample spans."""
    want = {k: it["video_id"] for it in items for k in it["keys"]}
    keys_of = {it["video_id"]: it["keys"] for it in items}
    got: dict[str, dict[str, list]] = {}
    order = [it["video_id"] for it in items]
    pos = 0
    for shard in dict.fromkeys(s for it in items for s in it["shards"]):
        for key, members in _iter_tar_samples(src, shard):
            vid = want.get(key)
            if vid is None:
                continue
            got.setdefault(vid, {})[key] = members
            while pos < len(order) and len(got.get(order[pos], {})) == len(keys_of[order[pos]]):
                vid0 = order[pos]
                have = got.pop(vid0)
                yield vid0, [(k, have[k]) for k in keys_of[vid0]]
                pos += 1
    if pos < len(order):
        missing = [k for k in keys_of[order[pos]] if k not in got.get(order[pos], {})]
        raise NotFound(f"{src.uri()}: sample(s) {', '.join(missing)} of {order[pos]!r} are not in "
                       f"the shard(s) the manifest names")


def _iter_tar_samples(src: Store, shard: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, raw sample) in tar order, streaming one shard, grouped as every reader groups them
    (`shards.samples`), no extraction; a sample the readers would not take carries its `__problem__`."""
    with src.open_input(shard) as f:
        for group in read_groups(f, src.uri(shard)):
            yield group.key, group.raw()
