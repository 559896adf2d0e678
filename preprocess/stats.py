"""`cavmae-prep stats`: what a shard set holds, and the fbank normalisation statistics of a new dataset.

The official code normalises with AudioSet's mean -5.081 / std 4.4849 and tells users of other data to compute their
own (cav-mae issue #24, AST's `get_norm_stats.py`). This reads every sample once, one Ray task per shard (a row
job of `preprocess.jobs`): a task returns its shard's sums (float64) and a few numbers per sample, never sample
data, and the driver adds them up.
So the figures are exact (a direct numpy pass over the same values agrees to rounding) and the driver's memory
holds only per-sample scalars.

Two normalisation figures, so the user can choose:
- `fbank.mean` / `fbank.std`: over every stored fbank value of the samples (unpadded: what the audio is);
- `fbank.padded_batches`: AST's recipe, the mean over batches of `batch_size` samples (in shard order) of each
  batch's mean and (unbiased) std, each sample zero-padded or cut to the rows of a clip in whole patches
  (`shards.settings.clip_rows`: model.target_length's default, 1024 for 10 s at 10 ms) as the loader feeds it; the
  padding zeros pull both towards 0 for clips shorter than that.

Counts and failure reasons come from the folder's `manifest.parquet`; durations, labels and the frames' mean RGB
from the samples themselves. Every sample is checked against the shards' own sample settings (their pipeline.yaml,
`shards.frozen.adopt_shard_settings`; `shards.validate.check_sample`) before it counts: a sample the reader rejects
is counted under `unreadable` with its reason, and can neither set the fbank width the others are measured
against nor cost more than its configured frame size to decode.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from cavmae.shards.checked import SAMPLE_ERRORS, Skip, checked_samples
from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples, UserError
from cavmae.shards.frozen import adopt_shard_settings
from cavmae.shards.manifest import read_manifest
from cavmae.shards.reader import list_shards
from cavmae.shards.schema import one_line
from cavmae.shards.settings import clip_rows
from cavmae.shards.store import Store, regular_files
from cavmae.shards.validate import SampleSpec

from .inputs import LabelIndex
from .jobs import RowJob, run_row_job

AST_BATCH = 1000  # AST's get_norm_stats.py batch size
HIST_BINS = 20
TOP = 20  # label and failure-reason bars in the picture


def shard_sums(url: str, target_length: int, spec: SampleSpec) -> dict[str, Any]:
    """One shard's contribution: float64 sums over its fbank values (per mel bin), per-sample sums of the padded
    fbank, durations, label counts and RGB sums of every frame, plus the reasons of the samples it could not read
    (each sample checked against `spec` first)."""
    out: dict[str, Any] = {"url": url, "samples": 0, "bins": None, "rows": 0, "sum": None, "sumsq": None,
                           "padded_sum": [], "padded_sumsq": [], "durations": [], "labels": Counter(),
                           "rgb_sum": np.zeros(3), "pixels": 0, "frames": 0, "unreadable": [], "no_audio": 0,
                           "no_video": 0}
    def unreadable(skip: Skip) -> None:
        out["unreadable"].append(f"{url}: rest of the shard unreadable ({one_line(skip.error)})" if skip.key is None
                                 else one_line(skip.error))

    for sample in checked_samples([url], spec.check, unreadable):
        try:
            _add_sample(out, sample, target_length)
        except SAMPLE_ERRORS as exc:  # its frames' pixels do not decode
            out["unreadable"].append(one_line(exc))
    for name in ("padded_sum", "padded_sumsq", "durations"):  # compact for the trip to the driver
        out[name] = np.asarray(out[name], dtype=np.float64)
    return out


def _add_sample(out: dict[str, Any], sample: dict[str, Any], target_length: int) -> None:
    """A sample's share; a video-only one (no fbank) or audio-only one (no frames) is counted as such."""
    fbank = None if sample["fbank"] is None else sample["fbank"].astype(np.float64)
    if fbank is not None and out["bins"] is None:  # (every sample has the width of the settings: `check_sample`)
        out["bins"], out["sum"], out["sumsq"] = fbank.shape[1], np.zeros(fbank.shape[1]), np.zeros(fbank.shape[1])
    rgb, pixels = np.zeros(3), 0
    for jpeg in sample["frames"]:
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
            pix = np.asarray(image.convert("RGB")).reshape(-1, 3)
        rgb += pix.sum(0, dtype=np.float64)
        pixels += pix.shape[0]
    # the sample counts only once everything of it decoded
    out["samples"] += 1
    out["no_video"] += not sample["frames"]
    if fbank is None:
        out["no_audio"] += 1
    else:
        out["rows"] += fbank.shape[0]
        out["sum"] += fbank.sum(0)
        out["sumsq"] += np.square(fbank).sum(0)
        cut = fbank[:target_length]  # padding adds zeros: nothing to the sums, only to the count
        out["padded_sum"].append(float(cut.sum()))
        out["padded_sumsq"].append(float(np.square(cut).sum()))
    out["durations"].append(float(sample["meta"].get("duration_s") or 0.0))
    out["labels"].update(sample["meta"].get("labels") or [])
    out["rgb_sum"] += rgb
    out["pixels"] += pixels
    out["frames"] += len(sample["frames"])


def _shard_rows(item: tuple[str, int], cfg: Config) -> list[dict[str, Any]]:
    """One shard's sums (its samples padded or cut to `rows` for the batch statistics), with a status (so the
    progress bar counts the shard as failed when a sample is not read)."""
    url, rows = item
    sums = shard_sums(url, rows, SampleSpec.of(cfg))
    sums["status"] = "failed" if sums["unreadable"] else "ok"
    return [sums]


STATS = RowJob("stats", rows=_shard_rows, unit="shard")


def merge(parts: list[dict[str, Any]], *, target_length: int, batch_size: int) -> dict[str, Any]:
    """The dataset's figures from the shards' sums (in shard order)."""
    parts = sorted(parts, key=lambda p: p["url"])
    ok = [p for p in parts if p["rows"]]  # shards with some audio
    bins = {p["bins"] for p in ok}
    if len(bins) > 1:
        raise UserError(f"the shards hold fbanks of different widths ({sorted(bins)} mel bins): one set at a time")
    samples = sum(p["samples"] for p in parts)
    missing = {"audio": sum(p["no_audio"] for p in parts), "video": sum(p["no_video"] for p in parts)}
    fbank: dict[str, Any] = {"samples": samples - missing["audio"]}
    if ok:
        (f,) = bins
        rows = sum(p["rows"] for p in ok)
        total, total_sq = sum(p["sum"] for p in ok), sum(p["sumsq"] for p in ok)
        n = rows * f
        mean = total.sum() / n
        bin_mean = total / rows
        fbank.update(
            mean=float(mean), std=float(math.sqrt(max(total_sq.sum() / n - mean ** 2, 0.0))), values=int(n),
            rows=int(rows), num_mel_bins=int(f), per_bin_mean=bin_mean.tolist(),
            per_bin_std=np.sqrt(np.maximum(total_sq / rows - bin_mean ** 2, 0.0)).tolist(),
            padded_batches=_padded_batches(np.concatenate([p["padded_sum"] for p in ok]),
                                           np.concatenate([p["padded_sumsq"] for p in ok]),
                                           per_sample=target_length * f, target_length=target_length,
                                           batch_size=batch_size))
    durations = np.concatenate([p["durations"] for p in parts]) if parts else np.zeros(0)
    pixels = sum(p["pixels"] for p in parts)
    return {
        "shards": len(parts),
        "samples": samples,
        "unreadable": sum(len(p["unreadable"]) for p in parts),
        "missing": missing,  # samples without audio (video-only) / without frames (audio-only)
        "unreadable_reasons": dict(Counter(r for p in parts for r in p["unreadable"]).most_common()),
        "fbank": fbank,
        "duration_s": _durations(durations),
        "label_counts": dict(sum((p["labels"] for p in parts), Counter()).most_common()),
        "frames": {"frames": sum(p["frames"] for p in parts),
                   "mean_rgb": (sum(p["rgb_sum"] for p in parts) / pixels).tolist() if pixels else None},
    }


def _padded_batches(sums: np.ndarray, sumsqs: np.ndarray, *, per_sample: int, target_length: int,
                    batch_size: int) -> dict[str, Any]:
    """AST's get_norm_stats: mean over batches of torch.mean(batch) and torch.std(batch) (unbiased), from each
    sample's sum and sum of squares of its padded fbank."""
    means, stds = [], []
    for start in range(0, len(sums), batch_size):
        s, q = float(sums[start:start + batch_size].sum()), float(sumsqs[start:start + batch_size].sum())
        n = per_sample * len(sums[start:start + batch_size])
        means.append(s / n)
        stds.append(math.sqrt(max((q - s * s / n) / (n - 1), 0.0)) if n > 1 else 0.0)
    return {"mean": float(np.mean(means)), "std": float(np.mean(stds)), "target_length": target_length,
            "batch_size": batch_size, "batches": len(means)}


def _durations(d: np.ndarray) -> dict[str, Any]:
    if not d.size:
        return {}
    counts, edges = np.histogram(d, bins=HIST_BINS)
    return {"min": float(d.min()), "max": float(d.max()), "mean": float(d.mean()), "total": float(d.sum()),
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def manifest_summary(folder: Store) -> dict[str, Any]:
    """Counts by status and the failure / skip reasons of the folder's manifest (empty when it has none)."""
    rows = read_manifest(folder)
    if not rows:
        return {}
    status = Counter(r["status"] for r in rows)
    return {"rows": len(rows), "ok": status["ok"], "failed": status["failed"], "skipped": status["skipped"],
            "failure_reasons": dict(Counter(r["error"] for r in rows if r["status"] == "failed").most_common()),
            "skip_reasons": dict(Counter(r["error"] for r in rows if r["status"] == "skipped").most_common())}


def named_labels(counts: dict[str, int], label_index: LabelIndex | None) -> list[dict[str, Any]]:
    """Label counts, most frequent first, with the display name and class index when a label index is given."""
    names = label_index.display_names() if label_index else {}
    out = []
    for label, n in counts.items():
        row: dict[str, Any] = {"label": label, "count": n}
        if label_index is not None:
            row.update(name=names.get(label, label), index=label_index.index.get(label))
        out.append(row)
    return out


def shard_folder(spec: str, urls: list[str]) -> Store:
    """Where a shard spec's manifest and default outputs live: the folder given, else the first shard's folder."""
    if os.path.isdir(spec):
        return Store.of(spec)
    return Store.split(urls[0])[0]


def compute_stats(spec: str, cfg: Config, *, label_index_csv: str | None = None, batch_size: int = AST_BATCH,
                  rows: int | None = None, workers: int | None = None, address: str | None = None,
                  progress: bool = False) -> dict[str, Any]:
    """Everything `stats.json` holds for the shards of `spec` (one Ray task per shard); the padded batches pad or
    cut each sample to `rows` (default: the clip's rows in whole patches, model.target_length's default)."""
    label_index = LabelIndex.read(label_index_csv) if label_index_csv else None
    urls = regular_files(list_shards(spec))
    folder = shard_folder(spec, urls)
    cfg = adopt_shard_settings(cfg, urls, flag="stats")  # samples are checked against the shards' own settings
    rows = rows or clip_rows(cfg.to_dict())
    parts = run_row_job(STATS, [(url, rows) for url in urls], folder, cfg, workers=workers, address=address,
                        progress=progress, desc="stats")
    stats = {"folder": folder.uri(), **merge(parts, target_length=rows, batch_size=batch_size)}
    if not stats["samples"]:  # as every reading command: no stats.json of nothing
        first = next(iter(stats["unreadable_reasons"]), "the shards hold no sample")
        raise NoSamples(f"no decodable sample in {len(urls)} shard(s) ({stats['unreadable']} unreadable; {first})")
    stats["label_counts"] = named_labels(stats["label_counts"], label_index)
    stats["manifest"] = manifest_summary(folder)
    fb = stats["fbank"]
    if "mean" in fb:
        stats["use"] = {"unpadded": f"--set data.mean={fb['mean']:.4f} --set data.std={fb['std']:.4f}",
                        "padded_batches": f"--set data.mean={fb['padded_batches']['mean']:.4f} "
                                          f"--set data.std={fb['padded_batches']['std']:.4f}"}
    return stats


def write_stats(stats: dict[str, Any], out: Store) -> tuple[str, str]:
    """`stats.json` and `stats.png` into `out`; returns their locations."""
    from .plots import stats_figure, to_png

    out.makedirs()
    out.write_text("stats.json", json.dumps(stats, indent=1) + "\n")
    out.write_bytes("stats.png", to_png(stats_figure(stats)))
    return out.uri("stats.json"), out.uri("stats.png")
