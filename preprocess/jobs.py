"""One driver for every preprocessing job (ingest, reprocess, stats, ...): a job is a short definition, this
module runs it.

A **shard job** (`ShardJob`: ingest, reprocess) turns each item into samples and writes a shard folder; the
framework does the rest, exactly once without coordination:
- Planning: the job picks the items to do; they are cut into groups of `shards.samples_per_shard` (one group,
  one shard) and the plan is saved to `_plan.json` *before* any task starts, so a re-run after a crash rebuilds
  the very same shards instead of regrouping (byte-identical to an uninterrupted run). A pending plan of
  another job is refused.
- Work units: each shard's items are decoded in units of `ray.videos_per_task` (`preprocess.units.work_unit`):
  a unit writes its samples to a part file, and one assembly task per shard concatenates the parts in plan
  order, publishes the shard (temporary name, then rename), then writes its manifest fragment the same way.
  So the bytes of a shard depend on the plan only, never on the task size, the worker count or the order in
  which units finish.
- The driver keeps a bounded window of units in flight (a few per CPU of the cluster, re-read as nodes join),
  so a 2M-video plan never puts half a million tasks into Ray at once. Units go out in plan order, except
  that the few likely-slow ones (the plan records each item's expected cost: file size, or bytes of SRC's
  samples) go first, so no straggler starting late sets the end of the job (`unit_order`, bench/schedule.py).
- Per-item time limit (`ray.video_timeout_s`): an item that takes longer becomes a `failed` row "timed out
  after N s" (`preprocess.units.Watchdog`). A unit whose worker dies is retried by Ray (`ray.max_retries`); a
  unit that still fails is submitted again as long as each failure has marked one more item as timed out.
- The driver folds the fragments into `manifest.parquet` (atomically, written last) and only then deletes the
  plan, the fragments and the parts. A run that dies anywhere leaves a state the next run completes.
- One run per output folder (`preprocess.outlock`); one sample-settings digest per folder (reprocess makes a
  new one).

A **row job** (`RowJob`: stats, verify) reads items (shards) and returns rows to the driver; it writes nothing
and holds no lock. Both kinds join a cluster the same way (`preprocess.cluster.connect`, before Ray is
imported, so token authentication works), forward storage credentials to a joined cluster's workers, and show
one progress bar. The driver holds plans and rows only, never sample data.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from cavmae.shards.config import Config, ConfigError
from cavmae.shards.frozen import FROZEN_CONFIG, PREP_SECTIONS, SAMPLE_SECTIONS, frozen_config
from cavmae.shards.manifest import MANIFEST, PARTS, fragment_name, merge_rows, read_manifest, write_rows
from cavmae.shards.names import shard_index, shard_name
from cavmae.shards.store import Store, is_temp_name

from .cluster import check_address, connect
from .outlock import output_lock
from .units import Progress, assemble_shard, row_unit, timed_out, work_unit

PLAN = "_plan.json"
FORWARD_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_", "CLASSPATH")
UNITS_PER_CPU = 2        # in flight per CPU: a finished unit's CPU is handed the next one without a round trip
MIN_IN_FLIGHT = 8
SLOW_FACTOR = 4.0         # a unit expected to cost more than this times the median unit starts first
RESOURCES_EVERY_S = 10.0  # how often the window re-reads the cluster's CPUs (autoscaling, nodes joining)

Sample = tuple[str, dict[str, Any], list[tuple[str, bytes]]]  # key, meta (window, duration_s), members


def _same(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class ShardJob:
    """A job that makes shards. Its functions run in Ray tasks (module-level functions travel by name).

    name:    the subcommand; recorded in the plan
    samples: (item, what `ahead` read for it, cfg) -> the item's samples (raise `preprocess.decode.BadInput`
             for a one-line failure)
    who:     item -> (video_id, source, labels) of its manifest rows
    ahead:   optional (unit's items, cfg) -> an iterator with one value per item, read in order before the
             item is made (reprocess: SRC's samples, by adjacent reads); it raises `units.RestFails` when the
             rest of the unit cannot be read
    load / save: an item from / to its JSON form in the saved plan
    imports: modules a unit imports before it times its first item (a fresh worker's first import of PyAV and
             torch takes seconds under load, which is not the item's time)
    cost:    optional item -> its expected cost, in any unit (file size, bytes of SRC's samples), found cheaply at
             planning time and recorded in the plan: the likely-slow units start first (`unit_order`)
    """
    name: str
    samples: Callable[[Any, Any, Config], Iterable[Sample]]
    who: Callable[[Any], tuple[str, str, list[str]]]
    ahead: Callable[[list[Any], Config], Iterator[Any]] | None = None
    load: Callable[[Any], Any] = _same
    save: Callable[[Any], Any] = _same
    imports: tuple[str, ...] = ()
    cost: Callable[[Any], float] | None = None


@dataclass(frozen=True)
class RowJob:
    """A job that reads and returns rows: `rows(item, cfg)` -> the item's rows, each with a `status`
    ('ok' or 'failed', for the progress bar). `unit` names an item on the progress bar."""
    name: str
    rows: Callable[[Any, Config], list[dict[str, Any]]]
    unit: str = "item"


@dataclass
class Run:
    """What a shard job's run did: the rows of the items planned in this run (pending ones included) and how many
    items those were."""
    new: list[dict[str, Any]]
    items: int


def run_shard_job(job: ShardJob, out: Store, cfg: Config,
                  pick: Callable[[list[dict[str, Any]], set[str]], tuple[list[Any], list[dict[str, Any]]]], *,
                  workers: int | None, address: str | None, progress: bool, desc: str) -> Run:
    """Run `job` into the shard folder `out` (see the module docstring).

    `pick(manifest rows, video ids of a pending plan)` -> (items to do, in order; rows to record without work,
    such as skipped inputs) is called under the lock, once the state of the folder is known."""
    check_address(cfg, address)
    out.makedirs()
    with output_lock(out):
        _check_frozen_config(out, cfg)
        _remove_temporaries(out)
        # the plan before the rows: a fragment that a task of a killed run still writes in between then leaves
        # its group pending (rebuilt identically), where the other order would plan its inputs a second time
        groups, costs = _pending_plan(out, job)
        held = read_manifest(out)
        todo, recorded = pick(held, {job.who(it)[0] for _, g in groups for it in g})
        fresh = cut(todo, cfg.shards.samples_per_shard, first_index=next_index(held, groups, cfg.shards.pattern))
        costs.update((i, [job.cost(it) if job.cost else 0.0 for it in g]) for i, g in fresh)
        groups += fresh
        out.write_text(FROZEN_CONFIG, cfg.to_yaml(*PREP_SECTIONS))
        new: list[dict[str, Any]] = []
        if groups:
            save_plan(out, job, groups, cfg, costs)
            new = _drive(groups, out, cfg, (work_unit, job), workers=workers, address=address, progress=progress,
                         desc=desc, unit="video", costs=costs)
        write_rows(MANIFEST, merge_rows(merge_rows(held, new), recorded), store=out)  # last, atomically
        _clear_run_state(out)
        _remove_temporaries(out)
    return Run(new=new, items=sum(len(g) for _, g in groups))


def run_row_job(job: RowJob, items: list[Any], where: Store, cfg: Config, *, workers: int | None,
                address: str | None, progress: bool, desc: str) -> list[dict[str, Any]]:
    """Every item's rows, in the order of `items` (one item per unit; `where` is passed to the tasks)."""
    groups = [(i, [it]) for i, it in enumerate(items)]
    return _drive(groups, where, cfg, (row_unit, job), workers=workers, address=address, progress=progress,
                  desc=desc, unit=job.unit, per_task=1)


# ---- planning and the run's files ---------------------------------------------------------------------------
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


def _pending_plan(store: Store, job: ShardJob) -> tuple[list[tuple[int, list[Any]]], dict[int, list[float]]]:
    """Groups of an interrupted run whose fragments are not written yet (those are rebuilt identically), and
    their items' expected costs."""
    if not store.is_file(PLAN):
        return [], {}
    plan = json.loads(store.read_text(PLAN))
    other = plan.get("job", "ingest")
    if other != job.name:
        raise ConfigError(f"{store.uri()}: an interrupted `cavmae-prep {other}` is pending here; "
                          f"re-run that command to finish it first")
    done = set(store.list(PARTS))
    pending = [g for g in plan["groups"] if fragment_name(shard_name(plan["pattern"], g["index"])) not in done]
    return ([(g["index"], [job.load(it) for it in g["items"]]) for g in pending],
            {g["index"]: g.get("costs") or [0.0] * len(g["items"]) for g in pending})


def save_plan(store: Store, job: ShardJob, groups: list[tuple[int, list[Any]]], cfg: Config,
              costs: dict[int, list[float]] | None = None) -> None:
    """The plan of a run (shard index -> items, and their expected costs), saved before any task starts."""
    store.makedirs(PARTS)
    plan = {"job": job.name, "pattern": cfg.shards.pattern,
            "groups": [{"index": i, "items": [job.save(it) for it in g], "costs": (costs or {}).get(i)}
                       for i, g in groups]}
    store.write_text(PLAN, json.dumps(plan))



def _clear_run_state(store: Store) -> None:
    for name in store.list(PARTS):  # fragments, and the parts and time-out markers of units
        store.delete(name)
    store.delete_dir_if_empty(PARTS)
    store.delete(PLAN)


def next_index(rows: list[dict[str, Any]], groups: list[tuple[int, list[Any]]], pattern: str) -> int:
    """One past the highest shard index in use (by the manifest or the pending plan). Shards named by another
    pattern (an earlier run with other `shards.*` settings) cannot collide with this pattern's names."""
    used = [i for i, _ in groups]
    for r in rows:
        try:
            used.append(shard_index(pattern, r["shard"] or ""))
        except ValueError:
            continue
    return max(used, default=-1) + 1



def cut(items: list[Any], size: int, first_index: int) -> list[tuple[int, list[Any]]]:
    """Consecutive groups of `size` items (one per shard), numbered from `first_index`."""
    if size < 1:
        raise ConfigError(f"config 'shards.samples_per_shard' must be >= 1; got {size}")
    return [(first_index + n, items[s:s + size]) for n, s in enumerate(range(0, len(items), size))]



# ---- the driver loop -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """Inputs `start .. start+count-1` (positions in the plan order) of shard `index`."""
    index: int
    start: int
    count: int


def plan_units(shards: list[tuple[int, int]], per_task: int) -> list[Unit]:
    """Cut each (shard index, number of inputs) into units of `per_task` inputs, in plan order."""
    if per_task < 1:
        raise ConfigError(f"config 'ray.videos_per_task' must be >= 1; got {per_task}")
    return [Unit(index, start, min(per_task, size - start))
            for index, size in shards for start in range(0, size, per_task)]


def unit_order(units: list[Unit], costs: list[float]) -> list[Unit]:
    """The order units go out in: plan order (shards complete in order, few parts wait on storage), except that
    the likely-slow units (expected cost over SLOW_FACTOR times the median unit's) go first, slowest first, so
    that no straggler that starts late sets the end of the job. With no costs known, plain plan order."""
    median = statistics.median(costs) if costs else 0.0
    if median <= 0:
        return list(units)
    slow = sorted((n for n, c in enumerate(costs) if c > SLOW_FACTOR * median), key=lambda n: -costs[n])
    first = set(slow)
    return [units[n] for n in slow] + [u for n, u in enumerate(units) if n not in first]


def _drive(groups: list[tuple[int, list[Any]]], store: Store, cfg: Config, task: tuple[Callable, Any], *,
           workers: int | None, address: str | None, progress: bool, desc: str, unit: str,
           per_task: int | None = None, costs: dict[int, list[float]] | None = None) -> list[dict[str, Any]]:
    """Run `groups` (shard index -> items) as units on Ray; every row, in plan order. `task` is (unit task, job):
    a shard job's units leave parts that one assembly task per shard turns into the shard."""
    started = connect(cfg, workers, address)  # first: it sets the auth token up before Ray is imported
    import ray

    try:
        return _loop(groups, store, cfg, task, started=started, progress=progress, desc=desc, unit=unit,
                     per_task=per_task or cfg.ray.videos_per_task, costs=costs or {})
    finally:
        if started:
            ray.shutdown()


def _loop(groups: list[tuple[int, list[Any]]], store: Store, cfg: Config, task: tuple[Callable, Any], *,
          started: bool, progress: bool, desc: str, unit: str, per_task: int,
          costs: dict[int, list[float]]) -> list[dict[str, Any]]:
    import ray
    from tqdm import tqdm

    fn, job = task
    shards = fn is work_unit
    options: dict[str, Any] = {"max_retries": cfg.ray.max_retries}
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
    if not started and env:
        # joined a cluster: workers on other machines need the storage credentials/endpoints too
        options["runtime_env"] = {"env_vars": env}
    unit_task = ray.remote(num_cpus=cfg.ray.num_cpus_per_task, **options)(fn)
    assemble_task = ray.remote(num_cpus=0, **options)(assemble_shard)  # I/O only: never queued behind decoding
    cfg_ref, job_ref = ray.put(cfg.to_dict()), ray.put(job)
    tracker = ray.remote(num_cpus=0)(Progress).remote() if progress else None
    items = dict(groups)
    units = plan_units([(i, len(g)) for i, g in groups], per_task)
    unit_costs = [sum(costs.get(u.index, ())[u.start:u.start + u.count]) for u in units]
    queue = deque((u, 0) for u in unit_order(units, unit_costs))
    units_left = {i: 0 for i, _ in groups}
    for u, _ in queue:
        units_left[u.index] += 1
    backs: dict[int, dict[int, tuple[str | None, list[dict[str, Any]]]]] = {i: {} for i, _ in groups}
    running: dict[Any, tuple[Unit, int]] = {}
    assembling: dict[Any, int] = {}
    rows_of: dict[int, list[dict[str, Any]]] = {}
    window, window_at = MIN_IN_FLIGHT, 0.0
    with tqdm(total=sum(len(g) for _, g in groups), unit=unit, disable=not progress, desc=desc) as bar:
        while queue or running or assembling:
            if time.time() - window_at > RESOURCES_EVERY_S:
                cpus = ray.cluster_resources().get("CPU", 1.0) / max(cfg.ray.num_cpus_per_task, 1e-3)
                window, window_at = max(MIN_IN_FLIGHT, int(UNITS_PER_CPU * cpus)), time.time()
            while queue and len(running) < window:
                u, marks = queue.popleft()
                ref = unit_task.remote(job_ref, u.index, u.start, items[u.index][u.start:u.start + u.count],
                                       store.uri(), cfg_ref, progress=tracker)
                running[ref] = (u, marks)
            # one completion at a time keeps Ctrl-C prompt (Ray ends the tasks of a driver that left)
            done, _ = ray.wait([*running, *assembling], num_returns=1, timeout=0.5)
            for ref in done:
                if ref in assembling:
                    rows_of[assembling.pop(ref)] = ray.get(ref)
                    continue
                u, marks = running.pop(ref)
                try:
                    back = ray.get(ref)
                except ray.exceptions.RayTaskError:
                    raise
                except ray.exceptions.RayError:
                    now = _marks_in(store, cfg, u) if shards else 0
                    if now <= marks:
                        raise
                    queue.appendleft((u, now))  # it timed out more often than Ray retries: go on past them
                    continue
                backs[u.index][u.start] = back
                units_left[u.index] -= 1
                if units_left[u.index] == 0:
                    got = backs.pop(u.index)
                    ordered = [got[s] for s in sorted(got)]
                    rows = [r for _, rs in ordered for r in rs]
                    if not shards:
                        rows_of[u.index] = rows
                        continue
                    parts = [p for p, _ in ordered if p is not None]
                    assembling[assemble_task.remote(u.index, parts, rows, store.uri(), cfg_ref)] = u.index
            if tracker is not None:
                _show_progress(bar, tracker)
        bar.update(bar.total - bar.n)  # the returned rows are the truth; late progress reports are not
        rows = [r for i, _ in groups for r in rows_of[i]]
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
    return rows


def _marks_in(store: Store, cfg: Config, u: Unit) -> int:
    marked = timed_out(store, shard_name(cfg.shards.pattern, u.index))
    return sum(u.start <= p < u.start + u.count for p in marked)


def _show_progress(bar: Any, tracker: Any) -> None:
    import ray

    try:
        done, failed = ray.get(tracker.totals.remote(), timeout=5)
    except (ray.exceptions.RayError, TimeoutError):  # a lost progress actor only stops the bar
        return
    bar.update(done - bar.n)
    bar.set_postfix(failed=failed)
