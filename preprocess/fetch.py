"""`cavmae-prep fetch`: download the videos a dataset list names, with yt-dlp, into files ingest finds by id.

Each row of an AudioSet, VGGSound, Kinetics or ESC-50 list (read by `preprocess.datasets`, the parser ingest uses)
is one download of `--url-template` with `{id}` replaced by the row's YouTube id (ESC-50: the file's stem). A row
with a segment is downloaded as exactly that segment, re-encoded at the cuts (yt-dlp `download_ranges` through
ffmpeg with `force_keyframes_at_cuts`), to `{id}_{start}_{end}.{ext}`: its duration is the segment's, so ingest
takes it as the segment already cut (`preprocess.decode.Segment.place`). There is no margin around the segment:
ingest places a segment by the file's duration alone, so a file a margin longer would be decoded from the wrong
time. When the source cannot be cut (yt-dlp: "This format cannot be partially downloaded", or no ffmpeg), or with
`whole=True` (a mirror serving cut clips), the whole file is downloaded to `{id}.{ext}` and ingest cuts the
segment from it at the listed times.

Results go to `fetch.parquet` in the output folder (id, url, start_s, end_s, status ok|gone|failed, reason: yt-dlp's
message on one line, file, bytes), rewritten atomically as downloads finish; a re-run skips the rows already ok or
gone, and retries the failed ones only with `retry_failed`. "gone" is a message saying the video is not there any
more (removed, private, HTTP 404/410); anything else (timeouts, throttling, server errors) is "failed".
"""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq

from cavmae.shards.errors import UserError
from cavmae.shards.schema import one_line

from .datasets import FORMATS, list_format, list_rows

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
# frames are resized to video.image_size (224) anyway: at most 480p when the source says its height, else the best
DEFAULT_FORMAT = "bv*[height<=?480]+ba/b[height<=?480]/bv*+ba/b"
RESULTS = "fetch.parquet"
SAVE_EVERY_S = 5.0
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_GONE = re.compile(r"HTTP Error 404|HTTP Error 410|video unavailable|private video|has been removed|"
                   r"no longer available|this video is not available|account .*terminated|does not exist",
                   re.IGNORECASE)  # (not 403 or 429: YouTube answers them to a client it throttles)
_NO_CUT = ("cannot be partially downloaded", "ffmpeg is not installed")
_SCHEMA = pa.schema([("id", pa.string()), ("url", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()),
                     ("status", pa.string()), ("reason", pa.string()), ("file", pa.string()), ("bytes", pa.int64())])


class FetchError(UserError):
    """fetch cannot start: yt-dlp is not installed, or the list or an option is unusable."""


@dataclass(frozen=True)
class Fetched:
    """One row of fetch.parquet."""

    id: str
    url: str
    start_s: float | None
    end_s: float | None
    status: str            # ok | gone | failed
    reason: str = ""
    file: str = ""
    bytes: int = 0

    @property
    def key(self) -> tuple:
        return self.id, self.start_s, self.end_s


@dataclass(frozen=True)
class FetchOptions:
    """How `fetch` downloads: `jobs` at once, at most `rate` downloads started per second per host,
    `socket_timeout` seconds without data before a download fails (after yt-dlp's `retries`), `whole` files even
    for segments, `format` yt-dlp's format selector; `retry_failed`, `list_format` and `split` as the CLI's."""

    url_template: str = DEFAULT_URL_TEMPLATE
    format: str = DEFAULT_FORMAT
    jobs: int = 4
    rate: float = 1.0
    socket_timeout: float = 30.0
    retries: int = 3
    whole: bool = False
    retry_failed: bool = False
    list_format: str = "auto"
    split: tuple[str, ...] | None = None


class HostRate:
    """At most `rate` starts per second for each host: each start waits for its host's next free slot."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self.next: dict[str, float] = {}
        self.lock = threading.Lock()

    def wait(self, url: str) -> None:
        host = urlparse(url).hostname or ""
        with self.lock:
            now = time.monotonic()
            at = max(now, self.next.get(host, now))
            self.next[host] = at + self.interval
        time.sleep(max(0.0, at - now))


def fetch(list_path: str, out: str, options: FetchOptions = FetchOptions(), log=print) -> list[Fetched]:
    """Download the rows of the dataset list `list_path` into the folder `out`; the results of every row."""
    try:
        import yt_dlp  # noqa: F401  (optional: cavmae[fetch])
    except ImportError:
        raise FetchError("fetch needs yt-dlp: pip install 'cavmae[fetch]'") from None
    if "{id}" not in options.url_template:
        raise FetchError(f"--url-template {options.url_template!r}: has no {{id}}")
    if options.jobs < 1 or not options.rate > 0 or not options.socket_timeout > 0:
        raise FetchError("--jobs, --rate and --timeout must be positive")
    path = Path(list_path)
    if not path.is_file():
        raise FetchError(f"{list_path}: no such file")
    fmt = list_format(path, options.list_format)
    if fmt is None:
        raise FetchError(f"{list_path}: not a dataset list ({', '.join(FORMATS)}); name one with --list-format")
    wanted = list(dict.fromkeys(  # (id, start, end) once each: one download serves every row of a whole video
        (r.ytid, None, None) if r.start_s is None or options.whole else (r.ytid, r.start_s, r.end_s)
        for r in list_rows(path, fmt, options.split)))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    done = {r.key: r for r in _load(folder / RESULTS)}
    retry = ("failed",) if options.retry_failed else ()
    todo = [k for k in wanted if k not in done or done[k].status in retry]
    log(f"fetch: {len(wanted)} row(s), {len(wanted) - len(todo)} done before, {len(todo)} to download")
    rate = HostRate(options.rate)
    last_save = time.monotonic()
    try:
        with ThreadPoolExecutor(options.jobs) as pool:  # threads: yt-dlp and ffmpeg wait on the network
            futures = [pool.submit(_download, *key, folder, options, rate) for key in todo]
            try:
                for future in as_completed(futures):
                    result = future.result()
                    done[result.key] = result
                    if result.status != "ok":
                        log(f"fetch: {result.status}: {result.id}: {result.reason}")
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        _save(folder / RESULTS, done.values())
                        last_save = time.monotonic()
            except BaseException:  # (Ctrl-C) start no more downloads; the running ones finish and are not recorded
                for future in futures:
                    future.cancel()
                raise
    finally:
        _save(folder / RESULTS, done.values())
    results = [done[k] for k in wanted if k in done]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "gone", "failed")}
    log(f"fetch: {counts['ok']} ok, {counts['gone']} gone, {counts['failed']} failed; results in "
        f"{folder / RESULTS}")
    return results


def _download(ytid: str, start: float | None, end: float | None, folder: Path, options: FetchOptions,
              rate: HostRate) -> Fetched:
    """One row: the segment exactly, else (a source that cannot be cut) the whole file."""
    url = options.url_template.replace("{id}", ytid)
    if not _SAFE_ID.fullmatch(ytid):
        return Fetched(ytid, url, start, end, "failed", "the id is not a safe file name")
    rate.wait(url)
    try:
        if start is None:
            return _yt_dlp(ytid, url, None, folder, options)
        try:
            return _yt_dlp(ytid, url, (start, end), folder, options)
        except _NoCut:
            return _yt_dlp(ytid, url, None, folder, options, (start, end))
    except _Failed as exc:
        reason = exc.args[0]
        status = "gone" if _GONE.search(reason) else "failed"
        return Fetched(ytid, url, start, end, status, reason)


class _NoCut(Exception):
    """yt-dlp cannot download a part of this source (its message): take the whole file."""


class _Failed(Exception):
    """The download did not happen; the message is yt-dlp's, on one line."""


def _yt_dlp(ytid: str, url: str, segment: tuple[float, float] | None, folder: Path, options: FetchOptions,
            listed: tuple[float, float] | None = None) -> Fetched:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    name = ytid if segment is None else f"{ytid}_{_seconds(segment[0])}_{_seconds(segment[1])}"
    params = {
        "paths": {"home": str(folder)}, "outtmpl": f"{name}.%(ext)s",  # (a safe id: no % to escape)
        "format": options.format, "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": True,
        "socket_timeout": options.socket_timeout, "retries": options.retries, "extractor_retries": options.retries,
        # ffmpeg (the ranged downloader) waits for data without end by default: the same timeout, in microseconds
        "external_downloader_args": {"ffmpeg_i": ["-rw_timeout", str(int(options.socket_timeout * 1e6))]},
        "logger": _Quiet(),
    }
    if segment is not None:
        params.update(download_ranges=download_range_func(None, [segment]), force_keyframes_at_cuts=True)
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as exc:
        reason = one_line(exc).removeprefix("ERROR: ")
        if segment is not None and any(m in reason for m in _NO_CUT):
            raise _NoCut(reason) from None
        raise _Failed(reason) from None
    files = [d.get("filepath") for d in (info or {}).get("requested_downloads") or []]
    file = next((f for f in files if f and os.path.isfile(f)), None)
    start, end = segment or listed or (None, None)
    if file is None:
        raise _Failed("yt-dlp reported no downloaded file")
    return Fetched(ytid, url, start, end, "ok", "", os.path.basename(file), os.path.getsize(file))


def _seconds(t: float) -> str:
    """A time as a cut clip's name gives it: `3`, `30.5` (never an exponent, which ingest would not read)."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


class _Quiet:
    """yt-dlp's logger: nothing on the console (errors come back as the DownloadError's message)."""

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def _load(path: Path) -> list[Fetched]:
    if not path.is_file():
        return []
    try:
        rows = pq.read_table(path, schema=_SCHEMA).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise FetchError(f"{path}: cannot read ({one_line(exc)}); delete it to start over") from None
    return [Fetched(**r) for r in rows]


def _save(path: Path, results) -> None:
    """Write fetch.parquet whole to a temporary name, then rename it over the old one (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pylist([asdict(r) for r in results], schema=_SCHEMA), tmp)
    os.replace(tmp, path)
