"""The ingest job: inputs → plan of shard-sized groups → small work units on Ray → shards → manifest.

Exactly-once without coordination:
- The pending inputs are sorted and cut into groups of `shards.samples_per_shard`; the plan (shard index →
  inputs) is saved to `_plan.json` *before* any task starts, so a re-run after a crash rebuilds the very same
  shards instead of regrouping (byte-identical to an uninterrupted run).
- Each shard's inputs are decoded in units of `ray.videos_per_task` (`preprocess.schedule`): a unit writes
  its samples to a part file, and one assembly task per shard concatenates the parts in plan order, publishes
  the shard under a temporary name plus rename, then writes its manifest fragment the same way. A retried
  task rewrites the same bytes, whatever the task size or the number of workers.
- The driver folds the fragments into `manifest.parquet` (atomically, written last) and only then deletes
  the plan, the fragments and the parts. A run that dies anywhere leaves a state the next run completes.
- An input that takes longer than `ray.video_timeout_s` (a decoder stall, a hung read, a stream that never
  ends) becomes a `failed` row "timed out after N s": the unit's worker leaves a marker and ends itself, Ray
  starts a new one and the retried unit skips the marked input (`Watchdog`).
- One run per output folder (`preprocess.outlock`).

Storage: `out` (and any input) may be a local path or a URI (`s3://`, `gs://`, `hdfs://`, `file://`; see
`shards.store`): shards and fragments are published by rename where the store renames, by one upload of a
write-once name otherwise. On a multi-node cluster `out` must be storage every node reaches (a URI, or a
shared mount).

Cluster: see `preprocess.cluster` (`--address` / RAY_ADDRESS / `ray.address`, token authentication). Each
unit asks for `ray.num_cpus_per_task` CPUs; the driver holds plans and manifest rows only, never sample data.

Memory per task: one input is decoded at a time; its samples wait in a spool (memory up to SPOOL_BYTES, then
local disk) until the input is done, then move into the unit's part file. In `clip.mode: windows` the
decoder holds only the open windows' frames and audio, never the whole video: the peak grows neither with
`shards.samples_per_shard` nor with the video's length. Assembly streams one member at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from shards.config import Config, ConfigError
from shards.frozen import FROZEN_CONFIG, PREP_SECTIONS, SAMPLE_SECTIONS, frozen_config
from shards.manifest import MANIFEST, PARTS, fragment_name, merge_rows, read_manifest, read_rows, write_rows
from shards.names import shard_index, shard_name
from shards.tar import TarWriter, read_members
from shards.schema import one_line
from shards.store import Store, is_temp_name, is_uri
from shards.writer import ShardWriter

from .cluster import check_address, connect
from .inputs import InputItem, LabelIndex, collect_inputs
from .outlock import output_lock
from .schedule import FORWARD_ENV, part_name, run_units, timed_out, timeout_name

PLAN = "_plan.json"


@dataclass
class Summary:
    ok: int = 0          # samples written in this run
    failed: int = 0      # inputs that failed in this run
    skipped: int = 0     # inputs recorded as skipped in this run (duplicates, unknown labels, ...)
    already: int = 0     # inputs the manifest already held
    seconds: float = 0.0
    videos: int = 0      # inputs processed in this run
    problems: list[str] = field(default_factory=list)  # "source: reason" for each failed or skipped input
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files of input folders not taken

    def line(self) -> str:
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        return (f"ok {self.ok} samples, failed {self.failed}, skipped {self.skipped}, already done {self.already}"
                f" | {self.videos} videos in {self.seconds:.1f} s ({rate:.2f} videos/s)")


def ingest(inputs: list[str], out: str | os.PathLike, cfg: Config, *, labels_csv: str | None = None,
           label_index_csv: str | None = None, labels_from_folders: bool = False, retry_failed: bool = False,
           workers: int | None = None, address: str | None = None, progress: bool = False) -> Summary:
    """Ingest `inputs` into shards under `out`; resumable (see the module docstring)."""
    check_address(cfg, address)
    start = time.time()
    store = Store.of(out)
    store.makedirs()
    with output_lock(store):
        _check_frozen_config(store, cfg)
        label_index = LabelIndex.read(label_index_csv) if label_index_csv else None
        ignored: list[tuple[str, str]] = []
        items = collect_inputs(inputs, labels_csv=labels_csv, label_index=label_index,
                               labels_from_folders=labels_from_folders, ignored=ignored)
        _remove_temporaries(store)

        # the plan before the rows: a fragment that a task of a killed run still writes in between then leaves
        # its group pending (rebuilt identically), where the other order would plan its inputs a second time
        groups = _pending_plan(store, job="ingest")
        rows = read_manifest(store)
        holds = {r["video_id"]: r["status"] for r in rows}
        planned = {it.video_id for _, group in groups for it in group}
        todo = [it for it in items if it.video_id not in planned and it.error is None
                and (holds.get(it.video_id) is None or (retry_failed and holds[it.video_id] != "ok"))]
        skipped_rows = [_row(it, "skipped", it.error, cfg) for it in items
                        if it.error is not None and it.video_id not in holds]
        groups += _cut(todo, cfg.shards.samples_per_shard, first_index=_next_index(rows, groups, cfg.shards.pattern))
        redo = {it.video_id for it in todo}
        summary = Summary(already=sum(1 for it in items if it.video_id in holds and it.video_id not in redo),
                          skipped=len(skipped_rows), ignored=ignored)
        store.write_text(FROZEN_CONFIG, cfg.to_yaml(*PREP_SECTIONS))
        if groups:
            _save_plan(store, [(i, [asdict(it) for it in g]) for i, g in groups], cfg, job="ingest")
            new_rows = run_units(groups, store, cfg, decode_unit, assemble_shard, workers=workers, address=address,
                                 progress=progress, desc="ingest")
            summary.videos = sum(len(g) for _, g in groups)
            summary.ok = sum(r["status"] == "ok" for r in new_rows)
            summary.failed = sum(r["status"] == "failed" for r in new_rows)
            rows = merge_rows(rows, new_rows)
            summary.problems += [f"{r['source']}: {r['error']}" for r in new_rows if r["status"] == "failed"]
        summary.problems += [f"{r['source']}: {r['error']}" for r in skipped_rows]
        rows = merge_rows(rows, skipped_rows)
        finish_run(store, rows)
    summary.seconds = time.time() - start
    return summary


def finish_run(store: Store, rows: list[dict[str, Any]]) -> None:
    """Manifest last (atomically), then the run's plan, fragments and any temporaries of killed tasks."""
    write_rows(MANIFEST, rows, store=store)
    _clear_run_state(store)
    _remove_temporaries(store)


def _check_frozen_config(store: Store, cfg: Config) -> None:
    """Refuse to mix samples made with different settings in one folder (reprocess makes a new one)."""
    if not store.is_file(FROZEN_CONFIG):
        return
    old = frozen_config(store)
    if old.digest(*SAMPLE_SECTIONS) != cfg.digest(*SAMPLE_SECTIONS):
        raise ConfigError(f"{store.uri()}: holds shards made with other audio/video/clip settings "
                          f"(see {store.uri(FROZEN_CONFIG)}); use a new --out, or `cavmae-prep reprocess`")


def _remove_temporaries(store: Store) -> None:
    """Half-written files of a killed run or task (never visible under their final names)."""
    for name in store.list() + store.list(PARTS):
        if is_temp_name(name):
            store.delete(name)


def _pending_plan(store: Store, job: str) -> list[tuple[int, list[Any]]]:
    """Groups of an interrupted run whose fragments are not written yet (those are rebuilt identically)."""
    if not store.is_file(PLAN):
        return []
    plan = json.loads(store.read_text(PLAN))
    if plan.get("job", "ingest") != job:
        other = plan.get("job", "ingest")
        raise ConfigError(f"{store.uri()}: an interrupted `cavmae-prep {other}` is pending here; "
                          f"re-run that command to finish it first")
    done = set(store.list(PARTS))
    groups = [(g["index"], g["items"]) for g in plan["groups"]]
    pending = [(i, g) for i, g in groups if fragment_name(shard_name(plan["pattern"], i)) not in done]
    if job == "ingest":
        return [(i, [InputItem.from_dict(it) for it in g]) for i, g in pending]
    return pending


def _save_plan(store: Store, groups: list[tuple[int, list[dict[str, Any]]]], cfg: Config, job: str) -> None:
    store.makedirs(PARTS)
    plan = {"job": job, "pattern": cfg.shards.pattern,
            "groups": [{"index": i, "items": g} for i, g in groups]}
    store.write_text(PLAN, json.dumps(plan))


def _clear_run_state(store: Store) -> None:
    for name in store.list(PARTS):  # fragments, and the parts and time-out markers of units
        store.delete(name)
    store.delete_dir_if_empty(PARTS)
    store.delete(PLAN)


def _next_index(rows: list[dict[str, Any]], groups: list[tuple[int, list[Any]]], pattern: str) -> int:
    """One past the highest shard index in use (by the manifest or the pending plan). Shards named by another
    pattern (an earlier run with other `shards.*` settings) cannot collide with this pattern's names."""
    used = [i for i, _ in groups]
    for r in rows:
        try:
            used.append(shard_index(pattern, r["shard"] or ""))
        except ValueError:
            continue
    return max(used, default=-1) + 1


def _cut(items: list[InputItem], size: int, first_index: int) -> list[tuple[int, list[InputItem]]]:
    if size < 1:
        raise ConfigError(f"config 'shards.samples_per_shard' must be >= 1; got {size}")
    return [(first_index + n, items[s:s + size]) for n, s in enumerate(range(0, len(items), size))]


def _row(item: InputItem, status: str, error: str | None, cfg: Config, **extra: Any) -> dict[str, Any]:
    return {"video_id": item.video_id, "key": None, "window": None, "source": item.path, "status": status,
            "error": error, "shard": None, "labels": list(item.labels), "duration_s": None, "bytes": None,
            "config_digest": cfg.digest(*SAMPLE_SECTIONS), **extra}


def decode_unit(index: int, start: int, items: list[InputItem], out: str, cfg_data: dict[str, Any], *,
                progress: Any = None) -> tuple[str | None, list[dict[str, Any]]]:
    """One work unit: decode inputs `start, start+1, ...` of shard `index` into a part file (published only if
    some input gave samples); return its name and the inputs' rows. Inputs marked as timed out by an earlier
    attempt become failed rows without being opened again."""
    from preprocess.decode import BadInput
    from preprocess.sample import iter_samples

    cfg = Config(cfg_data)
    store = Store.of(out)
    name = shard_name(cfg.shards.pattern, index)
    marked = timed_out(store, name)
    rows: list[dict[str, Any]] = []
    with ShardWriter(store, part_name(name, start)) as part, Watchdog(cfg.ray.video_timeout_s) as dog:
        for position, item in enumerate(items, start):
            item_rows = []
            try:
                if position in marked:
                    raise BadInput(f"timed out after {marked[position]} s")
                dog.watch(store, timeout_name(name, position))
                with local_copy(item.path) as path, SampleSpool() as spool:
                    indices = list(item.label_indices) if item.label_indices is not None else None
                    for s in iter_samples(path, item.video_id, item.path, list(item.labels), indices, cfg):
                        spool.add(s.members)
                        item_rows.append(_row(item, "ok", None, cfg, key=s.key, window=s.meta.get("window"),
                                              shard=name, duration_s=s.meta.get("duration_s"),
                                              bytes=sum(len(d) for _, d in s.members)))
                    part.add(spool.members())
            except BadInput as exc:
                item_rows = [_row(item, "failed", one_line(exc), cfg)]
            except Exception as exc:  # a decoder bug on one file must not take the shard down with it
                item_rows = [_row(item, "failed", one_line(f"{type(exc).__name__}: {exc}"), cfg)]
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
        from preprocess.decode import BadInput

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


def run_groups(groups: list[tuple[int, list[Any]]], store: Store, cfg: Config, fn, *, workers: int | None,
               address: str | None, progress: bool, desc: str, extra: tuple = (),
               unit: str = "video") -> list[dict[str, Any]]:
    """Run `fn(index, items, out_uri, cfg_dict, *extra)` as one Ray task per group; return all rows.

    Tasks ask for `ray.num_cpus_per_task` CPUs and are retried `ray.max_retries` times when their worker or
    node dies (a retry rewrites the same shard). Only rows come back to the driver."""
    import ray
    from tqdm import tqdm

    started = connect(cfg, workers, address)
    try:
        options: dict[str, Any] = {"num_cpus": cfg.ray.num_cpus_per_task, "max_retries": cfg.ray.max_retries}
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
        if not started and env:
            # joined a cluster: workers on other machines need the storage credentials/endpoints too
            options["runtime_env"] = {"env_vars": env}
        task = ray.remote(**options)(fn)
        cfg_ref = ray.put(cfg.to_dict())
        tracker = ray.remote(num_cpus=0)(Progress).remote() if progress else None
        pending = [task.remote(i, g, store.uri(), cfg_ref, *extra, progress=tracker) for i, g in groups]
        rows: list[dict[str, Any]] = []
        with tqdm(total=sum(len(g) for _, g in groups), unit=unit, disable=not progress, desc=desc) as bar:
            while pending:  # one completion at a time keeps Ctrl-C prompt (Ray ends the tasks of a driver that left)
                done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                rows += [row for got in ray.get(done) for row in got]
                if tracker is not None:
                    show_progress(bar, tracker)
            bar.update(bar.total - bar.n)  # the returned rows are the truth; late progress reports are not
            bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
        return rows
    finally:
        if started:
            ray.shutdown()


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


def show_progress(bar: Any, tracker: Any) -> None:
    import ray

    try:
        done, failed = ray.get(tracker.totals.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):  # a lost progress actor only stops the bar
        return
    bar.update(done - bar.n)
    bar.set_postfix(failed=failed)
