"""What to ingest: expand folders, files, path lists and official dataset JSONs into sorted `InputItem`s,
and attach labels (from the JSON, a `video_id,labels` CSV, or parent folder names).

Every problem with a single input becomes an item with an `error` (a manifest row with status `skipped`),
never an exception; only an argument that cannot be read at all raises `InputError`. Files a folder holds but that
are not taken (other extensions, hidden files and folders, links to folders, and media names that are not
regular files: FIFOs, dangling links, link loops) are listed in `ignored` with the reason when the caller passes a
list, so nothing is left out in silence. A file name that is not UTF-8 is taken: what is recorded of it (video id,
source) is `shards.schema.safe_text` of its bytes. Audio files are taken: without `video.allow_missing` the decoder
records them as failed ("no video stream"), with it they become audio-only samples.

The datasets' own lists (AudioSet, VGGSound, Kinetics, ESC-50) are read by `preprocess.datasets`.
"""

from __future__ import annotations

import csv
import errno
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cavmae.shards.errors import UserError
from cavmae.shards.schema import LABEL_INDEX_LIMIT, safe_text
from cavmae.shards.store import open_text
from cavmae.shards.textlist import require_columns

if TYPE_CHECKING:
    from .datasets import ListOptions

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv")
AUDIO_EXTENSIONS = (".m4a", ".wav", ".flac", ".mp3", ".ogg")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
NOT_MEDIA = "not a video or audio extension"
LIST_EXTENSIONS = (".txt", ".csv", ".lst")


class InputError(UserError):
    """An input argument that cannot be used at all (the message is one line and names it)."""


@dataclass(frozen=True)
class InputItem:
    video_id: str
    path: str
    labels: tuple[str, ...] = ()
    label_indices: tuple[int, ...] | None = None
    folder: str = ""          # parent folder name, for --labels-from-folders
    error: str | None = None  # set when the item must be recorded as skipped instead of processed
    segment: tuple[float, float] | None = None  # [start, end) of the original video a dataset list names
    dataset: dict | None = None                 # what that list says beyond labels (format, split, fold)

    @classmethod
    def from_dict(cls, d: dict) -> "InputItem":
        """Inverse of `dataclasses.asdict` after a JSON round trip (lists back to tuples)."""
        indices, segment = d.get("label_indices"), d.get("segment")
        return cls(**{**d, "labels": tuple(d["labels"]),
                      "label_indices": None if indices is None else tuple(indices),
                      "segment": None if segment is None else tuple(segment)})


@dataclass
class LabelIndex:
    """The official label CSV (`index,mid,display_name`): label id (mid) → class index."""

    index: dict[str, int] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> "LabelIndex":
        table = cls()
        try:
            with open_text(path, newline="") as f:
                reader = csv.DictReader(f)
                reader.fieldnames = [c.strip() for c in reader.fieldnames or ()]
                require_columns(path, reader.fieldnames, ("index", "mid"),
                                "a label index CSV (index,mid,display_name)", InputError)
                for row in reader:
                    if row["index"] is None or row["mid"] is None:
                        raise ValueError(f"line {reader.line_num} has fewer cells than the header")
                    index = int(row["index"])
                    if not 0 <= index < LABEL_INDEX_LIMIT:
                        raise ValueError(f"index {index} of {row['mid']!r} is not in 0..{LABEL_INDEX_LIMIT - 1}")
                    table.index[row["mid"]] = index
                    table.names[row.get("display_name") or row["mid"]] = row["mid"]
        except OSError as exc:
            raise InputError(f"{path}: cannot read label index ({exc.strerror or exc})") from None
        except ValueError as exc:
            raise InputError(f"{path}: bad label index row ({exc})") from None
        return table

    def display_names(self) -> dict[str, str]:
        """Label id (mid) → display name."""
        return {mid: name for name, mid in self.names.items()}

    def lookup(self, label: str) -> int | None:
        """Class index of a label given as its id (mid) or its display name."""
        if label in self.index:
            return self.index[label]
        mid = self.names.get(label)
        return self.index.get(mid) if mid is not None else None


def video_id_of(path: str) -> str:
    """The official video id: the file name without its extension (ids may contain dots; a name that is not UTF-8
    gives `safe_text` of its bytes)."""
    return safe_text(Path(path).stem)


def collect_inputs(args: list[str], *, labels_csv: str | None = None, label_index: LabelIndex | None = None,
                   labels_from_folders: bool = False, ignored: list[tuple[str, str]] | None = None,
                   lists: "ListOptions | None" = None) -> list[InputItem]:
    """Expand input arguments into items sorted by video id (then path), labels attached and checked.

    `ignored`, when given, receives (path, reason) for every file of a folder argument that was not taken.
    `lists`: how dataset lists (`preprocess.datasets`) are read."""
    from .datasets import dataset_items

    items: list[InputItem] = []
    ignored = [] if ignored is None else ignored
    any_list = False
    for arg in args:
        listed = dataset_items(arg, lists)
        any_list |= listed is not None
        items += listed if listed is not None else _expand(arg, ignored)
    if lists is not None and lists.split is not None and not any_list:  # (it would keep every input, unfiltered)
        raise InputError(f"--split {','.join(lists.split)}: none of the inputs is a dataset list (AudioSet, "
                         "VGGSound, Kinetics, ESC-50); --split keeps rows of those")
    if labels_csv:
        table = _read_labels_csv(labels_csv)
        items = [replace(it, labels=split_labels(table[it.video_id], label_index)) if it.video_id in table else it
                 for it in items]
    if labels_from_folders:
        items = [replace(it, labels=(it.folder,) if it.folder else ()) for it in items]
    if label_index is not None:
        items = [_with_indices(it, label_index) for it in items]
    items.sort(key=lambda it: (it.video_id, it.path))
    return _mark_duplicates(items)


def _expand(arg: str, ignored: list[tuple[str, str]]) -> list[InputItem]:
    if "://" in arg.split("?", 1)[0]:
        return _expand_remote(arg, ignored)
    path = Path(arg)
    if path.is_dir():
        return [InputItem(video_id_of(str(p)), str(p.resolve()), folder=safe_text(p.parent.name))
                for p in _scan_folder(path, ignored)]
    if path.suffix.lower() == ".json" and path.is_file():
        return _read_dataset_json(path)
    if path.suffix.lower() in LIST_EXTENSIONS and path.is_file():
        return _read_path_list(path)
    if path.exists() or path.suffix.lower() in MEDIA_EXTENSIONS:
        # a single video, kept even when unreadable: decoding will record why it failed
        return [InputItem(video_id_of(arg), str(path.resolve()), folder=safe_text(path.resolve().parent.name))]
    raise InputError(f"{arg}: no such file or folder")


def _scan_folder(root: Path, ignored: list[tuple[str, str]]) -> list[Path]:
    """Media files under `root` (recursive, sorted); hidden folders and links to folders are not entered, and
    everything not taken goes to `ignored` (a hidden folder as one entry, not its every file)."""
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        for d in sorted(dirs):
            if d.startswith("."):
                ignored.append((str(here / d) + "/", "hidden folder"))
            elif (here / d).is_symlink():  # (os.walk lists it but never enters it: a loop, or a way out)
                ignored.append((str(here / d) + "/", "link to a folder (not followed)"))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for name in sorted(files):
            p = here / name
            if name.startswith("."):
                ignored.append((str(p), "hidden file"))
            elif p.suffix.lower() not in MEDIA_EXTENSIONS:
                ignored.append((str(p), NOT_MEDIA))
            elif p.is_file():
                found.append(p)
            else:
                ignored.append((str(p), _not_regular(p)))
    return found


def _not_regular(path: Path) -> str:
    """Why a media name in a folder is not a regular file to decode."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "dangling link"
    except OSError as exc:
        return "link loop" if exc.errno == errno.ELOOP else f"cannot stat ({exc.strerror or exc})"
    return "not a regular file (a FIFO, device or socket)"


def _expand_remote(uri: str, ignored: list[tuple[str, str]]) -> list[InputItem]:
    """A remote video (`s3://b/v.mp4`) or folder (`s3://b/videos/`, recursive) through `shards.store`."""
    from cavmae.shards.store import Store, is_temp_name

    try:
        store = Store.of(uri)
        if store.is_file(""):
            parent, name = Store.split(uri)
            return [InputItem(video_id_of(name), uri, folder=parent.path().rsplit("/", 1)[-1])]
        listed = [n for n in store.list(recursive=True) if not is_temp_name(n)]
        names = [n for n in listed if Path(n).suffix.lower() in MEDIA_EXTENSIONS]
        ignored += [(store.uri(n), NOT_MEDIA) for n in listed if Path(n).suffix.lower() not in MEDIA_EXTENSIONS]
    except (OSError, ValueError) as exc:
        raise InputError(f"{uri}: cannot list ({exc})") from None
    if not names and not store.exists(""):
        base = uri.split("?", 1)[0].rstrip("/")
        if Path(base).suffix.lower() in MEDIA_EXTENSIONS:   # kept, as a local one: decoding records why
            return [InputItem(video_id_of(base), uri, folder=base.rsplit("/", 2)[-2])]
        raise InputError(f"{uri}: no such file or folder")
    items = []
    for n in names:
        parent = n.rsplit("/", 1)[0] if "/" in n else store.path().rsplit("/", 1)[-1]
        items.append(InputItem(video_id_of(n), store.uri(n), folder=parent.rsplit("/", 1)[-1]))
    return items


def _read_path_list(path: Path) -> list[InputItem]:
    """One video path per line (first CSV column); relative paths are relative to the list's folder."""
    items = []
    try:
        with open_text(path, newline="") as f:
            for row in csv.reader(f):
                if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                    continue
                video = Path(row[0].strip())
                video = video if video.is_absolute() else path.parent / video
                items.append(InputItem(video_id_of(str(video)), str(video.resolve()), folder=video.parent.name))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read path list ({exc})") from None
    return items


def _read_dataset_json(path: Path) -> list[InputItem]:
    """The official dataset JSON: `{"data": [{"video_id", "wav", "video_path", "labels"}]}`.

    Officially `video_path` is a frame folder; here it may be a video file, or a folder holding
    `{video_id}.<ext>` for one of the video extensions.
    """
    try:
        with open_text(path) as f:
            entries = json.load(f)["data"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a dataset JSON with a 'data' list ({exc})") from None
    items = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "video_id" not in entry:
            raise InputError(f"{path}: entry {i} has no video_id")
        vid = safe_text(str(entry["video_id"]))  # (JSON may escape a lone surrogate)
        labels = tuple(x for x in safe_text(str(entry.get("labels", ""))).split(",") if x)
        video = _locate_video(path.parent, vid, str(entry.get("video_path", "")))
        if video is None:
            where = safe_text(str(entry.get("video_path", "")))
            items.append(InputItem(vid, where, labels, error=f"no video file for video_id {vid!r} under {where!r}"))
        else:
            items.append(InputItem(vid, str(video.resolve()), labels, folder=video.parent.name))
    return items


def _locate_video(base: Path, video_id: str, video_path: str) -> Path | None:
    candidate = Path(video_path) if Path(video_path).is_absolute() else base / video_path
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        for ext in VIDEO_EXTENSIONS:
            if (candidate / f"{video_id}{ext}").is_file():
                return candidate / f"{video_id}{ext}"
    return None


def split_labels(cells: tuple[str, ...], index: LabelIndex | None) -> tuple[str, ...]:
    """Labels of one row from its cells (already split on ';'): a cell that is a whole known label is one label
    even when it holds a comma (AudioSet display names like "Bee, wasp, etc."), any other cell splits on ','."""
    out: list[str] = []
    for cell in cells:
        cell = cell.strip()
        if index is not None and "," in cell and index.lookup(cell) is not None:
            out.append(cell)
        else:
            out += [x.strip() for x in cell.split(",") if x.strip()]
    return tuple(out)


def _read_labels_csv(path: str) -> dict[str, tuple[str, ...]]:
    """`video_id,labels` rows (a header row is optional): each row's label cells split on ';' (`split_labels`
    then splits them on ',', quote-aware: `vid,"Bee, wasp, etc."` is one label when the label index knows it)."""
    table: dict[str, tuple[str, ...]] = {}
    try:
        with open_text(path, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0] in ("video_id", "") or row[0].startswith("#"):
                    continue
                table[row[0].strip()] = tuple(x for cell in row[1:] for x in cell.split(";") if x.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read labels CSV ({exc})") from None
    return table


def _with_indices(item: InputItem, index: LabelIndex) -> InputItem:
    found = [index.lookup(label) for label in item.labels]
    unknown = [label for label, i in zip(item.labels, found) if i is None]
    if unknown:  # an item already skipped keeps its own reason
        return item if item.error else replace(item, error=f"label(s) {', '.join(map(repr, unknown))} not in "
                                                           "the label index")
    # labels are stored as ids (mids), whatever form the user gave them in
    mids = tuple(label if label in index.index else index.names[label] for label in item.labels)
    return replace(item, labels=mids, label_indices=tuple(i for i in found if i is not None))


def _mark_duplicates(items: list[InputItem]) -> list[InputItem]:
    """Two inputs with one video id cannot both be samples: the first (by path) wins, the rest are skipped."""
    out, seen = [], {}
    for it in items:
        if it.video_id in seen and it.error is None:
            it = replace(it, error=f"duplicate video_id {it.video_id!r} (also {safe_text(seen[it.video_id])})")
        else:
            seen.setdefault(it.video_id, it.path)
        out.append(it)
    return out
