"""Scheduling simulation: how busy do N workers stay on an ingest plan, before anything runs?

    .venv/bin/python -m bench.schedule [--videos 18000,2000000] [--workers 1,2,4,...,256] [--per-task 4]
                                       [--shard 128] [--overhead-ms 20] [--limit-s 30] [--tail 0.005]
                                       [--noise 0.5] [--missed 0.0] [--seed 0]

Per-video costs (seconds on one core) are drawn from a distribution fitted to our measurements plus a heavy
tail: a log-normal body with a median of 0.17 s (BENCHMARKS.md, `bench/ingest.py` route c: 98 ms for a 360p
10 s clip, 290 ms for 720p, 168 ms for the real clip) and sigma 0.6; `--tail` (0.5%) of the videos are
stragglers whose cost is Pareto-distributed (alpha 1.5, from 1 s up: long or odd files, slow reads; an assumption,
not a measurement), cut at the per-video time limit (`ray.video_timeout_s`) plus the restart of the worker that
the limit costs. These costs are replayed through
the planner (`preprocess.jobs.plan_units`: shards of `--shard` inputs cut into units of `--per-task`) and
a list scheduler that does what the driver does: units go out in the driver's order, each to the first worker
that is free. Every unit also pays `--overhead-ms` (Ray's dispatch, the part file written and read back).

The driver's order (`preprocess.jobs.unit_order`) starts the likely-slow units first, by the expected cost the
plan records (file size). That is a proxy: here each video's expected cost is its true cost times a log-normal
error (sigma `--noise`), and a share `--missed` of the stragglers looks like an ordinary video (a slow read, an
odd file of ordinary size) and is not started early (assumptions, not measurements).

Printed per plan and worker count: makespan, efficiency (ideal time = total cost / workers, over makespan) and
idle core-hours, for the previous plan (one task per shard), units of `--per-task` videos in plan order (the
driver before `unit_order`), and the same units with the likely-slow ones first (today's driver).
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cavmae.preprocess.jobs import plan_units, unit_order  # noqa: E402

TAIL_SHARE, TAIL_FROM_S, TAIL_ALPHA = 0.005, 1.0, 1.5
RESTART_S = 5.0  # a worker ended by the time limit is replaced by Ray (measured: a few seconds here)


def video_costs(n: int, limit_s: float, seed: int, tail_share: float = TAIL_SHARE, noise: float = 0.5,
                missed: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(true cost, expected cost as the plan records it) of each video."""
    rng = np.random.default_rng(seed)
    cost = rng.lognormal(mean=np.log(0.17), sigma=0.6, size=n)
    tail = rng.random(n) < tail_share
    cost[tail] = TAIL_FROM_S * (1.0 + rng.pareto(TAIL_ALPHA, size=int(tail.sum())))
    over = cost > limit_s
    cost[over] = limit_s + RESTART_S
    expected = cost * rng.lognormal(0.0, noise, size=n)
    unseen = tail & (rng.random(n) < missed)
    expected[unseen] = rng.lognormal(mean=np.log(0.17), sigma=0.6, size=int(unseen.sum()))
    return cost, expected


def simulate(costs: np.ndarray, shard: int, per_task: int, workers: int, overhead_s: float,
             expected: np.ndarray | None = None) -> float:
    """Makespan of the plan on `workers` (units in the driver's order, each to the first free worker): plan
    order, or with `expected` costs the likely-slow units first (`unit_order`)."""
    sizes = [(i, min(shard, len(costs) - s)) for i, s in enumerate(range(0, len(costs), shard))]
    units = plan_units(sizes, per_task)
    bounds = np.cumsum([0] + [u.count for u in units])
    unit_cost = np.add.reduceat(costs, bounds[:-1]) + overhead_s
    if expected is not None:
        position = {(u.index, u.start): n for n, u in enumerate(units)}
        guess = np.add.reduceat(expected, bounds[:-1]).tolist()
        unit_cost = unit_cost[[position[(u.index, u.start)] for u in unit_order(units, guess)]]
    free = [0.0] * workers
    heapq.heapify(free)
    end = 0.0
    for c in unit_cost:
        t = heapq.heappop(free) + c
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", default="18000,2000000")
    ap.add_argument("--workers", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--per-task", type=int, default=4)
    ap.add_argument("--shard", type=int, default=128)
    ap.add_argument("--overhead-ms", type=float, default=20.0)
    ap.add_argument("--limit-s", type=float, default=30.0)
    ap.add_argument("--tail", type=float, default=TAIL_SHARE, help="share of stragglers (default: %(default)s)")
    ap.add_argument("--noise", type=float, default=0.5, help="sigma of the expected cost's log-normal error")
    ap.add_argument("--missed", type=float, default=0.0, help="share of stragglers the expected cost misses")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    overhead = args.overhead_ms / 1000
    for n in (int(x) for x in args.videos.split(",")):
        costs, expected = video_costs(n, args.limit_s, args.seed, args.tail, args.noise, args.missed)
        total = float(costs.sum())
        print(f"\n{n} videos: {total / 3600:.1f} core-hours, median {np.median(costs):.2f} s, p99 "
              f"{np.quantile(costs, 0.99):.1f} s, max {costs.max():.1f} s; shards of {args.shard}, overhead "
              f"{args.overhead_ms:g} ms per task")
        cell = f"{'makespan':>10} {'effic.':>7} {'idle core-h':>12}"
        head = (f"{'workers':>7} | {'one task per shard':^33} | {f'units of {args.per_task}, plan order':^33} | "
                f"{f'units of {args.per_task}, slow first':^33}\n{'':>7} | {cell} | {cell} | {cell}")
        print(head)
        print("-" * len(head.splitlines()[1]))
        for w in (int(x) for x in args.workers.split(",")):
            cells = []
            for per_task, guess in ((args.shard, None), (args.per_task, None), (args.per_task, expected)):
                span = simulate(costs, args.shard, per_task, w, overhead, guess)
                cells.append(f"{_dur(span):>10} {total / w / span:>7.1%} {(w * span - total) / 3600:>12.2f}")
            print(f"{w:>7} | " + " | ".join(cells), flush=True)
    print("\nefficiency = (total cost / workers) / makespan; idle = workers x makespan - total cost")
    return 0


def _dur(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
