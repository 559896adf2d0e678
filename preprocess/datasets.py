"""The datasets' own published lists as ingest inputs: AudioSet segment CSVs, VGGSound, Kinetics and ESC-50.

A list names clips by YouTube id and a segment of the original video (ESC-50: by file name, whole 5 s files). Each
row becomes an `InputItem` whose file is looked up by id in the videos folder (`--videos-dir`, recursive, any
media extension), as `{id}.{ext}` or as the names downloaders give cut clips, `{id}_{start}.{ext}` and
`{id}_{start}_{end}.{ext}` (e.g. the official `KlsG1EnBEjc_000361.mp4`, `00W1lcxW-WU_40.000.mp4`). The row's
segment travels with the item: the decoder takes [start, end) of the file, or the whole file when it is already the
cut segment (`preprocess.decode.Segment`). A row whose file is not there becomes a skipped item
("no file for YTID ..."). What the list says beyond labels (format, id, split, fold) goes into the sample's json
(`dataset`), so a finetune can tell the splits or folds apart.

Formats, recognised from their first lines (or named with `--list-format`):
  audioset  `# YTID, start_seconds, end_seconds, positive_labels` (comment lines; labels a quoted list of mids)
  vggsound  `ytid,start,label,split` without a header: 10 s from `start`, a display-name label
  kinetics  `label,youtube_id,time_start,time_end,split` with that header (the test list has no label column)
  esc50     `meta/esc50.csv`: `filename,fold,target,category,...`; files in `../audio/` unless --videos-dir
`--split` keeps the rows of the given splits (ESC-50: folds), comma-separated: `--split train`, `--split 1,2,3,4`;
a split the list does not hold is an error naming the ones it holds (a typo would otherwise keep no row at all).
Every list is read as UTF-8 without a byte-order mark (`shards.store.open_text`), and a header without the columns of
its format (a list given with another `--list-format` than its own) is one line naming them.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cavmae.shards.store import open_text
from cavmae.shards.textlist import require_columns

from .inputs import MEDIA_EXTENSIONS, InputError, InputItem

FORMATS = ("audioset", "vggsound", "kinetics", "esc50")
KINETICS_COLUMNS = ("youtube_id", "time_start", "time_end")  # (label: not in the test lists; split: optional)
ESC50_COLUMNS = ("filename", "fold", "target", "category")
VGGSOUND_SECONDS = 10.0
_SNIFF_LINES = 20


@dataclass(frozen=True)
class ListOptions:
    """How dataset lists are read: `format` auto or one of FORMATS; `videos_dir` where the files are (default:
    the list's folder; ESC-50's `audio/` beside `meta/`); `split` the splits (or folds) kept, None for all."""

    format: str = "auto"
    videos_dir: str | None = None
    split: tuple[str, ...] | None = None


def dataset_items(arg: str, options: ListOptions | None) -> list[InputItem] | None:
    """The items of `arg` when it is a dataset list (recognised, or `options.format` names one), else None."""
    path = Path(arg)
    if "://" in arg or not path.is_file() or path.suffix.lower() not in (".csv", ".txt"):
        return None
    options = options or ListOptions()
    fmt = list_format(path, options.format)
    if fmt is None:
        return None
    rows = list_rows(path, fmt, options.split)
    default_dir = path.parent.parent / "audio" if fmt == "esc50" else path.parent
    videos = Path(options.videos_dir) if options.videos_dir else default_dir
    if not videos.is_dir():
        raise InputError(f"--videos-dir {videos}: no such folder (where the files of {path} are)")
    found = _index_files(videos)
    return [_item(r, found, videos, fmt) for r in rows]


def list_format(path: Path, requested: str = "auto") -> str | None:
    """The format of the list `path`: `requested` (one of FORMATS), or sniffed when "auto" (None: not a list)."""
    fmt = sniff(path) if requested == "auto" else requested
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"--list-format {fmt!r}: not one of auto, {', '.join(FORMATS)}")
    return fmt


def list_rows(path: Path, fmt: str, split: tuple[str, ...] | None = None) -> list[Row]:
    """The rows of the `fmt` list `path`, those of `split` only when given (ingest's items, fetch's downloads)."""
    rows = _READERS[fmt](path)
    if split is not None:
        if fmt == "audioset":
            raise InputError(f"{path}: AudioSet lists have no split column (each CSV is one split); drop --split")
        held = list(dict.fromkeys(r.split for r in rows if r.split is not None))
        if rows and not held:
            raise InputError(f"{path}: this list has no split column; drop --split")
        unknown = [s for s in split if s not in held]
        if unknown:
            what = "fold" if fmt == "esc50" else "split"
            raise InputError(f"--split {','.join(unknown)}: not a {what} of {path}, which holds "
                             + (f"the {what}s {', '.join(held)}" if held else "no rows"))
        rows = [r for r in rows if r.split in split]
    return rows


def sniff(path: Path) -> str | None:
    """The list format of `path` from its first lines, or None (a plain path list)."""
    try:
        with open_text(path, newline="") as f:
            lines = [line for _, line in zip(range(_SNIFF_LINES), f)]
    except (OSError, UnicodeDecodeError):
        return None
    comments = [line.lstrip("# ").lower() for line in lines if line.startswith("#")]
    rows = list(csv.reader((line for line in lines if line.strip() and not line.startswith("#")),
                           skipinitialspace=True))
    if any(c.startswith("ytid, start_seconds") or c.startswith("ytid,start_seconds") for c in comments):
        return "audioset"
    if not rows:
        return None
    header = [c.strip().lower() for c in rows[0]]
    if header[:4] == list(ESC50_COLUMNS):
        return "esc50"
    if set(KINETICS_COLUMNS) <= set(header):
        return "kinetics"
    if all(len(r) == 4 and _is_number(r[1]) and r[3].strip() in ("train", "test") for r in rows):
        return "vggsound"
    return None


@dataclass(frozen=True)
class Row:
    """One row of a list: the clip `video_id` (its sample's id) of the YouTube video `ytid`, its segment."""

    where: str                     # list:line, for skipped rows
    ytid: str
    video_id: str
    start_s: float | None          # None: the whole file (ESC-50)
    end_s: float | None
    labels: tuple[str, ...]
    split: str | None
    extra: tuple[tuple[str, object], ...] = ()
    label_index: int | None = None  # ESC-50's `target`


def _read(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-comment, non-empty row."""
    try:
        with open_text(path, newline="") as f:
            numbered = [(n, line) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read dataset list ({exc})") from None
    return [(n, cells) for (n, _), cells in zip(numbered, csv.reader((line for _, line in numbered),
                                                                     skipinitialspace=True))]


def _header(path: Path, rows: list[tuple[int, list[str]]], required: tuple[str, ...], what: str) -> list[str]:
    """The first row as the header of a `what` list (cells stripped, lower case), checked for `required`."""
    header = [c.strip().lower() for c in rows[0][1]] if rows else []
    require_columns(path, header, required, what, InputError)
    return header


def _bad(path: Path, n: int, what: str) -> InputError:
    return InputError(f"{path}:{n}: {what}")


def _seconds(path: Path, n: int, text: str) -> float:
    if not _is_number(text):
        raise _bad(path, n, f"{text!r} is not a time in seconds")
    return float(text)


def _audioset(path: Path) -> list[Row]:
    out = []
    for n, cells in _read(path):
        if len(cells) < 4:
            raise _bad(path, n, "an AudioSet row is YTID, start_seconds, end_seconds, positive_labels")
        ytid, start, end = cells[0].strip(), _seconds(path, n, cells[1]), _seconds(path, n, cells[2])
        labels = tuple(x.strip() for cell in cells[3:] for x in cell.split(",") if x.strip())
        out.append(Row(f"{path}:{n}", ytid, ytid, start, end, labels, None, (("ytid", ytid),)))
    return out


def _vggsound(path: Path) -> list[Row]:
    out = []
    for n, cells in _read(path):
        if len(cells) != 4:
            raise _bad(path, n, "a VGGSound row is ytid,start,label,split")
        ytid, start = cells[0].strip(), _seconds(path, n, cells[1])
        split = cells[3].strip()
        out.append(Row(f"{path}:{n}", ytid, f"{ytid}_{int(start):06d}", start, start + VGGSOUND_SECONDS,
                        (cells[2].strip(),), split, (("ytid", ytid), ("split", split))))
    return out


def _kinetics(path: Path) -> list[Row]:
    rows = _read(path)
    header = _header(path, rows, KINETICS_COLUMNS, "a Kinetics list")
    col = {name: i for i, name in enumerate(header)}
    out = []
    for n, cells in rows[1:]:
        if len(cells) != len(header):
            raise _bad(path, n, f"{len(cells)} cells under a header of {len(header)}")
        ytid = cells[col["youtube_id"]].strip()
        start, end = _seconds(path, n, cells[col["time_start"]]), _seconds(path, n, cells[col["time_end"]])
        label = cells[col["label"]].strip() if "label" in col else ""
        split = cells[col["split"]].strip() if "split" in col else None
        extra = (("ytid", ytid),) + ((("split", split),) if split is not None else ())
        out.append(Row(f"{path}:{n}", ytid, ytid, start, end, (label,) if label else (), split, extra))
    return out


def _esc50(path: Path) -> list[Row]:
    rows = _read(path)
    header = _header(path, rows, ESC50_COLUMNS, "an ESC-50 list")
    at = [header.index(name) for name in ESC50_COLUMNS]
    out = []
    for n, cells in rows[1:]:
        if len(cells) != len(header):
            raise _bad(path, n, f"{len(cells)} cells under a header of {len(header)}")
        name, fold, target, category = (cells[i].strip() for i in at)
        if not fold.isdigit() or not target.isdigit():
            raise _bad(path, n, f"fold {fold!r} and target {target!r} must be whole numbers")
        stem = Path(name).stem
        out.append(Row(f"{path}:{n}", stem, stem, None, None, (category,), fold,
                        (("fold", int(fold)), ("target", int(target))), label_index=int(target)))
    return out


_READERS = {"audioset": _audioset, "vggsound": _vggsound, "kinetics": _kinetics, "esc50": _esc50}


def _index_files(folder: Path) -> dict[str, list[Path]]:
    """Media files under `folder` by the ids they may hold: the stem, and the stem without one or two trailing
    `_<number>` parts (a cut clip's start and end), exact stems first."""
    exact: dict[str, list[Path]] = {}
    cut: dict[str, list[Path]] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            p = Path(root) / name
            if name.startswith(".") or p.suffix.lower() not in MEDIA_EXTENSIONS:
                continue
            stem = p.stem
            exact.setdefault(stem, []).append(p)
            for _ in range(2):
                head, _, tail = stem.rpartition("_")
                if not head or not _is_number(tail):
                    break
                stem = head
                cut.setdefault(stem, []).append(p)
    return {k: exact.get(k, []) + cut.get(k, []) for k in exact.keys() | cut.keys()}


def _item(row: Row, found: dict[str, list[Path]], videos: Path, fmt: str) -> InputItem:
    dataset = {"format": fmt, **dict(row.extra)}
    segment = None if row.start_s is None else (row.start_s, row.end_s)
    files = found.get(row.video_id) or found.get(row.ytid) or []
    if segment is not None and len(files) > 1:  # cut clips of several segments of one video: the one that starts here
        files = [p for p in files if _named_start(p, row.ytid) in (None, row.start_s)] or files
    indices = None if row.label_index is None else (row.label_index,)
    if not files:
        what = "" if fmt == "esc50" else "YTID "
        return InputItem(row.video_id, row.where, row.labels, indices, segment=segment, dataset=dataset,
                         error=f"no file for {what}{row.ytid!r} in {videos}")
    path = files[0].resolve()
    return InputItem(row.video_id, str(path), row.labels, indices, folder=path.parent.name, segment=segment,
                     dataset=dataset)


def _named_start(path: Path, ytid: str) -> float | None:
    """The start a cut clip's name gives (`{ytid}_{start}[_{end}]`), None for `{ytid}.ext`."""
    rest = path.stem[len(ytid) + 1:].split("_")
    return float(rest[0]) if path.stem != ytid and rest and _is_number(rest[0]) else None


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False
