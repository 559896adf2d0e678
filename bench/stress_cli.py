"""Does a read-only CLI ever die after its work is done? Run each one N times while every CPU is busy.

    .venv/bin/python -m bench.stress_cli [--runs 100] [--commands order,stats,inspect,eval,verify] [--load 0]

A native thread pool that is still running when the interpreter tears down (pyarrow's readers and filesystems,
Ray, torch's loader workers) can abort a process that has already printed its result: "terminate called without
an active exception", exit by SIGABRT. That is rare and load-dependent, so this runs each command `--runs` times
while `--load` busy processes (default: one per CPU) compete for the cores, and counts every run that did not
exit 0 (an abort: a negative exit status, or "terminate called" on stderr).

The data are made once into .cache/stress/: 16 synthetic samples in 4 shards with a manifest
(tests/train_fixtures.py), a label index, and a tiny finetuned checkpoint (one epoch of `cavmae-train finetune`,
4 steps).
`verify` runs only when `cavmae-prep verify` exists.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

CACHE = REPO / ".cache" / "stress"
TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64", "data.num_workers=0",
        "video.num_frames=4"]


def _sets(sets: list[str]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def prepare() -> dict[str, Path]:
    """The shard folder, the label index and the finetuned checkpoint (made once)."""
    from train_fixtures import label_index_csv, write_synthetic_shards

    shards, labels, ckpt = CACHE / "shards", CACHE / "labels.csv", CACHE / "ft" / "model.pth"
    if not (shards / "manifest.parquet").is_file():
        write_synthetic_shards(shards, 16, 4)
    if not labels.is_file():
        label_index_csv(labels)
    if not ckpt.is_file():
        res = subprocess.run([sys.executable, "-m", "cavmae.train.cli", "finetune", "--shards", str(shards), "--labels",
                              str(labels), "--out", str(ckpt.parent),
                              *_sets(TINY + ["finetune.batch_size=4", "finetune.epochs=1", "finetune.wa=false"])],
                             cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0 or not ckpt.is_file():
            sys.exit(f"stress_cli: cannot make the checkpoint:\n{res.stderr[-3000:]}")
    return {"shards": shards, "labels": labels, "ckpt": ckpt}


def commands(data: dict[str, Path], out: Path) -> dict[str, list[str]]:
    prep, train = [sys.executable, "-m", "cavmae.preprocess.cli"], [sys.executable, "-m", "cavmae.train.cli"]
    shards = str(data["shards"])
    return {
        "order": [*train, "order", "--shards", shards, "--epoch", "2", "--world-size", "2", "--rank", "1",
                  *_sets(TINY + ["pretrain.batch_size=2"])],
        "stats": [*prep, "stats", shards, "--out", str(out), "--no-progress", "--workers", "1", "--rows", "128"],
        "inspect": [*prep, "inspect", shards, "--random", "2", "--out", str(out / "look.png")],
        "eval": [*train, "eval", "--shards", shards, "--checkpoint", str(data["ckpt"]), "--labels",
                 str(data["labels"]), *_sets(TINY)],
        "verify": [*prep, "verify", shards, "--no-progress", "--workers", "1",
                   *_sets(["video.num_frames=4", "video.image_size=64"])],  # (the synthetic shards' own settings)
    }


def _busy(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100, help="runs per command (default %(default)s)")
    ap.add_argument("--commands", default="order,stats,inspect,eval,verify")
    ap.add_argument("--load", type=int, default=0, help="busy processes during the runs (default: one per CPU)")
    args = ap.parse_args(argv)
    data = prepare()
    out = CACHE / "out"
    out.mkdir(parents=True, exist_ok=True)
    table = commands(data, out)
    wanted = [c for c in args.commands.split(",") if c]
    has_verify = "verify" in subprocess.run([sys.executable, "-m", "cavmae.preprocess.cli", "--help"], cwd=REPO,
                                            capture_output=True, text=True).stdout
    if "verify" in wanted and not has_verify:
        print("stress_cli: no `cavmae-prep verify` here; skipped")
        wanted.remove("verify")
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True)
            for _ in range(args.load or os.cpu_count() or 1)]
    for p in load:
        p.start()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"{'command':>8} | {'runs':>5} {'ok':>5} {'aborts':>7} {'other':>6} {'s/run':>6}")
    total_aborts = total_runs = 0
    try:
        for name in wanted:
            counts: Counter[str] = Counter()
            started = time.time()
            for _ in range(args.runs):
                res = subprocess.run(table[name], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
                if res.returncode < 0 or "terminate called" in res.stderr:
                    counts["abort"] += 1
                    print(f"stress_cli: {name}: exit {res.returncode}: {res.stderr.strip()[-300:]}", file=sys.stderr)
                elif res.returncode != 0:
                    counts["other"] += 1
                    print(f"stress_cli: {name}: exit {res.returncode}: {res.stderr.strip()[-300:]}", file=sys.stderr)
                else:
                    counts["ok"] += 1
            total_aborts += counts["abort"]
            total_runs += args.runs
            print(f"{name:>8} | {args.runs:>5} {counts['ok']:>5} {counts['abort']:>7} {counts['other']:>6} "
                  f"{(time.time() - started) / args.runs:>6.1f}", flush=True)
    finally:
        stop.set()
        for p in load:
            p.join()
    print(f"\n{total_aborts} aborts in {total_runs} runs, with {len(load)} busy processes on {os.cpu_count()} CPUs")
    return 1 if total_aborts else 0


if __name__ == "__main__":
    sys.exit(main())
