"""One download attempt of `cavmae-prep fetch`, run by fetch.py in a process of its own.

Why a process: a row must end within `--max-seconds`, and only ending a process does that (yt-dlp's reads block in
the socket for as long as each byte comes within the no-data timeout, and a Python thread cannot be stopped; killing
the process group ends ffmpeg too); and ffmpeg's own message reaches only this process's stderr (yt-dlp lets it
write there and reports "ffmpeg exited with code 1"), which fetch.py reads.

`python -m cavmae.preprocess.fetch_one SPEC`: SPEC is a JSON object (url, folder, name, format, socket_timeout,
retries, segment [start, end] or null); the answer is one JSON line on stdout, {"file": name, "bytes": n} or
{"error": yt-dlp's message}. Every exception of yt-dlp (DownloadError, but also the RequestError of a redirect to
file://, an extractor's own errors) is an answer, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys

# what ffmpeg may open: the network only, never a local file that a page or a redirect names (yt-dlp passes a
# format's URL to ffmpeg as it is); the same no-data timeout as yt-dlp's, in microseconds (ffmpeg waits without end
# by default); only its errors on stderr, for fetch.py to record
FFMPEG_INPUT = ["-loglevel", "error", "-protocol_whitelist", "http,https,tcp,tls,crypto"]


class _Quiet:
    """yt-dlp's logger: nothing on the console (errors come back as the exception's message)."""

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def download(url: str, folder: str, name: str, format: str, socket_timeout: float, retries: int,
             segment: list[float] | None) -> dict:
    import yt_dlp
    from yt_dlp.utils import download_range_func

    params = {
        "paths": {"home": folder}, "outtmpl": f"{name}.%(ext)s",  # (a safe id: no % to escape)
        "format": format, "no_warnings": True, "noprogress": True, "noplaylist": True, "logger": _Quiet(),
        # not "quiet": yt-dlp would pass ffmpeg `-loglevel quiet`, and ffmpeg's message is the reason recorded
        "enable_file_urls": False,  # (yt-dlp's default, stated: a redirect or a page naming file:// fails)
        "socket_timeout": socket_timeout, "retries": retries, "extractor_retries": retries,
        "external_downloader_args": {"ffmpeg_i": [*FFMPEG_INPUT, "-rw_timeout", str(round(socket_timeout * 1e6))]},
    }
    if segment is not None:
        params.update(download_ranges=download_range_func(None, [tuple(segment)]), force_keyframes_at_cuts=True)
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except Exception as exc:  # any failure of yt-dlp or ffmpeg is this row's, with its message
        return {"error": str(exc).removeprefix("ERROR: ") or type(exc).__name__}
    files = [d.get("filepath") for d in (info or {}).get("requested_downloads") or []]
    file = next((f for f in files if f and os.path.isfile(f)), None)
    if file is None:
        return {"error": "yt-dlp reported no downloaded file"}
    return {"file": os.path.basename(file), "bytes": os.path.getsize(file)}


if __name__ == "__main__":
    print(json.dumps(download(**json.loads(sys.argv[1]))), flush=True)
