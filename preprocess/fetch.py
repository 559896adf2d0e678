"""`cavmae-prep fetch`: download the videos a dataset list names, with yt-dlp, into files ingest finds by id.

Each row of an AudioSet, VGGSound, Kinetics or ESC-50 list (read by `preprocess.datasets`, the parser ingest uses)
is one download of `--url-template` with `{id}` replaced by the row's YouTube id (ESC-50: the file's stem). A row
with a segment is downloaded as exactly that segment, re-encoded at the cuts (yt-dlp `download_ranges` through
ffmpeg with `force_keyframes_at_cuts`), to `{id}_{start}_{end}.{ext}`: its duration is the segment's, so ingest
takes it as the segment already cut (`preprocess.decode.Segment.place`). There is no margin around the segment:
ingest places a segment by the file's duration alone, so a file a margin longer would be decoded from the wrong
time. When the source cannot be cut (yt-dlp: "This format cannot be partially downloaded", no ffmpeg, or ffmpeg
fails on it other than by a timeout: a server without HTTP Range cannot give it an MP4's index at the end), or with
`whole=True` (a mirror serving cut clips), the whole file is downloaded to `{id}.{ext}` and ingest cuts the segment
from it at the listed times.

Each attempt runs in a process of its own (preprocess.fetch_one says why), ended with everything it started when
the row has taken `max_seconds`; what a failed attempt leaves (`.part` files) is removed. Only http(s) is fetched:
a `file://` template is refused, and a redirect or page naming a local file fails its row without reading it.

Results go to `fetch.parquet` in the output folder (id, url, start_s, end_s as listed, status ok|gone|failed,
reason: yt-dlp's or ffmpeg's message on one line, file, bytes), one row per list row, rewritten atomically as
downloads finish; a re-run skips the rows already ok or gone, and retries the failed ones only with `retry_failed`
(a row's new result replaces its old one, whole download or not). "gone" is a message saying the video is not there
any more (removed, private, HTTP 404/410); anything else (timeouts, throttling, server errors) is "failed".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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
from cavmae.shards.store import publish_file

from .datasets import FORMATS, list_format, list_rows

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
# frames are resized to video.image_size (224) anyway: at most 480p when the source says its height, else the best
DEFAULT_FORMAT = "bv*[height<=?480]+ba/b[height<=?480]/bv*+ba/b"
RESULTS = "fetch.parquet"
SAVE_EVERY_S = 5.0
# the numbers fetch takes: FetchOptions field -> (CLI flag, lowest, highest), checked when the CLI parses them and
# when fetch() starts (ffmpeg takes the timeout in whole microseconds, 0 meaning none; a rate's interval must be a
# time that can be slept)
LIMITS = {"jobs": ("--jobs", 1, 64), "rate": ("--rate", 0.001, 1000.0), "socket_timeout": ("--timeout", 0.1, 3600.0),
          "retries": ("--retries", 0, 100), "max_seconds": ("--max-seconds", 1.0, 7 * 86400.0)}
_SAFE_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_GONE = re.compile(r"HTTP Error 404|HTTP Error 410|video unavailable|private video|has been removed|"
                   r"no longer available|this video is not available|account .*terminated|does not exist",
                   re.IGNORECASE)  # (not 403 or 429: YouTube answers them to a client it throttles)
_NO_CUT = ("cannot be partially downloaded", "ffmpeg is not installed")
_FFMPEG_FAILED = re.compile(r"ffmpeg exited with code -?\d+")
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
    `socket_timeout` seconds without data before a download fails (after yt-dlp's `retries`), `max_seconds` for a
    row in all, `whole` files even for segments, `format` yt-dlp's format selector; `retry_failed`, `list_format`
    and `split` as the CLI's."""

    url_template: str = DEFAULT_URL_TEMPLATE
    format: str = DEFAULT_FORMAT
    jobs: int = 4
    rate: float = 1.0
    socket_timeout: float = 30.0
    retries: int = 3
    max_seconds: float = 3600.0
    whole: bool = False
    retry_failed: bool = False
    list_format: str = "auto"
    split: tuple[str, ...] | None = None


def out_of_range(field: str, value: float) -> str | None:
    """Why `value` is not a valid `field` of FetchOptions (None: it is): the one check of fetch's numbers."""
    _, low, high = LIMITS[field]
    return None if low <= value <= high else f"must be {low:g} to {high:g}, got {value:g}"


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


def fetch(list_path: str, out: str, options: FetchOptions = FetchOptions(), log=print,
          progress: bool = False) -> list[Fetched]:
    """Download the rows of the dataset list `list_path` into the folder `out`; the results of every row."""
    try:
        import yt_dlp  # noqa: F401  (optional: cavmae[fetch])
    except ImportError:
        raise FetchError("fetch needs yt-dlp: pip install 'cavmae[fetch]'") from None
    from tqdm import tqdm

    _check(options)
    path = Path(list_path)
    if not path.is_file():
        raise FetchError(f"{list_path}: no such file")
    fmt = list_format(path, options.list_format)
    if fmt is None:
        raise FetchError(f"{list_path}: not a dataset list ({', '.join(FORMATS)}); name one with --list-format")
    wanted = list(dict.fromkeys((r.ytid, r.start_s, r.end_s) for r in list_rows(path, fmt, options.split)))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    done = {r.key: r for r in _load(folder / RESULTS)}
    retry = ("failed",) if options.retry_failed else ()
    todo = [k for k in wanted if k not in done or done[k].status in retry]
    downloads: dict[tuple, list[tuple]] = {}  # one download serves every row of a whole video
    for key in todo:
        downloads.setdefault((key[0], None, None) if key[1] is None or options.whole else key, []).append(key)
    log(f"fetch: {len(wanted)} row(s), {len(wanted) - len(todo)} done before, {len(todo)} to download")
    run = _Run(folder, options)
    last_save = time.monotonic()
    try:
        with ThreadPoolExecutor(options.jobs) as pool, \
                tqdm(total=len(todo), unit="row", desc="fetch", disable=not progress) as bar:
            futures = {pool.submit(run.download, *key): rows for key, rows in downloads.items()}
            try:
                for future in as_completed(futures):
                    for result in future.result().rows(futures[future]):
                        done[result.key] = result
                        if result.status != "ok":
                            with bar.external_write_mode():
                                log(f"fetch: {result.status}: {result.id}: {result.reason}")
                    bar.update(len(futures[future]))
                    if time.monotonic() - last_save > SAVE_EVERY_S:
                        _save(folder / RESULTS, done.values())
                        last_save = time.monotonic()
            except BaseException:  # (Ctrl-C) start no more downloads, end the running ones; they are not recorded
                for future in futures:
                    future.cancel()
                run.stop()
                raise
    finally:
        _save(folder / RESULTS, done.values())
    results = [done[k] for k in wanted if k in done]
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "gone", "failed")}
    log(f"fetch: {counts['ok']} ok, {counts['gone']} gone, {counts['failed']} failed; results in "
        f"{folder / RESULTS}")
    return results


def _check(options: FetchOptions) -> None:
    template = options.url_template
    if "{id}" not in template:
        raise FetchError(f"--url-template {template!r}: has no {{id}}")
    if urlparse(template).scheme.lower() not in ("http", "https"):
        raise FetchError(f"--url-template {template!r}: not an http:// or https:// URL")
    for field, (flag, _, _) in LIMITS.items():
        why = out_of_range(field, getattr(options, field))
        if why:
            raise FetchError(f"{flag} {why}")


@dataclass(frozen=True)
class _Outcome:
    """What one download gave: a file, or a status and its reason (the same for every list row it serves)."""

    url: str
    status: str
    reason: str = ""
    file: str = ""
    bytes: int = 0

    def rows(self, keys: list[tuple]) -> list[Fetched]:
        return [Fetched(ytid, self.url, start, end, self.status, self.reason, self.file, self.bytes)
                for ytid, start, end in keys]


class _Run:
    """The downloads of one fetch: the child processes running (to end them on Ctrl-C), a lock per id (the whole
    file that two segments of a video fall back to is downloaded once, not twice into the same `.part`)."""

    def __init__(self, folder: Path, options: FetchOptions):
        self.folder, self.options, self.rate = folder, options, HostRate(options.rate)
        self.lock = threading.Lock()
        self.children: set[subprocess.Popen] = set()
        self.id_locks: dict[str, threading.Lock] = {}
        self.stopped = False

    def download(self, ytid: str, start: float | None, end: float | None) -> _Outcome:
        """One download: the segment exactly, else (no segment, `whole`, a source that cannot be cut) the whole
        file; at most `max_seconds` in all."""
        url = self.options.url_template.replace("{id}", ytid)
        if not _SAFE_ID.fullmatch(ytid):
            return _Outcome(url, "failed", "the id is not a safe file name")
        self.rate.wait(url)
        deadline = time.monotonic() + self.options.max_seconds
        try:
            if start is not None:
                try:
                    return self._attempt(url, f"{ytid}_{_seconds(start)}_{_seconds(end)}", [start, end], deadline)
                except _NoCut:
                    pass
            with self.lock:
                id_lock = self.id_locks.setdefault(ytid, threading.Lock())
            with id_lock:
                return self._attempt(url, ytid, None, deadline)
        except _Failed as exc:
            reason = exc.args[0]
            return _Outcome(url, "gone" if _GONE.search(reason) else "failed", reason)

    def _attempt(self, url: str, name: str, segment: list[float] | None, deadline: float) -> _Outcome:
        """One run of preprocess.fetch_one; a failure (its `.part` files removed) raises _NoCut when the whole file
        may do (the segment could not be cut, and not for a timeout, which the whole file would meet too), else
        _Failed."""
        o = self.options
        spec = {"url": url, "folder": str(self.folder), "name": name, "format": o.format,
                "socket_timeout": o.socket_timeout, "retries": o.retries, "segment": segment}
        answer, stderr = self._child(json.dumps(spec), deadline)
        if answer is not None and "file" in answer:
            return _Outcome(url, "ok", "", answer["file"], answer["bytes"])
        _remove_partial(self.folder, name)
        if answer is None:
            raise _Failed(f"not done in {o.max_seconds:g} s (--max-seconds)")
        reason = one_line(answer["error"])
        no_cut = any(m in reason for m in _NO_CUT)
        if _FFMPEG_FAILED.search(reason) and _last_lines(stderr):  # ffmpeg's own message, not its exit code
            reason = f"ffmpeg: {_last_lines(stderr)}"
            no_cut = "timed out" not in reason.lower()
        raise (_NoCut if segment is not None and no_cut else _Failed)(reason)

    def _child(self, spec: str, deadline: float) -> tuple[dict | None, str]:
        """Run one attempt in its own process group; (its answer, its stderr), answer None past the deadline."""
        with self.lock:
            if self.stopped:
                return {"error": "interrupted"}, ""
            proc = subprocess.Popen([sys.executable, "-m", "cavmae.preprocess.fetch_one", spec], text=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)  # (its own group: ffmpeg ends with it)
            self.children.add(proc)
        try:
            out, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
            return None, err
        finally:
            with self.lock:
                self.children.discard(proc)
        lines = out.strip().splitlines()
        try:
            return json.loads(lines[-1]), err
        except (IndexError, ValueError):  # it died without answering (killed, out of memory)
            return {"error": _last_lines(err) or f"the download process ended with {proc.returncode}"}, err

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            for proc in self.children:
                _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _Failed(Exception):
    """The download did not happen; the message is yt-dlp's or ffmpeg's, on one line."""


class _NoCut(_Failed):
    """The segment could not be downloaded (the message says why): take the whole file."""


def _last_lines(stderr: str, n: int = 3) -> str:
    """The last `n` different lines of ffmpeg's stderr on one line, without the addresses of its log contexts."""
    lines = [re.sub(r" @ 0x[0-9a-f]+\]", "]", line.strip()) for line in stderr.splitlines()]
    lines = [line for line in lines if line and not line.startswith("Last message repeated")]
    return "; ".join(list(dict.fromkeys(reversed(lines)))[:n][::-1])


def _remove_partial(folder: Path, name: str) -> None:
    """What a failed attempt at `name` left: yt-dlp's and ffmpeg's `.part` files (and yt-dlp's `.ytdl` state)."""
    for path in folder.glob(f"{name}.*"):
        rest = path.name[len(name):]
        if ".part" in rest or rest.endswith(".ytdl"):
            path.unlink(missing_ok=True)


def _seconds(t: float) -> str:
    """A time as a cut clip's name gives it: `3`, `30.5` (never an exponent, which ingest would not read)."""
    return f"{t:.3f}".rstrip("0").rstrip(".")


def _load(path: Path) -> list[Fetched]:
    if not path.is_file():
        return []
    try:
        rows = pq.read_table(path, schema=_SCHEMA).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise FetchError(f"{path}: cannot read ({one_line(exc)}); delete it to start over") from None
    return [Fetched(**r) for r in rows]


def _save(path: Path, results) -> None:
    """Write fetch.parquet through `publish_file`: a new file renamed over the old one, never half-written and never
    written through a link left under either name."""
    with publish_file(path) as up:
        pq.write_table(pa.Table.from_pylist([asdict(r) for r in results], schema=_SCHEMA), up.file)
