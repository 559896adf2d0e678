"""`cavmae-prep fetch` against an HTTP server on 127.0.0.1 serving generated clips by id (yt-dlp's generic extractor,
direct file URLs through --url-template): exact segments that ingest takes as already cut, whole files, a 404
(gone, with yt-dlp's reason), a server that stalls (failed, within the timeout, with ffmpeg's message), resume and
--retry-failed, fetch -> ingest of an AudioSet-style list; what other servers do: no HTTP Range (the whole file),
500s then a --whole re-run (one row per list row), a redirect or page to file:// (failed, never read), a body that
never ends (failed at --max-seconds); the progress bar and the ranges of the number options. No real site is ever
contacted."""

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from cavmae.preprocess.cli import main
from cavmae.preprocess.datasets import ListOptions
from cavmae.preprocess.fetch import RESULTS, FetchOptions, HostRate, fetch
from cavmae.preprocess.ingest import ingest
from cavmae.shards.config import load_config
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from tests.clips import make_clip
from tests.conftest import time_limit

REPO = Path(__file__).resolve().parents[1]
SOURCE_S = 14.0
AUDIOSET = ("# YTID, start_seconds, end_seconds, positive_labels\n"
            'AAAAAAAAAAA, 3.000, 13.000, "/m/09x0r,/m/04rlf"\n'
            'GONEGONEGON, 0.000, 10.000, "/m/09x0r"\n'
            'STALLSTALLS, 2.000, 12.000, "/m/04rlf"\n'
            'SLOWSLOWSLO, 2.000, 12.000, "/m/04rlf"\n')


class Server:
    """Serves {id}.mp4 with Range support (as web servers do; ffmpeg seeks to an MP4's index), 404 for unknown
    names; until `release` is set it never answers a request for STALL*, nor ffmpeg's ranged requests for SLOW*.
    What other servers do: with `ranges` False it ignores Range (python -m http.server, many mirrors), with `broken`
    it answers 500; REDIR* redirects to file://`local`, PAGE* is an HTML page whose video is file://`local`, DRIP*
    declares 10 GB and sends a byte every 0.1 s (for 20 s at most: a hang of old code is a failure, not a stuck
    suite)."""

    def __init__(self, files: dict[str, bytes], local: Path | None = None):
        self.files, self.release, self.requests = files, threading.Event(), []
        self.ranges, self.broken, self.local, self.closed = True, False, local, threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.lstrip("/")
                server.requests.append(name)
                if server.broken:
                    self.send_error(500)
                    return
                if name.startswith("REDIR"):
                    self.send_response(302)
                    self.send_header("Location", f"file://{server.local}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if name.startswith("PAGE"):
                    self.answer(f'<html><body><video src="file://{server.local}"></video></body></html>'.encode(),
                                "text/html")
                    return
                if name.startswith("DRIP"):
                    self.drip()
                    return
                stalls = name.startswith("STALL") or (name.startswith("SLOW") and "Range" in self.headers)
                if stalls and not server.release.wait(30):
                    return
                body = server.files.get(name.replace("STALLSTALLS", "AAAAAAAAAAA").replace("SLOWSLOWSLO",
                                                                                           "AAAAAAAAAAA"))
                if body is None:
                    self.send_error(404)
                    return
                self.answer(body, "video/mp4")

            def answer(self, body: bytes, content_type: str):
                start, end = 0, len(body) - 1
                ranged = self.headers.get("Range", "").removeprefix("bytes=") if server.ranges else ""
                if ranged:
                    first, _, last = ranged.partition("-")
                    start, end = int(first), min(int(last) if last else end, end)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Type", content_type)
                if server.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start + 1))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
                self.end_headers()
                try:
                    self.wfile.write(body[start:end + 1])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def drip(self):
                self.send_response(200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Content-Length", str(10 ** 10))
                self.end_headers()
                try:
                    for _ in range(200):
                        if server.closed.wait(0.1):
                            return
                        self.wfile.write(b"\0")
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.template = f"http://127.0.0.1:{self.httpd.server_port}/{{id}}.mp4"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("served"), "AAAAAAAAAAA", seconds=SOURCE_S, size=(80, 64), fps=10,
                     channels=1, sample_rate=16000)


@pytest.fixture
def server(source, tmp_path):
    local = tmp_path / "local.mp4"  # a playable video that no request may ever make fetch read
    local.write_bytes(source.read_bytes())
    s = Server({"AAAAAAAAAAA.mp4": source.read_bytes()}, local)
    yield s
    s.close()


def options(server: Server, **kw) -> FetchOptions:
    return FetchOptions(**{"url_template": server.template, "jobs": 3, "rate": 50.0, "socket_timeout": 1.0,
                           "retries": 0, **kw})


def frame_at(path: Path, t: float) -> np.ndarray:
    """The decoded frame shown at `t` seconds (testsrc2 changes every frame: a time stamp, moving shapes)."""
    with av.open(str(path)) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24").astype(np.int16)) for f in c.decode(video=0)]
    return min(frames, key=lambda tf: abs(tf[0] - t))[1]


def duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return c.duration / 1e6


def test_segments_404_stall_resume_and_retry(server, source, tmp_path):
    listing = tmp_path / "balanced_train_segments.csv"
    listing.write_text(AUDIOSET)
    out = tmp_path / "videos"
    with time_limit(120, "fetch with a stalling server"):
        t0 = time.monotonic()
        results = {r.id: r for r in fetch(str(listing), str(out), options(server), log=lambda _: None)}
        took = time.monotonic() - t0
    assert took < 25  # the stalled rows fail after their 1 s timeouts, not after the server's 30 s
    assert [results[k].status for k in ("AAAAAAAAAAA", "GONEGONEGON", "STALLSTALLS", "SLOWSLOWSLO")] == [
        "ok", "gone", "failed", "failed"]
    assert "404" in results["GONEGONEGON"].reason and "\n" not in results["GONEGONEGON"].reason
    assert "timed out" in results["STALLSTALLS"].reason.lower()

    ok = results["AAAAAAAAAAA"]
    cut = out / "AAAAAAAAAAA_3_13.mp4"
    assert ok.file == cut.name and ok.bytes == cut.stat().st_size > 0 and (ok.start_s, ok.end_s) == (3.0, 13.0)
    assert duration(cut) == pytest.approx(10.0, abs=0.2)  # the segment exactly: ingest takes it as already cut
    first = frame_at(cut, 0.0)  # the segment's first frame is the source's frame at 3 s, not at 0 s
    assert np.abs(first - frame_at(source, 3.0)).mean() < np.abs(first - frame_at(source, 0.0)).mean() / 3

    table = pq.read_table(out / RESULTS).to_pylist()
    assert {r["id"]: r["status"] for r in table} == {"AAAAAAAAAAA": "ok", "GONEGONEGON": "gone",
                                                     "STALLSTALLS": "failed", "SLOWSLOWSLO": "failed"}
    assert set(table[0]) == {"id", "url", "start_s", "end_s", "status", "reason", "file", "bytes"}

    server.requests.clear()  # a re-run downloads nothing: ok and gone are done, failed waits for --retry-failed
    again = fetch(str(listing), str(out), options(server), log=lambda _: None)
    assert server.requests == [] and [r.status for r in again] == ["ok", "gone", "failed", "failed"]

    server.release.set()  # the server answers now: --retry-failed fetches the failed row only
    again = {r.id: r for r in fetch(str(listing), str(out), options(server, retry_failed=True), log=lambda _: None)}
    assert set(server.requests) == {"STALLSTALLS.mp4", "SLOWSLOWSLO.mp4"}
    assert again["STALLSTALLS"].status == again["SLOWSLOWSLO"].status == "ok"
    assert (out / "STALLSTALLS_2_12.mp4").is_file() and (out / "SLOWSLOWSLO_2_12.mp4").is_file()
    assert again["GONEGONEGON"].status == "gone" and again["AAAAAAAAAAA"].bytes == ok.bytes


def test_fetch_then_ingest_audioset_list(local_ray, server, tmp_path):
    listing = tmp_path / "eval_segments.csv"
    listing.write_text("".join(AUDIOSET.splitlines(keepends=True)[:3]))
    out = tmp_path / "videos"
    assert main(["fetch", str(listing), "--out", str(out), "--url-template", server.template, "--timeout", "2"]) == 0
    whole = tmp_path / "whole"
    assert main(["fetch", str(listing), "--out", str(whole), "--url-template", server.template, "--whole"]) == 0
    assert [p.name for p in out.glob("*.mp4")] == ["AAAAAAAAAAA_3_13.mp4"]
    assert [p.name for p in whole.glob("*.mp4")] == ["AAAAAAAAAAA.mp4"]
    assert (whole / "AAAAAAAAAAA.mp4").read_bytes() == server.files["AAAAAAAAAAA.mp4"]

    cfg = load_config(sets=["video.num_frames=2", "video.image_size=32", "clip.length_s=4"])
    for folder, cut in ((out, True), (whole, False)):
        summary = ingest([str(listing)], tmp_path / f"shards_{folder.name}", cfg,
                         lists=ListOptions(videos_dir=str(folder)), progress=False)
        assert (summary.ok, summary.skipped) == (1, 1)  # the gone row has no file: skipped, with its reason
        assert "no file for YTID 'GONEGONEGON'" in summary.problems[0]
        (got,) = map(decode_sample, raw_samples(list_shards(str(tmp_path / f"shards_{folder.name}"))))
        segment = got["meta"]["segment"]
        assert segment["listed_s"] == [3.0, 13.0] and segment["file_is_segment"] is cut
        assert segment["in_file_s"][0] == (0.0 if cut else 3.0)
        assert got["meta"]["labels"] == ["/m/09x0r", "/m/04rlf"]


def test_rate_is_per_host():
    rate = HostRate(4.0)
    t0 = time.monotonic()
    for _ in range(3):
        rate.wait("http://a.example/x")
    rate.wait("http://b.example/x")
    assert 0.45 < time.monotonic() - t0 < 2.0  # a's 3rd start waits 2 intervals; b's first does not wait


def test_without_yt_dlp_one_line_and_exit_2(tmp_path):
    listing = tmp_path / "l.csv"
    listing.write_text(AUDIOSET)
    code = ("import sys; sys.modules['yt_dlp'] = None; from cavmae.preprocess.cli import main; "
            f"sys.exit(main(['fetch', {str(listing)!r}, '--out', {str(tmp_path / 'v')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "cavmae-prep: error: fetch needs yt-dlp: pip install 'cavmae[fetch]'\n"


def test_source_that_cannot_be_cut_is_fetched_whole(server, tmp_path):
    """Without ffmpeg yt-dlp cannot download a part ("... ffmpeg is not installed"): the whole file, by id."""
    listing = tmp_path / "l.csv"
    listing.write_text("".join(AUDIOSET.splitlines(keepends=True)[:2]))
    out = tmp_path / "videos"
    args = ["fetch", str(listing), "--out", str(out), "--url-template", server.template]
    code = f"import sys; from cavmae.preprocess.cli import main; sys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert (out / "AAAAAAAAAAA.mp4").read_bytes() == server.files["AAAAAAAAAAA.mp4"]
    (row,) = pq.read_table(out / RESULTS).to_pylist()
    assert (row["status"], row["file"], row["start_s"], row["end_s"]) == ("ok", "AAAAAAAAAAA.mp4", 3.0, 13.0)


def listing_of(tmp_path: Path, *rows: str) -> Path:
    listing = tmp_path / "segments.csv"
    listing.write_text("# YTID, start_seconds, end_seconds, positive_labels\n" +
                       "".join(f'{row}, "/m/09x0r"\n' for row in rows))
    return listing


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name or p.name.endswith(".ytdl"))


def test_server_without_range_gives_the_whole_file(server, tmp_path):
    """ffmpeg cannot reach the index at an MP4's end through a server that ignores Range: both segments of the
    video fall back to one whole download, and the failed cuts leave no `.part` file."""
    server.ranges = False
    listing = listing_of(tmp_path, "AAAAAAAAAAA, 3.000, 13.000", "AAAAAAAAAAA, 0.000, 10.000")
    out = tmp_path / "videos"
    with time_limit(120, "fetch from a server without Range"):
        results = fetch(str(listing), str(out), options(server), log=lambda _: None)
    assert [(r.status, r.file, r.start_s, r.end_s) for r in results] == [
        ("ok", "AAAAAAAAAAA.mp4", 3.0, 13.0), ("ok", "AAAAAAAAAAA.mp4", 0.0, 10.0)]
    assert (out / "AAAAAAAAAAA.mp4").read_bytes() == server.files["AAAAAAAAAAA.mp4"]
    assert leftovers(out) == [] and sorted(p.name for p in out.glob("*.mp4")) == ["AAAAAAAAAAA.mp4"]


def test_ffmpeg_message_is_the_reason(server, tmp_path):
    """A segment whose ranged reads stall fails with ffmpeg's own words (not "ffmpeg exited with code 1"), and
    is not fetched whole: the whole file would meet the same timeout."""
    listing = listing_of(tmp_path, "SLOWSLOWSLO, 2.000, 12.000")
    out = tmp_path / "videos"
    with time_limit(60, "fetch with stalled ranged reads"):
        (row,) = fetch(str(listing), str(out), options(server), log=lambda _: None)
    assert row.status == "failed" and row.reason.startswith(f"ffmpeg: {server.template.format(id='SLOWSLOWSLO')}: ")
    assert "timed out" in row.reason.lower()  # (the system's words for ETIMEDOUT)
    assert leftovers(out) == [] and not list(out.glob("SLOW*"))  # (the whole file would have been served)


def test_whole_rerun_replaces_the_failed_rows(server, tmp_path):
    """One row per list row in fetch.parquet: a `--whole --retry-failed` re-run replaces the failed segment rows
    (keeping their listed times) instead of adding whole-video rows beside them."""
    listing = listing_of(tmp_path, "AAAAAAAAAAA, 3.000, 13.000", "AAAAAAAAAAA, 0.000, 10.000")
    out = tmp_path / "videos"
    server.broken = True
    assert {r.status for r in fetch(str(listing), str(out), options(server), log=lambda _: None)} == {"failed"}
    failed = pq.read_table(out / RESULTS).to_pylist()
    assert [r["status"] for r in failed] == ["failed"] * 2 and all("HTTP Error 500" in r["reason"] for r in failed)
    server.broken = False
    fetch(str(listing), str(out), options(server, whole=True, retry_failed=True), log=lambda _: None)
    table = pq.read_table(out / RESULTS).to_pylist()
    assert sorted((r["status"], r["file"], r["start_s"], r["end_s"]) for r in table) == [
        ("ok", "AAAAAAAAAAA.mp4", 0.0, 10.0), ("ok", "AAAAAAAAAAA.mp4", 3.0, 13.0)]


@pytest.mark.parametrize("whole", [False, True])
def test_redirect_or_page_to_a_local_file_fails_its_row_only(server, tmp_path, whole):
    """A redirect to file:// and a page whose video is file:// are failed rows with yt-dlp's or ffmpeg's message
    (yt-dlp raises more than DownloadError), the local file is never read, and the other rows go on."""
    listing = listing_of(tmp_path, "REDIRREDIRE, 3.000, 13.000", "PAGEPAGEPAG, 3.000, 13.000",
                         "AAAAAAAAAAA, 3.000, 13.000")
    out = tmp_path / "videos"
    with time_limit(120, "fetch of redirects and pages to local files"):
        results = {r.id: r for r in fetch(str(listing), str(out), options(server, whole=whole), log=lambda _: None)}
    assert results["AAAAAAAAAAA"].status == "ok"
    for ytid in ("REDIRREDIRE", "PAGEPAGEPAG"):
        assert results[ytid].status == "failed" and results[ytid].reason and "\n" not in results[ytid].reason
        assert not list(out.glob(f"{ytid}*")), ytid
    assert "file" in results["REDIRREDIRE"].reason.lower()


@pytest.mark.parametrize("whole", [False, True])
def test_a_body_that_never_ends_fails_at_max_seconds(server, tmp_path, whole):
    """10 GB declared, a byte every 0.1 s (never a no-data timeout): the row fails at --max-seconds with nothing
    left behind, the others go on."""
    listing = listing_of(tmp_path, "DRIPDRIPDRI, 3.000, 13.000", "GONEGONEGON, 3.000, 13.000")
    out = tmp_path / "videos"
    with time_limit(40, "fetch of a body that never ends"):
        results = {r.id: r for r in fetch(str(listing), str(out), options(server, whole=whole, max_seconds=5.0),
                                          log=lambda _: None)}
    assert results["GONEGONEGON"].status == "gone"
    assert (results["DRIPDRIPDRI"].status, results["DRIPDRIPDRI"].reason) == (
        "failed", "not done in 5 s (--max-seconds)")
    assert leftovers(out) == [] and not list(out.glob("DRIP*"))


def test_progress_bar(server, tmp_path, capsys):
    listing = listing_of(tmp_path, "AAAAAAAAAAA, 3.000, 13.000")
    args = ["fetch", str(listing), "--url-template", server.template]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "fetch: 100%" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_file_url_template_is_refused(tmp_path, capsys):
    listing = listing_of(tmp_path, "AAAAAAAAAAA, 3.000, 13.000")
    (tmp_path / "AAAAAAAAAAA.mp4").write_bytes(b"local")
    template = f"file://{tmp_path}/{{id}}.mp4"
    assert main(["fetch", str(listing), "--out", str(tmp_path / "v"), "--url-template", template]) == 2
    assert capsys.readouterr().err == (f"cavmae-prep: error: --url-template {template!r}: not an http:// or "
                                       "https:// URL\n")


@pytest.mark.parametrize("option", [("--timeout", "inf"), ("--timeout", "1e-7"), ("--timeout", "nan"),
                                    ("--rate", "1e-300"), ("--rate", "inf"), ("--jobs", "0"), ("--jobs", "100000"),
                                    ("--retries", "-1"), ("--max-seconds", "0"), ("--max-seconds", "inf")])
def test_numbers_out_of_range_are_usage_errors(server, tmp_path, capsys, option):
    listing = listing_of(tmp_path, "AAAAAAAAAAA, 3.000, 13.000", "GONEGONEGON, 3.000, 13.000")
    with time_limit(60, f"fetch {option}"), pytest.raises(SystemExit) as exit:
        main(["fetch", str(listing), "--out", str(tmp_path / "v"), "--url-template", server.template, *option])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"cavmae-prep fetch: error: argument {option[0]}: ") and "must be " in err
