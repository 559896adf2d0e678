"""The pictures of `cavmae-prep stats` and `cavmae-prep inspect`, drawn with matplotlib's object API (a `Figure`
on the Agg canvas, no pyplot state), so they work headless and inside Ray workers alike."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 80
LABEL_CHARS = 48  # longer bar labels and titles are cut (the JSON has them whole)


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _cut(text: str, n: int = LABEL_CHARS) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _bars(ax: Any, counts: list[tuple[str, int]], title: str, empty: str, color: str, slots: int = 10) -> None:
    """Horizontal bars, the largest on top, each named inside its bar with its count at the end; at least `slots`
    bar positions so one bar does not fill the panel."""
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_yticks([])
    if not counts:
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
        ax.set_xticks([])
        return
    names, values = zip(*counts)
    pos = -np.arange(len(values))
    ax.barh(pos, values, height=0.8, color=color, alpha=0.45)
    ax.set_ylim(-max(len(values), slots) + 0.5, 0.6)
    ax.set_xlim(0, max(values) * 1.12)
    for y, name, v in zip(pos, names, values):
        ax.text(max(values) * 0.01, y, _cut(name, 80), va="center", fontsize=9)
        ax.text(v, y, f" {v}", va="center", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("count")


def stats_figure(stats: dict[str, Any], top: int = 20) -> Figure:
    """Four panels: duration histogram, label frequency, mean log-mel per mel bin (±1 std), failure reasons; the
    headline numbers (counts, both normalisation figures, the frames' mean colour as a swatch) in the title."""
    fig = Figure(figsize=(14, 9), layout="constrained")
    (ax_dur, ax_lab), (ax_mel, ax_fail) = fig.subplots(2, 2)
    fb, man = stats["fbank"], stats.get("manifest") or {}
    head = f"{stats['samples']} samples in {stats['shards']} shard(s)"
    if man:
        head += f"   ·   manifest: ok {man['ok']}, failed {man['failed']}, skipped {man['skipped']}"
    if stats["unreadable"]:
        head += f"   ·   unreadable {stats['unreadable']}"
    lines = [head]
    if "mean" in fb:
        pb = fb["padded_batches"]
        lines.append(f"fbank mean {fb['mean']:.4f}  std {fb['std']:.4f} (unpadded)   ·   "
                     f"{pb['mean']:.4f} / {pb['std']:.4f} (batches of {pb['batch_size']} padded to "
                     f"{pb['target_length']} rows)   ·   official -5.081 / 4.4849")
    fig.suptitle("\n".join(lines), fontsize=12)
    rgb = stats["frames"]["mean_rgb"]
    if rgb is not None:
        fig.text(0.995, 0.995, f" frames' mean RGB {tuple(round(c) for c in rgb)} ", ha="right", va="top",
                 fontsize=9, color="white" if sum(rgb) < 3 * 128 else "black",
                 bbox={"facecolor": tuple(c / 255 for c in rgb), "edgecolor": "0.3"})

    dur = stats["duration_s"]
    ax_dur.set_title("sample duration", loc="left", fontsize=11)
    if dur:
        edges, counts = np.array(dur["histogram"]["edges"]), dur["histogram"]["counts"]
        ax_dur.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
        ax_dur.set_xlabel(f"seconds  (min {dur['min']:.2f}, mean {dur['mean']:.2f}, max {dur['max']:.2f}; "
                          f"total {dur['total'] / 3600:.2f} h)")
        ax_dur.set_ylabel("samples")
        ax_dur.yaxis.set_major_locator(MaxNLocator(integer=True))

    labels = [(f"{row['name']} [{row['index']}]" if row.get("index") is not None else row["label"], row["count"])
              for row in stats["label_counts"]]
    more = f" (top {top} of {len(labels)})" if len(labels) > top else ""
    _bars(ax_lab, labels[:top], f"label frequency{more}", "no labels", "tab:green")

    ax_mel.set_title("log-mel per mel bin: mean ± 1 std over all frames", loc="left", fontsize=11)
    if "mean" in fb:
        mean, std = np.array(fb["per_bin_mean"]), np.array(fb["per_bin_std"])
        bins = np.arange(mean.size)
        ax_mel.fill_between(bins, mean - std, mean + std, color="tab:orange", alpha=0.3, linewidth=0)
        ax_mel.plot(bins, mean, color="tab:orange")
        ax_mel.axhline(fb["mean"], color="0.3", linestyle="--", linewidth=1, label=f"overall mean {fb['mean']:.3f}")
        ax_mel.legend(loc="upper right", fontsize=9)
        ax_mel.set_xlabel("mel bin")
        ax_mel.set_ylabel("log-mel energy")
        ax_mel.set_xlim(0, mean.size - 1)

    reasons = [(r, n) for r, n in man.get("failure_reasons", {}).items()]
    reasons += [(f"skipped: {r}", n) for r, n in man.get("skip_reasons", {}).items()]
    reasons += [(f"unreadable: {r}", n) for r, n in stats["unreadable_reasons"].items()]
    reasons.sort(key=lambda rn: -rn[1])
    _bars(ax_fail, reasons[:top], "why inputs failed or were skipped (manifest); unreadable samples", "no failures",
          "tab:red")
    return fig


def _title(sample: dict[str, Any], names: dict[str, str]) -> str:
    meta = sample["meta"]
    labels = ", ".join(names.get(x, x) for x in meta.get("labels") or []) or "no labels"
    window = f"  window {meta['window']}" if meta.get("window") is not None else ""
    return f"{_cut(labels, 60)}   ·   {meta.get('video_id')}{window}   ·   {_cut(_short(str(meta.get('source'))), 70)}"


def _short(source: str) -> str:
    """The source's file name and folder (`.../real/bigbuckbunny.mp4`): where it lay on the machine that ingested
    it says little in a picture and takes the room."""
    parts = source.rsplit("/", 2)
    return f".../{parts[1]}/{parts[2]}" if len(parts) == 3 and parts[0] else source


def sheet_figure(samples: list[dict[str, Any]], frame_shift_s: float, names: dict[str, str] | None = None) -> Figure:
    """One cell per sample: its frames in a row (each titled with its time), the log-mel spectrogram under them on
    the video's time axis in seconds with the frame times marked, and labels · video id · source as the title.
    Cells fill a grid of up to two columns."""
    names = names or {}
    cols = 1 if len(samples) == 1 else 2
    rows = math.ceil(len(samples) / cols)
    fig = Figure(figsize=(10 * cols, 4.4 * rows), layout="constrained")
    cells = np.atleast_1d(fig.subfigures(rows, cols, squeeze=False).ravel())
    for cell, sample in zip(cells, samples):
        _cell(cell, sample, frame_shift_s, names)
    return fig


def _cell(cell: Any, sample: dict[str, Any], frame_shift_s: float, names: dict[str, str]) -> None:
    meta, frames = sample["meta"], sample["frames"]
    cols = max(len(frames), 1)
    grid = cell.add_gridspec(2, cols, height_ratios=[1, 1.25])
    cell.suptitle(_title(sample, names), fontsize=10)
    start = float(meta.get("clip_start_s") or 0.0)
    times = [float(t) for t in meta.get("frame_times_s") or []]
    for i, jpeg in enumerate(frames):
        ax = cell.add_subplot(grid[0, i])
        with Image.open(io.BytesIO(jpeg), formats=["JPEG"]) as image:
            ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_axis_off()
        ax.set_title(f"{i}: {times[i]:.2f} s" if i < len(times) else str(i), fontsize=8)
    if not frames:
        ax = cell.add_subplot(grid[0, :])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no frames (audio-only sample)", ha="center", va="center", color="0.4")
    ax = cell.add_subplot(grid[1, :])
    if sample["fbank"] is None:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no audio (video-only sample)", ha="center", va="center", color="0.4")
        return
    fbank = sample["fbank"].astype(np.float32)
    end = start + fbank.shape[0] * frame_shift_s
    ax.imshow(fbank.T, origin="lower", aspect="auto", cmap="magma", extent=(start, end, 0, fbank.shape[1]),
              interpolation="nearest")
    for i, t in enumerate(times):
        ax.axvline(t, color="cyan", linewidth=1, alpha=0.8)
        ax.text(t, fbank.shape[1], str(i), color="darkcyan", fontsize=8, ha="center", va="bottom")
    ax.set_xlim(start, max(end, times[-1] if times else end))
    ax.set_xlabel("time in the video (s); cyan lines: frame times")
    ax.set_ylabel("mel bin")
