"""`cavmae-prep reprocess SRC --out DST --set ...`: re-derive a shard set from an existing one.

The new config is SRC's frozen `pipeline.yaml` with `--config` / `--set` laid over it. What changed in the
sample-defining sections (audio, video, clip) decides how each sample is remade, for the whole set:

- nothing (only shards.*, ray.*, ... changed): **repack**. Every member is copied unchanged (the samples'
  config digest is the same); only the grouping into shards follows the new `shards.*`.
- only fbank settings (`audio.num_mel_bins`, `frame_shift_ms`, `frame_length_ms`, `window_type`, or
  `keep_waveform` switched off) and SRC stored the waveform (`audio.keep_waveform: true`): **waveform**.
  The fbank is recomputed from each sample's `.flac` (the exact 16 kHz s16 waveform the decoder produced,
  so the result equals a fresh ingest byte for byte); frames are kept; the JSON gets the new digest. No
  source video is opened.
- anything else (video.*, clip.*, `audio.sample_rate` and `channel_policy`, which act before the stored
  16 kHz waveform, `keep_waveform` switched on, `allow_missing`, or fbank changes without stored waveforms):
  **source**. Each video is decoded again from the `source` path of the manifest. Sources that are gone
  become failed rows naming the file; when every one is gone, `SourcesGone` is raised before any work.

Work is planned and run exactly like ingest (plan file; work units of `ray.videos_per_task` videos of one
output shard, `preprocess.schedule`, each writing a part file, then one assembly task per shard writing the
shard and its fragment; manifest last; `ray.video_timeout_s` per video), so an interrupted reprocess is
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

import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import yaml

from shards.config import Config, ConfigError
from shards.errors import NotFound
from shards.manifest import merge_rows, read_manifest
from shards.media import decode_flac, open_flac, open_jpeg
from shards.frozen import FROZEN_CONFIG, PREP_SECTIONS, SAMPLE_SECTIONS, frozen_config
from shards.names import shard_index, shard_name
from shards.reader import split_name, tar_members
from shards.schema import (BadSample, check_key, decode_labels, decode_member, decode_meta, member_suffix,
                           one_line, sample_members)
from shards.store import Store, is_uri
from shards.writer import ShardWriter

from .cluster import check_address
from .ingest import (Summary, Watchdog, _check_frozen_config, _cut, _next_index, _pending_plan, _remove_temporaries,
                     _save_plan, assemble_shard, finish_run, local_copy, report)
from .outlock import output_lock
from .schedule import part_name, run_units, timed_out, timeout_name

FBANK_KEYS = ("audio.num_mel_bins", "audio.frame_shift_ms", "audio.frame_length_ms", "audio.window_type")
MODES = {"repack": "repack only (members copied unchanged)",
         "waveform": "from the stored waveforms (.flac), no video decoded",
         "source": "from the source videos"}
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
        try:
            with open(config) as f:
                user = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConfigError(f"{config}: cannot read config ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise ConfigError(f"{config}: top level must be a mapping of sections")
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


def reprocess(src: str | os.PathLike, out: str | os.PathLike, cfg: Config, *, workers: int | None = None,
              address: str | None = None, progress: bool = False) -> ReprocessSummary:
    """Re-derive SRC's samples with `cfg` (see `reprocess_config`) into the shard folder `out`; resumable."""
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
    gone: list[str] = []
    if mode == "source":
        gone = [v["source"] for v in videos if not _source_exists(v["source"])]
        if videos and len(gone) == len(videos):
            shown = ", ".join(gone[:3]) + (f" and {len(gone) - 3} more" if len(gone) > 3 else "")
            raise SourcesGone(f"reprocessing needs the source videos ({', '.join(changed)} changed) but "
                              f"all {len(gone)} are gone: {shown}")

    check_address(cfg, address)
    store.makedirs()
    with output_lock(store):
        _check_frozen_config(store, cfg)
        _remove_temporaries(store)
        # the plan before the rows: a fragment that a task of a killed run still writes in between then leaves
        # its group pending (rebuilt identically), where the other order would plan its inputs a second time
        groups = _pending_plan(store, job="reprocess")
        rows = read_manifest(store)
        holds = {r["video_id"] for r in rows}
        planned = {it["video_id"] for _, g in groups for it in g}
        gone_set = set(gone)
        todo = [v for v in videos if v["video_id"] not in holds and v["video_id"] not in planned
                and v["source"] not in gone_set]
        groups += _cut(todo, cfg.shards.samples_per_shard, first_index=_next_index(rows, groups, cfg.shards.pattern))

        carried = [{**r, "config_digest": digest} for r in src_rows
                   if r["status"] != "ok" and r["video_id"] not in holds]
        gone_rows = [_row(v, "failed", f"source video is gone: {v['source']}", digest) for v in videos
                     if v["source"] in gone_set and v["video_id"] not in holds]
        summary = ReprocessSummary(mode=mode, changed=tuple(changed),
                                   already=len(holds & {v["video_id"] for v in videos}),
                                   carried=len(carried), failed=len(gone_rows))
        summary.problems += [f"{r['source']}: {r['error']}" for r in gone_rows]
        store.write_text(FROZEN_CONFIG, cfg.to_yaml(*PREP_SECTIONS))
        if groups:
            _save_plan(store, groups, cfg, job="reprocess")
            new_rows = run_units(groups, store, cfg, reprocess_unit, assemble_shard, workers=workers,
                                 address=address, progress=progress, desc=f"reprocess ({mode})",
                                 extra=(src_store.uri(), mode))
            summary.videos = sum(len(g) for _, g in groups)
            summary.ok = sum(r["status"] == "ok" for r in new_rows)
            summary.failed += sum(r["status"] == "failed" for r in new_rows)
            summary.problems += [f"{r['source']}: {r['error']}" for r in new_rows if r["status"] == "failed"]
            rows = merge_rows(rows, new_rows)
        rows = merge_rows(rows, carried + gone_rows)
        finish_run(store, rows)
    summary.seconds = time.time() - start
    return summary


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


def _source_exists(source: str) -> bool:
    try:
        if is_uri(source):
            store, name = Store.split(source)
            return store.is_file(name)
        return os.path.isfile(source)
    except (OSError, ValueError):
        return False


def _row(item: dict[str, Any], status: str, error: str | None, digest: str, **extra: Any) -> dict[str, Any]:
    return {"video_id": item["video_id"], "key": None, "window": None, "source": item["source"],
            "status": status, "error": error, "shard": None, "labels": list(item["labels"]),
            "duration_s": None, "bytes": None, "config_digest": digest, **extra}


# ---- the tasks ---------------------------------------------------------------------------------------------
def reprocess_unit(index: int, start: int, items: list[dict[str, Any]], out: str, cfg_data: dict[str, Any],
                   src: str, mode: str, *, progress: Any = None) -> tuple[str | None, list[dict[str, Any]]]:
    """One work unit (`preprocess.schedule`): remake the samples of inputs `start, start+1, ...` of shard `index`
    from SRC's samples or from their sources into a part file (published only if some input gave samples);
    return its name and the inputs' rows. `ingest.assemble_shard` makes the shard of the parts."""
    from preprocess.decode import BadInput

    cfg = Config(cfg_data)
    store, src_store = Store.of(out), Store.of(src)
    digest = cfg.digest(*SAMPLE_SECTIONS)
    name = shard_name(cfg.shards.pattern, index)
    marked = timed_out(store, name)
    rows: list[dict[str, Any]] = []
    need_old = mode != "source" or any(it["labels"] for it in items)
    olds = _old_samples(src_store, items) if need_old else ((it["video_id"], None) for it in items)
    with ShardWriter(store, part_name(name, start)) as part, Watchdog(cfg.ray.video_timeout_s) as dog:
        for position, item in enumerate(items, start):
            try:
                vid, old = next(olds)
            except (tarfile.TarError, BadSample, OSError, ValueError) as exc:
                # SRC's shard is unreadable from here on (a malformed header, a missing sample): the rest of the
                # unit fails with the reason; what is already in the part stays
                why = one_line(f"source shard: {exc}")
                for rest, it in enumerate(items[position - start:], position):
                    rows.append(_row(it, "failed", why, digest))
                    report(progress, index, rest, rows[-1:])
                break
            assert vid == item["video_id"]
            item_rows = []
            try:
                if position in marked:
                    raise BadInput(f"timed out after {marked[position]} s")
                dog.watch(store, timeout_name(name, position))
                made = _remake(item, old, cfg, mode, digest)
            except BadInput as exc:
                item_rows.append(_row(item, "failed", one_line(exc), digest))
            except Exception as exc:  # one bad video must not take the unit down
                item_rows.append(_row(item, "failed", one_line(f"{type(exc).__name__}: {exc}"), digest))
            else:
                for key, meta, members in made:
                    part.add(members)
                    item_rows.append(_row(item, "ok", None, digest, key=key, window=meta.get("window"), shard=name,
                                          duration_s=meta.get("duration_s"), bytes=sum(len(d) for _, d in members)))
            finally:
                dog.watch(None, None)
            rows += item_rows
            report(progress, index, position, item_rows)
    return (part.name if part.members else None), rows


def _remake(item: dict[str, Any], old: list[tuple[str, list[tuple[str, bytes]]]] | None, cfg: Config, mode: str,
            digest: str) -> list[tuple[str, dict, list[tuple[str, bytes]]]]:
    """[(key, meta, members)] of one video."""
    if mode != "source":  # (the source mode reads only the labels of SRC's sample, and decodes them checked)
        for key, members in old:
            check_old_sample(key, members, cfg)
    if mode == "repack":
        return [(key, decode_meta(dict(_by_suffix(m))["json"]), m) for key, m in old]
    if mode == "waveform":
        return [_from_waveform(key, m, cfg, digest) for key, m in old]
    from preprocess.decode import BadInput
    from preprocess.sample import build_samples

    indices = None
    if old:
        labels_txt = dict(_by_suffix(old[0][1])).get("labels.txt")
        if labels_txt is not None:
            indices = decode_labels(labels_txt) or None
    with local_copy(item["source"]) as path:
        if not is_uri(item["source"]) and not os.path.exists(path):
            raise BadInput(f"source video is gone: {item['source']}")
        samples = build_samples(path, item["video_id"], item["source"], item["labels"], indices, cfg)
    return [(s.key, s.meta, s.members) for s in samples]


def _by_suffix(members: list[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    for name, data in members:
        yield member_suffix(name), data


def check_old_sample(key: str, members: list[tuple[str, bytes]], cfg: Config) -> None:
    """SRC's shards are untrusted: a sample is remade (or copied) only when its key is in the key alphabet, every
    member is in the schema and decodes (json object, labels, npy without pickle), its frames are JPEG no larger
    than the frame size allows (`shards.media.open_jpeg`; repack and waveform modes keep `video.*`, so it is SRC's)
    and its `.flac` is FLAC. Raises BadSample naming the member."""
    check_key(key)
    for name, data in members:
        suffix = member_suffix(name)
        if suffix.startswith("frame"):
            open_jpeg(data, cfg.video.image_size)
        elif suffix == "flac":
            open_flac(data).close()
        else:
            decode_member(suffix, data)


def _from_waveform(key: str, members: list[tuple[str, bytes]], cfg: Config,
                   digest: str) -> tuple[str, dict, list[tuple[str, bytes]]]:
    from preprocess.decode import BadInput
    from shards.fbank import fbank

    d = dict(_by_suffix(members))
    meta = decode_meta(d["json"])
    flac = d.get("flac")
    fb = None
    if meta.get("has_audio"):
        if flac is None:
            raise BadInput(f"sample {key} has no stored waveform (.flac); reprocess needs its source video")
        fb = fbank(decode_flac(flac, cfg.audio.sample_rate), cfg.audio)
    meta["audio_frames"] = 0 if fb is None else int(fb.shape[0])
    meta["config_digest"] = digest
    frames = sorted((int(s[5:-4]), data) for s, data in d.items() if s.startswith("frame"))
    labels = d.get("labels.txt")
    indices = (decode_labels(labels) or None) if labels else None
    keep = flac if cfg.audio.keep_waveform else None
    return key, meta, sample_members(key, meta, fb, [data for _, data in frames], keep, indices)


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
            got.append((key, _sample_members(src.uri(shard), key, buf[offset - buf_start:offset + length - buf_start])))
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


def _sample_members(url: str, key: str, data: bytes) -> list[tuple[str, bytes]]:
    """The members of sample `key` from the bytes of its span (schema-checked names, no extraction)."""
    members = []
    try:
        for name, member in tar_members(io.BytesIO(data)):
            split = split_name(name)
            if split is None:
                continue
            if split[0] != key:
                raise BadSample(f"{url}: member {name!r} found where manifest.parquet puts sample {key!r}")
            members.append((name, member))
    except tarfile.TarError as exc:
        raise tarfile.ReadError(f"{url}: sample {key!r}: {exc}") from None
    if not members:
        raise BadSample(f"{url}: no member of sample {key!r} where manifest.parquet puts it")
    return members


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
        raise FileNotFoundError(f"{src.uri()}: sample(s) {', '.join(missing)} of {order[pos]!r} are not in "
                                f"the shard(s) the manifest names")


def _iter_tar_samples(src: Store, shard: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(member name, bytes)]) in tar order, streaming one shard (schema-checked, no extraction)."""
    with src.open_input(shard) as f:
        cur, members = None, []
        try:
            for name, data in tar_members(f):
                split = split_name(name)
                if split is None:
                    continue
                key = split[0]
                if key != cur and members:
                    yield cur, members
                    members = []
                cur = key
                members.append((name, data))
        except tarfile.TarError as exc:
            raise tarfile.ReadError(f"{src.uri(shard)}: {exc}") from None
        if members:
            yield cur, members
