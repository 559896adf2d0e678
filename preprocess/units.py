"""The worker side of a preprocessing job (`preprocess.jobs`): the Ray tasks, and what they need on a worker.

- `work_unit`: a few consecutive items of one shard become samples in a part file, plus one manifest row per
  sample (or one failed row per item). Each item is timed (`Watchdog`, `ray.video_timeout_s`), is all or
  nothing in its shard (`SampleSpool`), and one item that fails does not take the unit down.
- `assemble_shard`: the parts of a shard, in plan order, become the shard, then its manifest fragment.
- `row_unit`: a job that writes nothing (stats, verify) turns each item into rows.
- `Progress` / `report`: per-item progress for the driver's bar.

Names of a run's files: `_parts/<shard>.<first position>.part.tar` (a unit's samples waiting for assembly) and
`_parts/<shard>.<position>.timeout` (an item that exceeded the time limit; the retried unit skips it).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from cavmae.preprocess.settings import register_sections
from cavmae.shards.config import Config
from cavmae.shards.frozen import SAMPLE_SECTIONS
from cavmae.shards.manifest import PARTS, fragment_name, read_rows, write_rows
from cavmae.shards.names import shard_name
from cavmae.shards.schema import one_line
from cavmae.shards.store import Store, is_uri
from cavmae.shards.tar import TarWriter, read_members
from cavmae.shards.writer import ShardWriter


class RestFails(Exception):
    """Raised by a job's `ahead` reader: the rest of the unit cannot be made (the message is the reason)."""


def manifest_row(video_id: str, source: str, labels: list[str], status: str, error: str | None, digest: str,
                 **extra: Any) -> dict[str, Any]:
    """One manifest row (the columns `shards.manifest` writes); `extra` fills key, window, shard, ..."""
    return {"video_id": video_id, "key": None, "window": None, "source": source, "status": status,
            "error": error, "shard": None, "labels": list(labels), "duration_s": None, "bytes": None,
            "config_digest": digest, **extra}


def part_name(shard_name: str, start: int) -> str:
    """Where a unit's samples wait for the assembly of their shard."""
    return f"{PARTS}/{shard_name.rsplit('.', 1)[0]}.{start:06d}.part.tar"


def timeout_name(shard_name: str, position: int) -> str:
    """The marker a unit leaves when input `position` of the shard exceeds the per-video time limit."""
    return f"{PARTS}/{shard_name.rsplit('.', 1)[0]}.{position:06d}.timeout"


def timed_out(store: Store, shard_name: str) -> dict[int, str]:
    """{position: limit in seconds} of the shard's inputs that timed out in an earlier attempt."""
    prefix = f"{PARTS}/{shard_name.rsplit('.', 1)[0]}."
    return {int(n[len(prefix):].split(".", 1)[0]): store.read_text(n).strip()
            for n in store.list(PARTS) if n.startswith(prefix) and n.endswith(".timeout")}


def work_unit(job: Any, index: int, start: int, items: list[Any], out: str, cfg_data: dict[str, Any], *,
              progress: Any = None) -> tuple[str | None, list[dict[str, Any]]]:
    """One work unit of `job` (a `preprocess.jobs.ShardJob`): items `start, start+1, ...` of shard `index` into a
    part file (published only if some item gave samples); return its name and the items' rows. Items marked as
    timed out by an earlier attempt become failed rows without being opened again."""
    from cavmae.preprocess.decode import BadInput

    register_sections()  # a Ray worker is a process of its own: it reads `ray.video_timeout_s`
    for module in job.imports:
        importlib.import_module(module)
    cfg = Config(cfg_data)
    store = Store.of(out)
    digest = cfg.digest(*SAMPLE_SECTIONS)
    name = shard_name(cfg.shards.pattern, index)
    marked = timed_out(store, name)
    rows: list[dict[str, Any]] = []
    aheads = job.ahead(items, cfg) if job.ahead is not None else iter([None] * len(items))
    with ShardWriter(store, part_name(name, start)) as part, Watchdog(cfg.ray.video_timeout_s) as dog:
        for position, item in enumerate(items, start):
            try:
                ahead = next(aheads)
            except RestFails as exc:  # what the rest needs cannot be read: they fail with the reason
                for rest, it in enumerate(items[position - start:], position):
                    rows.append(manifest_row(*job.who(it), "failed", str(exc), digest))
                    report(progress, index, rest, rows[-1:])
                break
            item_rows = []
            try:
                if position in marked:
                    raise BadInput(f"timed out after {marked[position]} s")
                dog.watch(store, timeout_name(name, position))
                with SampleSpool() as spool:
                    for key, meta, members in job.samples(item, ahead, cfg):
                        spool.add(members)
                        item_rows.append(manifest_row(
                            *job.who(item), "ok", None, digest, key=key, window=meta.get("window"), shard=name,
                            duration_s=meta.get("duration_s"), bytes=sum(len(d) for _, d in members)))
                    part.add(spool.members())
            except BadInput as exc:
                item_rows = [manifest_row(*job.who(item), "failed", one_line(exc), digest)]
            except Exception as exc:  # a decoder bug on one file must not take the shard down with it
                item_rows = [manifest_row(*job.who(item), "failed", one_line(f"{type(exc).__name__}: {exc}"), digest)]
            finally:
                dog.watch(None, None)
            rows += item_rows
            report(progress, index, position, item_rows)
    return (part.name if part.members else None), rows


def assemble_shard(index: int, parts: list[str], rows: list[dict[str, Any]], out: str,
                   cfg_data: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard from its units' parts (in plan order), then its manifest fragment, then the parts go; the
    fragment's rows (what the manifest records) come back."""
    cfg = Config(cfg_data)
    store = Store.of(out)
    name = shard_name(cfg.shards.pattern, index)
    if store.is_file(fragment_name(name)):  # a retry after the fragment was written: only clean up
        rows = read_rows(fragment_name(name), store=store)
    else:
        with ShardWriter(store, name) as shard:
            for part in parts:
                with store.open_input(part) as f:
                    shard.add((name, data) for name, data, _, _ in read_members(f, store.uri(part)))
        rows = shard.locate(rows)  # each sample's byte span in the shard (manifest offset/length)
        write_rows(fragment_name(name), rows, store=store)
    for part in parts:
        store.delete(part)
    return rows


def row_unit(job: Any, index: int, start: int, items: list[Any], out: str, cfg_data: dict[str, Any], *,
             progress: Any = None) -> tuple[None, list[dict[str, Any]]]:
    """One work unit of a job that writes nothing (a `preprocess.jobs.RowJob`): each item's rows."""
    cfg = Config(cfg_data)
    rows: list[dict[str, Any]] = []
    for position, item in enumerate(items, start):
        item_rows = job.rows(item, cfg)
        rows += item_rows
        report(progress, index, position, item_rows)
    return None, rows


class Watchdog:
    """Ends the worker process when one input has taken more than `limit_s` seconds of wall time.

    A stalled decoder (a network read that never returns, a demuxer looping in C, a stream that never ends in
    `clip.mode: windows`) cannot be interrupted from Python, but PyAV releases the GIL while it works, so a
    thread can still notice. It first leaves a marker for the input (the retried unit records it as failed
    "timed out after N s"), then exits the process: Ray starts a fresh worker and retries the unit."""

    def __init__(self, limit_s: float):
        self.limit_s = float(limit_s)
        self._store: Store | None = None
        self._marker: str | None = None
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cavmae-watchdog", daemon=True)

    def watch(self, store: Store | None, marker: str | None) -> None:
        """Start timing an input (the name of its marker), or stop timing (None)."""
        self._since = time.monotonic()
        self._store, self._marker = store, marker

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 4)):
            store, marker = self._store, self._marker
            if marker is not None and time.monotonic() - self._since > self.limit_s:
                store.write_text(marker, f"{self.limit_s:g}")
                os._exit(1)

    def __enter__(self) -> "Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()


SPOOL_BYTES = 8 << 20  # per input; a first-mode sample (~0.4 MiB) never touches the disk


class SampleSpool:
    """One input's samples, held in a spooled temporary tar (in memory up to SPOOL_BYTES, then on local disk)
    until the whole input has decoded: an input is all or nothing in its shard (a failure in window 40 of a long
    video leaves none of its windows behind), and a task's memory does not grow with the video's length."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, prefix="cavmae-spool-")
        self.tar = TarWriter(self.file)

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            self.tar.add(name, data)

    def members(self) -> Iterator[tuple[str, bytes]]:
        """The spooled members in order (read back one at a time)."""
        self.tar.close()
        self.file.seek(0)
        for name, data, _, _ in read_members(self.file, "the input's spool"):
            yield name, data

    def __enter__(self) -> "SampleSpool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()


class local_copy:
    """Context manager: a local path for `source` (itself when local; a streamed temporary copy of a remote
    URI, deleted afterwards). A remote file that cannot be read raises BadInput."""

    def __init__(self, source: str):
        self.source = source
        self.tmp: str | None = None

    def __enter__(self) -> str:
        if not is_uri(self.source) or self.source.startswith("file://"):
            return self.source[len("file://"):] if self.source.startswith("file://") else self.source
        from cavmae.preprocess.decode import BadInput

        store, name = Store.split(self.source)
        suffix = Path(name).suffix
        fd, self.tmp = tempfile.mkstemp(prefix="cavmae-in-", suffix=suffix)
        os.close(fd)
        try:
            store.download(name, self.tmp)
        except FileNotFoundError:
            raise BadInput("file not found") from None
        except OSError as exc:
            raise BadInput(f"cannot read remote file ({one_line(exc)})") from None
        return self.tmp

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)


class Progress:
    """Per-input progress reported by the tasks for the driver's bar (run as a Ray actor).

    Reports are keyed by (shard, position), so a retried task's inputs count once; they are only for
    display: the rows a task returns are what the manifest records."""

    def __init__(self) -> None:
        self.done: dict[tuple[int, int], bool] = {}

    def report(self, index: int, position: int, failed: bool) -> None:
        self.done[(index, position)] = failed

    def totals(self) -> tuple[int, int]:
        return len(self.done), sum(self.done.values())


def report(progress: Any, index: int, position: int, rows: list[dict[str, Any]]) -> None:
    """Tell the driver's `Progress` (when there is one) that input `position` of shard `index` is done."""
    if progress is not None:
        progress.report.remote(index, position, not any(r["status"] == "ok" for r in rows))
