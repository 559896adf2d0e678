"""Atomic, deterministic tar shard writer.

A shard is written to a hidden temporary name beside its final name and renamed into place only when
complete, so a reader never sees a half-written shard and a retried task simply rewrites the same file.
Every tar header field that could vary between runs (mtime, uid/gid, owner names, mode) is fixed, so the
same samples in the same order give byte-identical shards.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Iterable

from .schema import member_suffix


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(fileobj, members: Iterable[tuple[str, bytes]]) -> None:
    """Write `members` as a tar stream to an open binary file, refusing names outside the schema."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            member_suffix(name)
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def write_shard(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write `members` as a tar at `path` atomically (temp file, fsync, rename); return its size in bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_tar(f, members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size
