"""Work units smaller than a shard, and the driver loop that runs them on Ray.

Shard membership is fixed by the plan (sorted inputs cut into `shards.samples_per_shard` groups); the unit of
*work* is smaller: `ray.videos_per_task` consecutive inputs of one shard. A unit task decodes its inputs into a
part file (`_parts/<shard>.<first position>.tar`, the inputs' samples in plan order); when every unit of a shard
is back, one assembly task concatenates the parts in plan order into the shard and writes its manifest
fragment. So the bytes of a shard depend on the plan only, never on the task size, the worker count or the
order in which units finish, while a 100-video folder still spreads over every core and the job's tail is
one small unit, not one slow shard (see bench/schedule.py for the simulation).

The driver keeps a bounded window of units in flight (a few per CPU of the cluster, re-read as nodes join), so
a 2M-video plan never puts half a million tasks into Ray at once; units go out in plan order, so shards
complete in order and few parts wait on storage at any time.

A unit whose worker dies (node lost, or a video hit the per-video time limit: see `preprocess.ingest.Watchdog`)
is retried by Ray (`ray.max_retries`); a unit that still fails after its retries is submitted again as long as
each failure has marked one more input as timed out, so any number of stalling videos cannot stop the job.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from shards.config import Config, ConfigError
from shards.manifest import PARTS
from shards.names import shard_name
from shards.store import Store

from .cluster import connect

FORWARD_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HADOOP_", "ARROW_", "CLASSPATH")
UNITS_PER_CPU = 2        # in flight per CPU: a finished unit's CPU is handed the next one without a round trip
MIN_IN_FLIGHT = 8
RESOURCES_EVERY_S = 10.0  # how often the window re-reads the cluster's CPUs (autoscaling, nodes joining)


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


def run_units(groups: list[tuple[int, list[Any]]], store: Store, cfg: Config, decode: Callable,
              assemble: Callable, *, workers: int | None, address: str | None, progress: bool, desc: str,
              extra: tuple = ()) -> list[dict[str, Any]]:
    """Decode `groups` (shard index → inputs) as units on Ray (`preprocess.cluster.connect`); return every row,
    in plan order.

    `decode(index, start, items, out_uri, cfg_dict, *extra, progress=)` → (part name or None, rows) and
    `assemble(index, parts, rows, out_uri, cfg_dict)` → the shard's manifest rows are the tasks (ingest's and
    reprocess's). Only rows come back to the driver."""
    started = connect(cfg, workers, address)  # first: it sets the auth token up before Ray is imported
    import ray

    try:
        return _run(groups, store, cfg, decode, assemble, started=started, progress=progress, desc=desc,
                    extra=extra)
    finally:
        if started:
            ray.shutdown()


def _run(groups: list[tuple[int, list[Any]]], store: Store, cfg: Config, decode: Callable, assemble: Callable, *,
         started: bool, progress: bool, desc: str, extra: tuple) -> list[dict[str, Any]]:
    import ray
    from tqdm import tqdm

    from .ingest import Progress, show_progress

    options: dict[str, Any] = {"max_retries": cfg.ray.max_retries}
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
    if not started and env:
        # joined a cluster: workers on other machines need the storage credentials/endpoints too
        options["runtime_env"] = {"env_vars": env}
    decode_task = ray.remote(num_cpus=cfg.ray.num_cpus_per_task, **options)(decode)
    assemble_task = ray.remote(num_cpus=0, **options)(assemble)  # I/O only: never queued behind decoding
    cfg_ref = ray.put(cfg.to_dict())
    tracker = ray.remote(num_cpus=0)(Progress).remote() if progress else None
    items = dict(groups)
    queue = deque((u, 0) for u in plan_units([(i, len(g)) for i, g in groups], cfg.ray.videos_per_task))
    units_left = {i: 0 for i, _ in groups}
    for u, _ in queue:
        units_left[u.index] += 1
    backs: dict[int, dict[int, tuple[str | None, list[dict[str, Any]]]]] = {i: {} for i, _ in groups}
    running: dict[Any, tuple[Unit, int]] = {}
    assembling: dict[Any, int] = {}
    rows_of: dict[int, list[dict[str, Any]]] = {}
    window, window_at = MIN_IN_FLIGHT, 0.0
    with tqdm(total=sum(len(g) for _, g in groups), unit="video", disable=not progress, desc=desc) as bar:
        while queue or running or assembling:
            if time.time() - window_at > RESOURCES_EVERY_S:
                cpus = ray.cluster_resources().get("CPU", 1.0) / max(cfg.ray.num_cpus_per_task, 1e-3)
                window, window_at = max(MIN_IN_FLIGHT, int(UNITS_PER_CPU * cpus)), time.time()
            while queue and len(running) < window:
                u, marks = queue.popleft()
                ref = decode_task.remote(u.index, u.start, items[u.index][u.start:u.start + u.count],
                                         store.uri(), cfg_ref, *extra, progress=tracker)
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
                    now = _marks_in(store, cfg, u)
                    if now <= marks:
                        raise
                    queue.appendleft((u, now))  # it timed out more often than Ray retries: go on past them
                    continue
                backs[u.index][u.start] = back
                units_left[u.index] -= 1
                if units_left[u.index] == 0:
                    got = backs.pop(u.index)
                    ordered = [got[s] for s in sorted(got)]
                    parts = [p for p, _ in ordered if p is not None]
                    rows = [r for _, rs in ordered for r in rs]
                    assembling[assemble_task.remote(u.index, parts, rows, store.uri(), cfg_ref)] = u.index
            if tracker is not None:
                show_progress(bar, tracker)
        bar.update(bar.total - bar.n)  # the returned rows are the truth; late progress reports are not
        rows = [r for i, _ in groups for r in rows_of[i]]
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows))
    return rows


def _marks_in(store: Store, cfg: Config, u: Unit) -> int:
    marked = timed_out(store, shard_name(cfg.shards.pattern, u.index))
    return sum(u.start <= p < u.start + u.count for p in marked)
