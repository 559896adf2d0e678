"""The ingest job: videos (folders, files, path lists, dataset JSONs) -> samples in shards -> manifest.

A definition run by `preprocess.jobs` (plan, resume, lock, work units, time limit, shards in plan order,
manifest last): the inputs are collected and sorted (`preprocess.inputs`); each video becomes its samples
(`preprocess.sample.iter_samples`; in `clip.mode: windows` one per window, the decoder holding only the open
windows, never the whole video); inputs the manifest already holds are skipped, failed and skipped ones are taken
again only with `retry_failed` (one whose cause remains, such as a file still missing, is recorded as skipped
again with today's reason), and inputs that cannot be taken (unknown labels, duplicates) are recorded as skipped.

Storage: `out` (and any input) may be a local path or a URI (`s3://`, `gs://`, `hdfs://`, `file://`; see
`shards.store`); on a multi-node cluster `out` must be storage every node reaches (a URI, or a shared mount).
Cluster: see `preprocess.cluster` (`--address` / RAY_ADDRESS / `ray.address`, token authentication).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from cavmae.shards.config import Config
from cavmae.shards.frozen import SAMPLE_SECTIONS
from cavmae.shards.schema import safe_text
from cavmae.shards.store import Store, is_uri

from .datasets import ListOptions
from .inputs import InputItem, LabelIndex, collect_inputs
from .jobs import Sample, ShardJob, run_shard_job
from .units import local_copy, manifest_row


@dataclass
class Summary:
    ok: int = 0          # samples written in this run
    failed: int = 0      # inputs that failed in this run
    skipped: int = 0     # inputs recorded as skipped in this run (duplicates, unknown labels, ...)
    already: int = 0     # inputs the manifest already held
    already_failed: int = 0  # of those, the ones it holds as failed or skipped (taken again with retry_failed)
    seconds: float = 0.0
    videos: int = 0      # inputs processed in this run
    problems: list[str] = field(default_factory=list)  # "failed|skipped: source: reason" for each input of this run
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): files of input folders not taken

    def line(self) -> str:
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        return (f"ok {self.ok} samples, failed {self.failed}, skipped {self.skipped}, already done {self.already}"
                f" | {self.videos} videos in {self.seconds:.1f} s ({rate:.2f} videos/s)")


def ingest(inputs: list[str], out: str | os.PathLike, cfg: Config, *, labels_csv: str | None = None,
           label_index_csv: str | None = None, labels_from_folders: bool = False, retry_failed: bool = False,
           workers: int | None = None, address: str | None = None, progress: bool = False,
           lists: ListOptions | None = None) -> Summary:
    """Ingest `inputs` into shards under `out`; resumable (see `preprocess.jobs`). `lists`: how dataset lists
    (AudioSet, VGGSound, Kinetics, ESC-50) are read (`preprocess.datasets`)."""
    start = time.time()
    label_index = LabelIndex.read(label_index_csv) if label_index_csv else None
    ignored: list[tuple[str, str]] = []
    items = collect_inputs(inputs, labels_csv=labels_csv, label_index=label_index,
                           labels_from_folders=labels_from_folders, ignored=ignored, lists=lists)
    summary = Summary(ignored=ignored)
    digest = cfg.digest(*SAMPLE_SECTIONS)

    def pick(rows: list[dict[str, Any]], planned: set[str]) -> tuple[list[InputItem], list[dict[str, Any]]]:
        holds = {r["video_id"]: r["status"] for r in rows}

        def take(it: InputItem) -> bool:  # not held yet, or held as failed/skipped and retried
            return holds.get(it.video_id) is None or (retry_failed and holds[it.video_id] != "ok")

        todo = [it for it in items if it.video_id not in planned and it.error is None and take(it)]
        redo = {it.video_id for it in todo} | planned
        skipped = [manifest_row(*_who(it), "skipped", it.error, digest) for it in items
                   if it.error is not None and it.video_id not in redo and take(it)]
        again = redo | {r["video_id"] for r in skipped}
        already = [holds[it.video_id] for it in items if it.video_id in holds and it.video_id not in again]
        summary.already, summary.already_failed = len(already), sum(status != "ok" for status in already)
        summary.skipped = len(skipped)
        summary.problems += [f"skipped: {r['source']}: {r['error']}" for r in skipped]
        return todo, skipped

    run = run_shard_job(INGEST, Store.of(out), cfg, pick, workers=workers, address=address, progress=progress,
                        desc="ingest")
    summary.videos = run.items
    summary.ok = sum(r["status"] == "ok" for r in run.new)
    summary.failed = sum(r["status"] == "failed" for r in run.new)
    summary.problems[:0] = [f"failed: {r['source']}: {r['error']}" for r in run.new if r["status"] == "failed"]
    summary.seconds = time.time() - start
    return summary


def decode_video(item: InputItem, _ahead: None, cfg: Config) -> Iterator[Sample]:
    """One video's samples (a remote one through a local copy)."""
    from cavmae.preprocess.decode import Segment
    from cavmae.preprocess.sample import iter_samples

    with local_copy(item.path) as path:
        indices = list(item.label_indices) if item.label_indices is not None else None
        segment = Segment(*item.segment) if item.segment is not None else None
        for s in iter_samples(path, item.video_id, safe_text(item.path), list(item.labels), indices, cfg,
                              segment=segment, dataset=item.dataset):
            yield s.key, s.meta, s.members


def _who(item: InputItem) -> tuple[str, str, list[str]]:
    return item.video_id, safe_text(item.path), list(item.labels)


def _file_size(item: InputItem) -> float:
    """The expected cost of a video: its size (a long or high-bitrate file decodes longer); 0 when remote (no
    request per input at planning time)."""
    path = item.path[len("file://"):] if item.path.startswith("file://") else item.path
    if is_uri(path):
        return 0.0
    try:
        return float(os.path.getsize(path))
    except OSError:
        return 0.0


INGEST = ShardJob("ingest", samples=decode_video, who=_who, load=InputItem.from_dict, save=asdict,
                  imports=("cavmae.preprocess.sample",), cost=_file_size)
