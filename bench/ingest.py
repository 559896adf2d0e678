"""Per-video ingest cost on ONE core: the official route vs the PyAV decode floor vs ours.

    .venv/bin/python bench/ingest.py [--repeat 3] [--clips 360p,720p,bbb,/path/to/video.mp4] [--clock wall|cpu]
                                     [--set video.skip_nonref=true]

Routes, per video (each timed end to end, median of --repeat
rounds after one warm-up round; the routes take turns within a round):
  a  official: OpenCV VideoCapture, seek (CAP_PROP_POS_FRAMES) to int(i*N/10)-1 and read, BGR->RGB, PIL,
     torchvision Resize(224)+CenterCrop(224), save_image to 10 JPEGs in a temp folder; `ffmpeg -i v -vn
     -ar 16000 x.wav`, `sox x.wav y.wav remix 1`; then, as the loader does, load y.wav + kaldi fbank.
  b  decode floor: one PyAV pass decoding every video frame and the audio of the first 10 s (no
     resampling), converting only the 10 kept frames (swscale to 224 short side, as ours).
  c  ours: the ingest task bodies for one input (preprocess.units.work_unit with preprocess.ingest.INGEST,
     assemble_shard): decode, features, the input's spool, the unit's part, the shard tar and its manifest
     fragment, in a temp folder.

The process is pinned to one CPU (sched_setaffinity, inherited by ffmpeg and sox), torch and OpenCV use one
thread, and every decoder is single-threaded. Bench-only dependencies for route a: opencv-python-headless
and sox (the route is skipped, with a message, when either is missing).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchaudio  # noqa: E402

from cavmae.preprocess.decode import official_picks  # noqa: E402
from cavmae.preprocess.ingest import INGEST  # noqa: E402
from cavmae.preprocess.inputs import InputItem  # noqa: E402
from cavmae.preprocess.settings import register_sections  # noqa: E402
from cavmae.preprocess.units import assemble_shard, work_unit  # noqa: E402
from cavmae.shards.config import load_config  # noqa: E402
from tests import clips  # noqa: E402

CACHE = REPO / ".cache" / "bench"
GENERATED = {
    # 10 s, 30 fps, H.264 with x264's defaults (preset medium: keyint 250, scenecut, 3 B-frames),
    # stereo AAC at 44.1 kHz.
    "360p": dict(size=(640, 360)),
    "720p": dict(size=(1280, 720)),
}


def clip_path(name: str) -> Path:
    if name == "bbb":
        return clips.bigbuckbunny()
    if name in GENERATED:
        return clips.make_clip(CACHE, f"bench_{name}", seconds=10.0, fps=30, channels=2, sample_rate=44100,
                               preset="medium", **GENERATED[name])
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--clips: {name!r} is neither 360p, 720p, bbb nor a file")
    return path


# ---- route a: the official scripts, faithfully ------------------------------------------------------------
def official_route(path: Path, work: Path) -> None:
    import cv2
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.utils import save_image

    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    fps = cap.get(cv2.CAP_PROP_FPS)
    total = min(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(fps * 10))
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])
    for i in range(10):
        frame_idx = int(i * (total / 10))
        cap.set(cv2.CAP_PROP_POS_FRAMES, frame_idx - 1)
        _, frame = cap.read()
        image = tf(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))
        (work / f"frame_{i}").mkdir(exist_ok=True)
        save_image(image, work / f"frame_{i}" / "video.jpg")
    cap.release()
    mid, wav = work / "video_intermediate.wav", work / "video.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "quiet", "-y", "-i", str(path), "-vn", "-ar", "16000", str(mid)],
                   check=True)
    subprocess.run(["sox", str(mid), str(wav), "remix", "1"], check=True)
    mid.unlink()
    # Load time (the official dataloader): torchaudio.load + mean removal + kaldi fbank.
    with wave.open(str(wav)) as wf:  # = torchaudio.load of a 16-bit wav (torchaudio 2.9+ needs torchcodec)
        sr = wf.getframerate()
        pcm = np.frombuffer(wf.readframes(wf.getnframes()), "<i2")
    waveform = torch.from_numpy(pcm.astype(np.float32) / 32768.0).reshape(1, -1)
    waveform = waveform - waveform.mean()
    torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                                      window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)


# ---- route b: the PyAV decode floor -----------------------------------------------------------------------
def decode_floor(path: Path, work: Path) -> None:
    with av.open(str(path)) as container:
        vs = container.streams.video[0]
        aus = container.streams.audio[0] if container.streams.audio else None
        vs.codec_context.thread_count = 1
        vs.codec_context.thread_type = "SLICE"
        if aus is not None:
            aus.codec_context.thread_count = 1
        fps = float(vs.average_rate)
        count = vs.frames or int(container.duration / 1e6 * fps + 0.5)
        last = min(count, int(fps * 10))
        picks = set(official_picks(last, 10))
        index, audio_end, kept = 0, 0.0, []
        video_done, audio_done = False, aus is None
        for packet in container.demux(*(s for s in (vs, aus) if s is not None)):
            if packet.stream is vs and not video_done:
                for frame in packet.decode():
                    if index in picks:
                        w, h = frame.width, frame.height
                        size = (int(224 * w / h), 224) if w > h else (224, int(224 * h / w))
                        kept.append(frame.reformat(width=size[0], height=size[1], format="rgb24",
                                                   interpolation="BILINEAR").to_ndarray())
                    index += 1
                    video_done = index >= last
            elif aus is not None and packet.stream is aus and not audio_done:
                for frame in packet.decode():
                    audio_end = float(frame.time or 0) + frame.samples / frame.sample_rate
                    audio_done = audio_end >= 10.0
            if video_done and audio_done:
                break


# ---- route c: ours ----------------------------------------------------------------------------------------
def ours(path: Path, work: Path, cfg) -> None:
    part, rows = work_unit(INGEST, 0, 0, [InputItem(path.stem, str(path))], str(work), cfg.to_dict())
    assert rows[0]["status"] == "ok", rows[0]["error"]
    assemble_shard(0, [part], rows, str(work), cfg.to_dict())


def _cpu_clock() -> float:
    """CPU seconds of this process and its finished children (ffmpeg, sox): robust to other load."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


CLOCKS = {"wall": time.perf_counter, "cpu": _cpu_clock}


def timed(routes: dict, repeat: int, clock=time.perf_counter) -> dict:
    """Median ms per route; the routes take turns in every round so that load from other processes falls
    on all of them alike. Round 0 warms caches and imports and is not counted."""
    times: dict = {name: [] for name in routes}
    for i in range(repeat + 1):
        for name, fn in routes.items():
            work = Path(tempfile.mkdtemp(prefix="cavmae-bench-"))
            try:
                t0 = clock()
                fn(work)
                dt = clock() - t0
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if i:
                times[name].append(dt)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def workers_scaling(counts: list[int], videos: int, clip: str, sets: list[str]) -> int:
    """Throughput of the real Ray ingest job (`preprocess.ingest.ingest`) with 1, 2, ... workers.

    `videos` copies (hard links) of one clip are ingested into a fresh folder per worker count, on a local Ray
    with exactly that many CPUs, started and warmed up (one task per CPU) before the clock starts; the time
    is the wall time of the whole job (planning, tasks, shard publication, manifest)."""
    import ray

    from cavmae.preprocess.ingest import ingest

    src = clip_path(clip)
    if not any(x.startswith("shards.samples_per_shard=") for x in sets):
        # several shards (tasks) per worker, or the extra workers have nothing to do
        sets = [f"shards.samples_per_shard={max(1, videos // (4 * max(counts)))}", *sets]
    cfg = load_config(sets=sets)
    print(f"Ray ingest scaling: {videos} x {clip} ({src.name}), samples_per_shard="
          f"{cfg.shards.samples_per_shard}, {os.cpu_count()} cores on this machine, overrides={sets or 'none'}")
    header = f"{'workers':>7} {'seconds':>8} {'videos/s':>9} {'per worker':>11} {'efficiency':>11}"
    print(header)
    print("-" * len(header))
    base = None
    with tempfile.TemporaryDirectory(prefix="cavmae-scale-") as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        for i in range(videos):
            dst = folder / f"v{i:05d}{src.suffix}"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        for n in counts:
            ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            try:
                warm = ray.remote(num_cpus=1)(lambda: os.getpid())
                ray.get([warm.remote() for _ in range(n)])
                t0 = time.perf_counter()
                summary = ingest([str(folder)], Path(tmp) / f"out{n}", cfg)
                dt = time.perf_counter() - t0
            finally:
                ray.shutdown()
            if summary.ok != videos:
                print(f"workers={n}: only {summary.ok}/{videos} ok: {summary.problems[:3]}", file=sys.stderr)
            rate = videos / dt
            base = base or rate / n
            print(f"{n:>7} {dt:>8.1f} {rate:>9.2f} {rate / n:>11.2f} {rate / n / base:>10.0%}", flush=True)
    print("efficiency = (videos/s per worker) / (videos/s per worker of the first row)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per route and clip (median reported)")
    ap.add_argument("--clips", default="360p,720p,bbb",
                    help="comma list of 360p, 720p, bbb or paths to videos (default: %(default)s)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or CPU time of the process and its children (steadier on a busy machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for route c, e.g. video.skip_nonref=true")
    ap.add_argument("--workers", metavar="N,N,...",
                    help="instead: throughput of the Ray ingest job with these worker counts, e.g. 1,2")
    ap.add_argument("--videos", type=int, default=0,
                    help="--workers: videos per run (default: 8 x the largest worker count)")
    args = ap.parse_args(argv)
    register_sections()  # this script's entry: its jobs read the `ray` section, as cavmae-prep's do

    if args.workers:
        counts = [int(x) for x in args.workers.split(",") if x.strip()]
        clip = [c.strip() for c in args.clips.split(",") if c.strip()][0]
        return workers_scaling(counts, args.videos or 8 * max(counts), clip, args.set)

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    cfg = load_config(sets=args.set)

    missing = []
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        missing.append("opencv-python-headless (pip install opencv-python-headless)")
    if shutil.which("sox") is None:
        missing.append("sox (apt-get install sox)")
    if shutil.which("ffmpeg") is None:
        missing.append("ffmpeg")
    if missing:
        print(f"route a (official) skipped: missing {', '.join(missing)}", file=sys.stderr)

    print(f"one core, torch threads={torch.get_num_threads()}, repeat={args.repeat}, clock={args.clock}, "
          f"overrides={args.set or 'none'}")
    header = f"{'clip':<28} {'a official':>11} {'b floor':>9} {'c ours':>9} {'a/c':>6} {'b/c':>6}"
    print(header)
    print("-" * len(header))
    for name in [c.strip() for c in args.clips.split(",") if c.strip()]:
        path = clip_path(name)
        with av.open(str(path)) as cont:
            vs = cont.streams.video[0]
            label = f"{name} {vs.codec_context.width}x{vs.codec_context.height}@{float(vs.average_rate):g}"
        routes = {} if missing else {"a": lambda w: official_route(path, w)}
        routes["b"] = lambda w: decode_floor(path, w)
        routes["c"] = lambda w: ours(path, w, cfg)
        ms = timed(routes, args.repeat, CLOCKS[args.clock])
        a, b, c = ms.get("a"), ms["b"], ms["c"]
        a_s = "skipped" if a is None else f"{a:.0f}"
        ac = "-" if a is None else f"{a / c:.2f}"
        print(f"{label:<28} {a_s:>11} {b:>9.0f} {c:>9.0f} {ac:>6} {b / c:>6.2f}", flush=True)
    print("ms per video; a/c >= 3 and b/c >= 1 are the targets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
