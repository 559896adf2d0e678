"""Atomic, deterministic tar shard writer.

A shard is written to a hidden temporary name beside its final name and renamed into place only when
complete, so a reader never sees a half-written shard and a retried task simply rewrites the same file.
Members are written by the one tar layer (`shards.tar.TarWriter`: pax, every header field that could vary between
runs fixed), so the same samples in the same order give byte-identical shards, and keys of any allowed length fit.

`ShardWriter` streams samples into a shard as they are made (a task holds one input's samples, never a
whole shard) and publishes it through `shards.store` (local or remote: temp + rename, or one upload). It also
records where each sample lies in the tar (`spans`: byte offset of its first member header, length through its
last member's padding), which the manifest keeps so a trainer can read any sample with one ranged read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .schema import member_suffix
from .store import Store, Upload
from .tar import TarWriter


def write_shard(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int | None:
    """Write `members` as one local shard at `path` atomically; its size in bytes (None when empty)."""
    path = Path(path)
    with ShardWriter(path.parent, path.name) as shard:
        shard.add(members)
    return path.stat().st_size if path.exists() else None


class ShardWriter:
    """Add samples' members one input at a time; `close()` publishes the shard (if anything was added).

    Usable as a context manager: an exception discards the partial shard (nothing is published)."""

    def __init__(self, location: "str | os.PathLike | Store", name: str):
        self.store = Store.of(location)
        self.name = name
        self._upload: Upload | None = None
        self._tar: TarWriter | None = None
        self.members = 0
        self.spans: dict[str, tuple[int, int]] = {}  # sample key -> (offset, length) in the tar

    def add(self, members: Iterable[tuple[str, bytes]]) -> None:
        for name, data in members:
            member_suffix(name)
            if self._tar is None:
                self._upload = self.store.publish(self.name)
                self._tar = TarWriter(self._upload.file)
            key, start = name.split(".", 1)[0], self._tar.offset
            self._tar.add(name, data)
            first, _ = self.spans.get(key, (start, 0))
            self.spans[key] = (first, self._tar.offset - first)
            self.members += 1

    def locate(self, rows: list[dict]) -> list[dict]:
        """`rows` with the `offset` and `length` manifest columns filled in for the samples this shard holds."""
        return [dict(r, offset=self.spans[r["key"]][0], length=self.spans[r["key"]][1])
                if r.get("key") in self.spans else r for r in rows]

    def close(self) -> int | None:
        """Publish the shard; its size in bytes, or None when no member was added (nothing is written)."""
        if self._tar is None:
            return None
        self._tar.close()
        self._tar = None
        return self._upload.commit()

    def discard(self) -> None:
        if self._upload is not None:
            self._upload.discard()
        self._tar = self._upload = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()
