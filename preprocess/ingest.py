"""The ingest job: inputs → plan of shard-sized groups → one Ray task per shard → manifest.

Exactly-once without coordination:
- The pending inputs are sorted and cut into groups of `shards.samples_per_shard`; the plan (shard index →
  inputs) is saved to `_plan.json` *before* any task starts, so a re-run after a crash rebuilds the very same
  shards instead of regrouping (byte-identical to an uninterrupted run).
- A task decodes its group, writes its shard under a temporary name and renames it, then writes its
  manifest fragment the same way. A retried task rewrites the same bytes.
- The driver folds the fragments into `manifest.parquet` (atomically) and only then deletes the plan and
  the fragments. A run that dies anywhere leaves a state the next run completes.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shards.config import Config, ConfigError, check_choice
from shards.manifest import MANIFEST, PARTS, fragment_path, merge_rows, read_manifest, write_rows
from shards.writer import write_shard

from .inputs import InputItem, LabelIndex, collect_inputs

PLAN = "_plan.json"
FROZEN_CONFIG = "pipeline.yaml"
SAMPLE_SECTIONS = ("audio", "video", "clip")


@dataclass
class Summary:
    ok: int = 0          # samples written in this run
    failed: int = 0      # inputs that failed in this run
    skipped: int = 0     # inputs recorded as skipped in this run (duplicates, unknown labels, ...)
    already: int = 0     # inputs the manifest already held
    seconds: float = 0.0
    videos: int = 0      # inputs processed in this run
    problems: list[str] = field(default_factory=list)  # "source: reason" for each failed or skipped input

    def line(self) -> str:
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        return (f"ok {self.ok} samples, failed {self.failed}, skipped {self.skipped}, already done {self.already}"
                f" | {self.videos} videos in {self.seconds:.1f} s ({rate:.2f} videos/s)")


def ingest(inputs: list[str], out: str | os.PathLike, cfg: Config, *, labels_csv: str | None = None,
           label_index_csv: str | None = None, labels_from_folders: bool = False, retry_failed: bool = False,
           workers: int | None = None, address: str | None = None, progress: bool = False) -> Summary:
    """Ingest `inputs` into shards under `out`; resumable (see the module docstring)."""
    check_choice(cfg, "audio.channel_policy", ("first", "mix"))
    check_choice(cfg, "clip.mode", ("first", "windows"))
    start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_frozen_config(out, cfg)
    label_index = LabelIndex.read(label_index_csv) if label_index_csv else None
    items = collect_inputs(inputs, labels_csv=labels_csv, label_index=label_index,
                           labels_from_folders=labels_from_folders)
    _remove_temporaries(out)

    rows = read_manifest(out)
    holds = {r["video_id"]: r["status"] for r in rows}
    groups = _pending_plan(out)
    planned = {it.video_id for _, group in groups for it in group}
    todo = [it for it in items if it.video_id not in planned and it.error is None
            and (holds.get(it.video_id) is None or (retry_failed and holds[it.video_id] == "failed"))]
    skipped_rows = [_row(it, "skipped", it.error, cfg) for it in items
                    if it.error is not None and it.video_id not in holds]
    groups += _cut(todo, cfg.shards.samples_per_shard, first_index=_next_index(rows, groups))
    redo = {it.video_id for it in todo}
    summary = Summary(already=sum(1 for it in items if it.video_id in holds and it.video_id not in redo),
                      skipped=len(skipped_rows))
    if groups:
        _save_plan(out, groups, cfg)
        new_rows = _run_groups(groups, out, cfg, workers=workers, address=address, progress=progress)
        summary.videos = sum(len(g) for _, g in groups)
        summary.ok = sum(r["status"] == "ok" for r in new_rows)
        summary.failed = sum(r["status"] == "failed" for r in new_rows)
        rows = merge_rows(rows, new_rows)
        summary.problems += [f"{r['source']}: {r['error']}" for r in new_rows if r["status"] == "failed"]
    summary.problems += [f"{r['source']}: {r['error']}" for r in skipped_rows]
    rows = merge_rows(rows, skipped_rows)
    write_rows(out / MANIFEST, rows)
    (out / FROZEN_CONFIG).write_text(cfg.to_yaml())
    _clear_run_state(out)
    summary.seconds = time.time() - start
    return summary


def _check_frozen_config(out: Path, cfg: Config) -> None:
    """Refuse to mix samples made with different settings in one folder (reprocess makes a new one)."""
    frozen = out / FROZEN_CONFIG
    if not frozen.exists():
        return
    from shards.config import load_config

    old = load_config(frozen)
    if old.digest(*SAMPLE_SECTIONS) != cfg.digest(*SAMPLE_SECTIONS):
        raise ConfigError(f"{out}: holds shards made with other audio/video/clip settings "
                          f"(see {frozen}); use a new --out, or `cavmae-prep reprocess`")


def _remove_temporaries(out: Path) -> None:
    """Half-written files of a killed run (never visible under their final names)."""
    for tmp in list(out.glob(".*.tmp-*")) + list((out / PARTS).glob(".*.tmp-*")):
        tmp.unlink(missing_ok=True)


def _pending_plan(out: Path) -> list[tuple[int, list[InputItem]]]:
    """Groups of an interrupted run whose fragments are not written yet (those are rebuilt identically)."""
    path = out / PLAN
    if not path.exists():
        return []
    plan = json.loads(path.read_text())
    groups = [(g["index"], [InputItem.from_dict(it) for it in g["items"]]) for g in plan["groups"]]
    return [(i, g) for i, g in groups if not fragment_path(out, plan["pattern"] % i).exists()]


def _save_plan(out: Path, groups: list[tuple[int, list[InputItem]]], cfg: Config) -> None:
    (out / PARTS).mkdir(exist_ok=True)
    plan = {"pattern": cfg.shards.pattern,
            "groups": [{"index": i, "items": [asdict(it) for it in g]} for i, g in groups]}
    tmp = out / f".{PLAN}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, out / PLAN)


def _clear_run_state(out: Path) -> None:
    for frag in (out / PARTS).glob("*.parquet") if (out / PARTS).is_dir() else []:
        frag.unlink()
    if (out / PARTS).is_dir():
        (out / PARTS).rmdir()
    (out / PLAN).unlink(missing_ok=True)


def _next_index(rows: list[dict[str, Any]], groups: list[tuple[int, list[InputItem]]]) -> int:
    """One past the highest shard index in use (by the manifest, the pending plan or a failures-only group)."""
    used = [i for i, _ in groups] + [int(re.sub(r"\D", "", Path(r["shard"]).stem)) for r in rows if r["shard"]]
    return max(used, default=-1) + 1


def _cut(items: list[InputItem], size: int, first_index: int) -> list[tuple[int, list[InputItem]]]:
    if size < 1:
        raise ConfigError(f"config 'shards.samples_per_shard' must be >= 1; got {size}")
    return [(first_index + n, items[s:s + size]) for n, s in enumerate(range(0, len(items), size))]


def _row(item: InputItem, status: str, error: str | None, cfg: Config, **extra: Any) -> dict[str, Any]:
    return {"video_id": item.video_id, "key": None, "window": None, "source": item.path, "status": status,
            "error": error, "shard": None, "labels": list(item.labels), "duration_s": None, "bytes": None,
            "config_digest": cfg.digest(*SAMPLE_SECTIONS), **extra}


def process_group(index: int, items: list[InputItem], out: str, cfg_data: dict[str, Any]) -> list[dict[str, Any]]:
    """One shard: decode every input of the group, write the shard and its manifest fragment, return rows."""
    from preprocess.decode import BadInput
    from preprocess.sample import build_samples

    cfg = Config(cfg_data)
    name = cfg.shards.pattern % index
    members: list[tuple[str, bytes]] = []
    rows: list[dict[str, Any]] = []
    for item in items:
        try:
            samples = build_samples(item.path, item.video_id, item.path, list(item.labels),
                                    list(item.label_indices) if item.label_indices is not None else None, cfg)
        except BadInput as exc:
            rows.append(_row(item, "failed", _one_line(exc), cfg))
            continue
        except Exception as exc:  # a decoder bug on one file must not take the shard down with it
            rows.append(_row(item, "failed", _one_line(f"{type(exc).__name__}: {exc}"), cfg))
            continue
        for s in samples:
            members += s.members
            rows.append(_row(item, "ok", None, cfg, key=s.key, window=s.meta.get("window"), shard=name,
                             duration_s=s.meta.get("duration_s"), bytes=sum(len(d) for _, d in s.members)))
    if members:
        write_shard(Path(out) / name, members)
    write_rows(fragment_path(out, name), rows)
    return rows


def _one_line(exc: Exception | str) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _run_groups(groups: list[tuple[int, list[InputItem]]], out: Path, cfg: Config, *, workers: int | None,
                address: str | None, progress: bool) -> list[dict[str, Any]]:
    import ray
    from tqdm import tqdm

    started = _ray_init(cfg, workers, address)
    try:
        task = ray.remote(num_cpus=cfg.ray.num_cpus_per_task, max_retries=cfg.ray.max_retries)(process_group)
        cfg_ref = ray.put(cfg.to_dict())
        pending = {task.remote(i, g, str(out.resolve()), cfg_ref): len(g) for i, g in groups}
        rows: list[dict[str, Any]] = []
        failed = 0
        with tqdm(total=sum(pending.values()), unit="video", disable=not progress, desc="ingest") as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    got = ray.get(ref)
                    rows += got
                    failed += sum(r["status"] == "failed" for r in got)
                    bar.update(pending.pop(ref))
                    bar.set_postfix(failed=failed)
        return rows
    finally:
        if started:
            ray.shutdown()


def _ray_init(cfg: Config, workers: int | None, address: str | None) -> bool:
    """Join `address` / RAY_ADDRESS / cfg.ray.address if given, else start a local Ray. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        n = workers or cfg.ray.workers or os.cpu_count() or 1
        ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    return True
