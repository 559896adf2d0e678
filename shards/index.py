"""Where every sample of a shard set lies, and how to read one sample alone.

A `SampleIndex` lists every sample of a shard set as (shard, key, byte offset of its first tar header, length
through its last member's padding), in a canonical order: shards in `list_shards` order, samples by offset. Ingest
records offset and length per sample in the manifest (`ShardWriter.spans`), so building the index of AS-2M costs
one parquet read; shards the manifest does not cover (older sets, a remote set without its manifest) are scanned
once, sequentially, with the same tar layer and grouping the reader uses.

`read_raw_sample` then fetches exactly one sample's bytes with a ranged read (local: `os.pread`; `s3://`, `gs://`,
`hdfs://`: pyarrow's `read_at`; `http(s)://`: a `Range` request) and parses them with the same tar layer and
grouping, giving the raw sample `raw_samples` would (member bytes by lower-case suffix, `__key__`, `__url__`) for
`decode_sample`. That is what lets a trainer visit the samples of an epoch in any order, start mid-epoch without
reading what came before, and hold no more than the samples it is decoding.
"""

from __future__ import annotations

import logging
import os
import tarfile
import threading
import urllib.request
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterable

import numpy as np

from .reader import is_remote, open_stream
from .samples import read_groups, span_group
from .schema import BadSample, check_key
from .store import open_regular, regular_fd
from .tar import BLOCK

log = logging.getLogger(__name__)


@dataclass
class SampleIndex:
    """Every sample of a shard set; sample i is in `urls[shard[i]]` at bytes [offset[i], offset[i] + length[i])."""

    urls: list[str]
    shard: np.ndarray   # int32
    key: np.ndarray     # bytes (numpy "S"): compact even for millions of samples
    offset: np.ndarray  # int64
    length: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.key)

    def key_of(self, i: int) -> str:
        return self.key[i].decode()

    def url_of(self, i: int) -> str:
        return self.urls[self.shard[i]]


def sample_index(urls: list[str], rows: Iterable[dict[str, Any]] = ()) -> SampleIndex:
    """The index of `urls`, from manifest `rows` where they describe a shard faithfully, else by scanning it.

    A row names its shard by `url` (its full URI: `shards.manifest.manifest_rows` reads the manifest beside each
    shard's folder, so two folders' `shard-000000.tar` never share rows) or else by file name `shard` (matched only
    to a file name that is one shard of `urls`). The manifest is untrusted and checked per shard: every key in the key
    alphabet, integer offsets and lengths, spans that tile the shard (contiguous from byte 0, ending where its
    end-of-archive marker begins; the end is checked for local shards: a shard shorter than that keeps its spans,
    with a warning, and its cut samples fail one by one when read) and keys unique across the whole set. A
    shard whose rows disagree is re-indexed by a scan, with one warning; a key still found in two shards after
    that is kept in the first only, with one warning naming both."""
    names = Counter(_file_name(u) for u in urls)
    by_url: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status", "ok") != "ok":
            continue
        url = r.get("url")
        if url is None and names[r.get("shard")] == 1:
            url = next(u for u in urls if _file_name(u) == r["shard"])
        by_url.setdefault(url, []).append(r)
    per_shard: list[list[tuple[str, int, int]]] = []
    owner: dict[str, str] = {}
    for url in urls:
        spans, problem = _manifest_spans(url, by_url.get(url))
        if spans is not None and problem is None:
            problem = next((f"key {k!r} is also in {owner[k]}" for k, _, _ in spans if k in owner), None)
        if problem is not None:
            log.warning("%s: manifest.parquet %s; re-indexed by a scan", url, problem)
        if spans is None or problem is not None:
            spans = scan_spans(url)
        kept = []
        for span in spans:
            if span[0] in owner:
                log.warning("%s: sample %r left out of the index: the same key is in %s", url, span[0], owner[span[0]])
            else:
                owner[span[0]] = url
                kept.append(span)
        per_shard.append(kept)
    shard = np.concatenate([np.full(len(s), i, dtype=np.int32) for i, s in enumerate(per_shard)] or [[]])
    flat = [span for spans in per_shard for span in spans]
    return SampleIndex(list(urls), shard.astype(np.int32), np.asarray([k for k, _, _ in flat], dtype=np.bytes_),
                       np.asarray([o for _, o, _ in flat], dtype=np.int64),
                       np.asarray([n for _, _, n in flat], dtype=np.int64))


def _file_name(url: str) -> str:
    return PurePosixPath(url.split("?", 1)[0]).name


RECORD = 20 * BLOCK  # tar's record: writers pad the archive to a multiple of it after the end-of-archive marker


def _manifest_spans(url: str, rows: list[dict[str, Any]] | None) -> tuple[list | None, str | None]:
    """(spans by offset, None) from a shard's manifest rows, (None, None) when it has none with spans (an older
    set), or (None, what is wrong) when they disagree with the shard's shape."""
    if not rows or all(r.get("offset") is None and r.get("length") is None for r in rows):
        return None, None
    spans = []
    for r in rows:
        key, offset, length = r.get("key"), r.get("offset"), r.get("length")
        if not (isinstance(offset, int) and isinstance(length, int)) or isinstance(offset, bool) \
                or isinstance(length, bool):
            return None, f"gives sample {key!r} no integer offset and length"
        try:
            check_key(key)
        except BadSample as exc:
            return None, f"lists a bad key ({exc})"
        spans.append((key, offset, length))
    spans.sort(key=lambda s: s[1])
    end = 0
    for key, offset, length in spans:
        if offset != end or length < BLOCK:
            return None, f"puts sample {key!r} at bytes {offset}..{offset + length}, not right after byte {end}"
        end = offset + length
    if len({k for k, _, _ in spans}) != len(spans):
        return None, "lists a key twice"
    if not is_remote(url):
        tail = os.path.getsize(url) - end
        if tail >= 2 * BLOCK + RECORD:  # samples the manifest does not list
            return None, f"accounts for {end} bytes of the {end + tail} the shard holds"
        if tail < 2 * BLOCK and _ends_in_marker(url, end + tail):  # a whole shard: the manifest is wrong
            return None, f"accounts for {end} bytes of the {end + tail} the shard holds"
        if tail < 2 * BLOCK:  # the shard is cut short, not the manifest wrong: its cut samples fail one by one
            log.warning("%s: %d bytes, shorter than the %d its manifest.parquet accounts for (truncated?)", url,
                        end + tail, end + 2 * BLOCK)
    return spans, None


def scan_spans(url: str) -> list[tuple[str, int, int]]:
    """(key, offset, length) of every sample of one shard, from one sequential read of it (`shards.samples`: the
    grouping every reader uses). A sample the readers would not take is left out with a warning naming it; a
    truncated or corrupt shard keeps the samples before the damage (logged), as the streaming reader does."""
    spans: list[tuple[str, int, int]] = []
    with open_stream(url) as stream:
        try:
            for group in read_groups(stream, url):
                if group.problem is None:
                    spans.append((group.key, group.start, group.end - group.start))
                else:
                    log.warning("%s: sample %r left out of the index: %s", url, group.key, group.problem)
        except tarfile.TarError as exc:
            log.warning("indexing %s: kept the %d samples before the damage (%s)", url, len(spans), exc)
    return spans


def _ends_in_marker(url: str, size: int) -> bool:
    """Whether a local shard ends in tar's end-of-archive marker (two zero blocks), as a whole one does."""
    if size < 2 * BLOCK or size % BLOCK:
        return False
    with open_regular(url) as f:
        f.seek(size - 2 * BLOCK)
        return f.read(2 * BLOCK) == bytes(2 * BLOCK)


class SpanReader:
    """Ranged reads of shards, keeping up to `max_open` shards open (one reader per loader worker; remote reads
    may come from several threads: pyarrow's `read_at` is thread-safe, and an evicted remote file is only
    dropped, so a read still in flight on it completes)."""

    def __init__(self, max_open: int = 64):
        self.max_open = max_open
        self.handles: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def read(self, url: str, offset: int, length: int) -> bytes:
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
            with urllib.request.urlopen(request) as response:  # noqa: S310 (the scheme is checked above)
                if response.status != 206:
                    raise OSError(f"{url}: the server ignored the Range request (status {response.status})")
                data = response.read()
        else:
            handle = self._handle(url)
            data = handle.read_at(length, offset) if is_remote(url) else os.pread(handle, length, offset)
        if len(data) != length:
            raise OSError(f"{url}: {len(data)} of {length} bytes at offset {offset} (shard changed or truncated?)")
        return data

    def _handle(self, url: str) -> Any:
        with self.lock:
            if url in self.handles:
                self.handles.move_to_end(url)
                return self.handles[url]
            if is_remote(url):
                import pyarrow.fs as pafs

                fs, path = pafs.FileSystem.from_uri(url)
                handle = fs.open_input_file(path)
            else:
                handle = regular_fd(url)
            self.handles[url] = handle
            if len(self.handles) > self.max_open:
                self._drop(self.handles.popitem(last=False)[1])
            return handle

    @staticmethod
    def _drop(handle: Any) -> None:
        if isinstance(handle, int):  # local files are read from one thread
            os.close(handle)

    def close(self) -> None:
        with self.lock:
            while self.handles:
                self._drop(self.handles.popitem()[1])


def read_raw_sample(reader: SpanReader, index: SampleIndex, i: int) -> dict[str, Any]:
    """Sample `i` of the index as a raw sample (member bytes by lower-case suffix, `__key__`, `__url__`), read with
    one ranged read and parsed by the one span parser (`shards.samples.span_group`). Raises `BadSample` when the
    bytes there are not exactly that one sample (the shard changed since it was indexed), `OSError` /
    `tarfile.TarError` when they cannot be read."""
    url = index.url_of(i)
    return span_group(reader.read(url, int(index.offset[i]), int(index.length[i])), url, index.key_of(i)).raw()
