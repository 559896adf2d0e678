"""`manifest.parquet`: one row per input (and per window), the index that makes resume, reprocessing,
class-balance weights and audits possible without opening a tar file.

Rows are plain dicts with the columns of `SCHEMA`. Each shard task also leaves a small per-shard fragment
(`_parts/<shard>.parquet`) written atomically after its shard, so a driver killed mid-run loses nothing:
the next run folds the fragments into the manifest before planning new work.

Every function takes a local path or a storage URI (`s3://bucket/shards`, see `shards.store`), or a `Store`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError
from .store import Store, is_temp_name

SCHEMA = pa.schema([
    ("video_id", pa.string()),
    ("key", pa.string()),
    ("window", pa.int32()),
    ("source", pa.string()),
    ("status", pa.string()),          # ok | failed | skipped
    ("error", pa.string()),           # one line, for failed and skipped
    ("shard", pa.string()),           # shard file name, for ok rows
    ("labels", pa.list_(pa.string())),
    ("duration_s", pa.float64()),
    ("bytes", pa.int64()),            # bytes of the sample's members in its shard
    ("offset", pa.int64()),           # byte offset of the sample's first tar header in its shard
    ("length", pa.int64()),           # bytes from there through its last member's padding (one ranged read)
    ("config_digest", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
REQUIRED_COLUMNS = ("video_id", "key", "status", "shard")  # older manifests lack offset/length, window
MANIFEST = "manifest.parquet"
PARTS = "_parts"


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]], store: Store | None = None) -> None:
    """Write rows as parquet atomically (temporary name then rename, or one upload), sorted for stable output.

    `path` is a local path or URI of the file, or a name inside `store` when one is given."""
    store, name = (store, str(path)) if store is not None else Store.split(path)
    ordered = sorted(rows, key=lambda r: (r["video_id"], r.get("window") or 0, r.get("key") or ""))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in ordered], schema=SCHEMA), buf)
    store.write_bytes(name, buf.getvalue())


class ManifestError(UserError):
    """A manifest.parquet that is not one: not parquet, a required column missing, a column of the wrong type."""


def read_rows(path: str | Path, store: Store | None = None) -> list[dict[str, Any]]:
    """The rows of a manifest (or fragment) file; [] when there is none. A manifest is untrusted (it comes with a
    downloaded shard folder): ManifestError, one line, for a file that is not parquet, lacks a required column or
    holds a column of another type than `SCHEMA`'s (string offsets, say). Its values are checked by its users
    (`shards.index.sample_index`)."""
    store, name = (store, str(path)) if store is not None else Store.split(path)
    if not store.is_file(name):
        return []
    # use_threads=False: a threaded read from memory leaves pyarrow's CPU pool in a state that aborts the process
    # at exit ("terminate called without an active exception") in about half of the runs (pyarrow 25); a
    # manifest is small enough to decode on one thread. pre_buffer=False: the bytes are in memory already, and
    # pre-buffering would start two threads of pyarrow's I/O pool for them (see also shards.process)
    try:
        table = pq.read_table(io.BytesIO(store.read_bytes(name)), use_threads=False, pre_buffer=False)
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{store.uri(name)}: not a readable parquet file ({' '.join(str(exc).split())})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{store.uri(name)}: not a cavmae manifest (no column {', '.join(missing)})")
    for column in SCHEMA:
        if column.name in table.column_names and not _same_kind(table.schema.field(column.name).type, column.type):
            raise ManifestError(f"{store.uri(name)}: column {column.name!r} is {table.schema.field(column.name).type}, "
                                f"not {column.type}")
    return table.to_pylist()


def _same_kind(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether values of type `have` read as `want`'s kind (any width of int for int64; all-null columns pass)."""
    if pa.types.is_null(have):
        return True
    if pa.types.is_integer(want):
        return pa.types.is_integer(have)
    if pa.types.is_floating(want):
        return pa.types.is_floating(have) or pa.types.is_integer(have)
    if pa.types.is_string(want):
        return pa.types.is_string(have) or pa.types.is_large_string(have)
    if pa.types.is_list(want):
        return (pa.types.is_list(have) or pa.types.is_large_list(have)) and _same_kind(have.value_type,
                                                                                      want.value_type)
    return have == want


def shard_manifests(urls: list[str], path: str | None = None) -> dict[str, list[dict[str, Any]] | None]:
    """{shard URL: its `ok` manifest rows, each with `url`} from the manifest beside each shard's folder (local or
    in object storage; none for http(s) folders), or from the one at `path` for the shards of every folder; None
    for a shard whose folder has no manifest. Rows name their shard by file name, so a shard is matched to the
    manifest of its own folder: two folders' `shard-000000.tar` never share rows."""
    folders: dict[str, dict[str, str]] = {}
    for url in urls:
        folder, _, name = url.split("?", 1)[0].rpartition("/")
        folders.setdefault(folder or ".", {})[name] = url
    out: dict[str, list[dict[str, Any]] | None] = {}
    read: dict[str, list[dict[str, Any]] | None] = {}
    for folder, by_name in folders.items():
        where = path or f"{folder}/{MANIFEST}"
        if where not in read:
            store, name = Store.split(where)
            read[where] = None if where.startswith(("http://", "https://")) or not store.is_file(name) \
                else read_rows(name, store)
        for shard, url in by_name.items():
            rows = read[where]
            out[url] = None if rows is None else [dict(r, url=url) for r in rows
                                                  if r["status"] == "ok" and r["shard"] == shard]
    return out


def manifest_rows(urls: list[str], path: str | None = None) -> list[dict[str, Any]]:
    """The `ok` manifest rows of the shards `urls`, each with `url` (`shard_manifests`). Used for the sample index
    (offsets; `shards.index.sample_index` checks them), the label check and class-balance weights without
    opening tars."""
    return [r for rows in shard_manifests(urls, path).values() for r in rows or ()]


def read_manifest(out: "str | Path | Store") -> list[dict[str, Any]]:
    """The manifest rows of an output folder, with any leftover fragments of an interrupted run folded in."""
    store = Store.of(out)
    return merge_rows(read_rows(MANIFEST, store), read_fragments(store))


def read_fragments(out: "str | Path | Store") -> list[dict[str, Any]]:
    store = Store.of(out)
    names = [n for n in store.list(PARTS) if n.endswith(".parquet") and not is_temp_name(n)]
    return [row for n in names for row in read_rows(n, store)]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `new` replace every row of `old` with the same video id (a retried input, all its windows)."""
    replaced = {r["video_id"] for r in new}
    return [r for r in old if r["video_id"] not in replaced] + new


def fragment_name(shard_name: str) -> str:
    """Name of a shard's manifest fragment inside the output folder."""
    return f"{PARTS}/{Path(shard_name).stem}.parquet"
