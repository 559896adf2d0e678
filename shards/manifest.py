"""`manifest.parquet`: one row per input (and per window), the index that makes resume, reprocessing,
class-balance weights and audits possible without opening a tar file.

Rows are plain dicts with the columns of `SCHEMA`. Each shard task also leaves a small per-shard fragment
(`_parts/<shard>.parquet`) written atomically after its shard, so a driver killed mid-run loses nothing:
the next run folds the fragments into the manifest before planning new work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

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
    ("config_digest", pa.string()),
])
COLUMNS = tuple(SCHEMA.names)
MANIFEST = "manifest.parquet"
PARTS = "_parts"


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as parquet atomically (temporary name, then rename), sorted for stable output."""
    path = Path(path)
    ordered = sorted(rows, key=lambda r: (r["video_id"], r.get("window") or 0, r.get("key") or ""))
    table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in ordered], schema=SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return pq.read_table(path).to_pylist()


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """The manifest rows of an output folder, with any leftover fragments of an interrupted run folded in."""
    rows = merge_rows(read_rows(Path(out) / MANIFEST), read_fragments(out))
    return rows


def read_fragments(out: str | Path) -> list[dict[str, Any]]:
    parts = Path(out) / PARTS
    if not parts.is_dir():
        return []
    return [row for p in sorted(parts.glob("*.parquet")) for row in read_rows(p)]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `new` replace every row of `old` with the same video id (a retried input, all its windows)."""
    replaced = {r["video_id"] for r in new}
    return [r for r in old if r["video_id"] not in replaced] + new


def fragment_path(out: str | Path, shard_name: str) -> Path:
    return Path(out) / PARTS / f"{Path(shard_name).stem}.parquet"
