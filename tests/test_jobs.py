"""The preprocessing job framework (`preprocess.jobs`): ingest, reprocess and stats give the very bytes they gave
before the framework existed (digests pinned below, see PINNED for how they were taken), and a toy job of a
few lines defined here runs through the framework with its lock, its per-item time limit and resume after
kill -9."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.jobs import ShardJob, run_shard_job
from cavmae.preprocess.outlock import OutputBusy
from cavmae.preprocess.reprocess import reprocess, reprocess_config
from cavmae.preprocess.stats import compute_stats
from cavmae.shards.config import load_config
from cavmae.shards.manifest import read_manifest
from cavmae.shards.store import Store
from tests import simd_off
from tests.clips import make_clip, make_exact_clip

REPO = Path(__file__).resolve().parents[1]
SETS = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=2",
        "audio.keep_waveform=true", "ray.videos_per_task=1"]
# sha256 over every shard's name and bytes, the manifest's rows and pipeline.yaml (`_digest`); for stats, over
# stats.json without its folder. The first pins were taken with the drivers before `preprocess.jobs`
# (ingest.run_groups and schedule.run_units), but on media from the machine's ffmpeg CLI and on the CPU's own
# SIMD paths, so another ffmpeg build (Debian's 5.1) or another CPU gave other digests (issue 25). Re-pinned with
# the media of `make_exact_clip` (PyAV's FFmpeg, lossless codecs: the same bytes everywhere) and every CPU-dependent
# code path off (tests/simd_off.py), on this repo's pinned PyAV/Pillow/pyarrow/torch/numpy (constraints.txt), by
# running this test with empty values and copying what it got (twice, the same), on branch `rename`. The code was
# the same: with the former media and default paths, `rename` and the commit before it (c4e6ce4) gave the same
# digests, and with these media and paths off c4e6ce4 gives these.
PINNED = {
    "ingest": "e50ab8cc6039897b3738e1ce9ebaab8b1ac0b3e3d8a2eeffbb33c6074f6e4df7",
    "reprocess_waveform": "8aad26ae56dde569528113d3e235cfbf0fe739f241270bb8908598221520416a",
    "reprocess_source": "86b1e5563222177513de3786a2b8c821f6ea275829343e1ce27c696185be6950",
    "reprocess_repack": "66d853fe0cfe82cc01d1c1a0c7e15d177ba4a4ed90fa8d25c609df2809dcac99",
    "stats": "4045779b755ccc1e59addd05bd5dd6b83aa925640377942f06313ae14f1b69f5",
}


def _digest(folder: Path, root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("shard-*.tar")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    rows = sorted(pq.read_table(folder / "manifest.parquet").to_pylist(),
                  key=lambda r: (r["video_id"], r["key"] or ""))
    h.update(json.dumps(rows, sort_keys=True, default=str).replace(str(root), "<tmp>").encode())
    h.update((folder / "pipeline.yaml").read_bytes())
    assert not list(folder.glob("_*")), "run state left behind"
    return h.hexdigest()


def output_digests(root: Path) -> dict[str, str]:
    """Ingest, reprocess (each mode) and stats over five clips, one without audio and one broken file, in `root`
    (on the Ray this process has started): the `PINNED` digests."""
    videos = root / "videos"
    for i in range(5):
        make_exact_clip(videos, f"v{i}", seconds=1.0 + 0.5 * i, size=(64, 48), tone_hz=300 + 70 * i)
    make_exact_clip(videos, "silent", seconds=1.5, size=(64, 48), audio=False)
    (videos / "broken.mp4").write_bytes(b"not a video")
    src = root / "src"
    assert ingest([str(videos)], src, load_config(sets=SETS)).ok == 5  # silent and broken fail
    wave, source, repack = root / "wave", root / "source", root / "repack"
    run = ["shards.samples_per_shard=2", "ray.videos_per_task=1"]  # a run's own, never taken from SRC
    assert reprocess(src, wave, reprocess_config(src, sets=run + ["audio.num_mel_bins=64"])).mode == "waveform"
    assert reprocess(src, repack, reprocess_config(src, sets=run + ["shards.samples_per_shard=3"])).mode == "repack"
    assert reprocess(src, source, reprocess_config(src, sets=run + ["video.num_frames=3"]),
                     sources=[str(videos)]).mode == "source"
    stats = compute_stats(str(src), load_config(sets=SETS), batch_size=2, rows=128)
    stats.pop("folder")
    stats_text = json.dumps(stats, sort_keys=True).replace(str(root), "<tmp>")
    return {"ingest": _digest(src, root), "reprocess_waveform": _digest(wave, root),
            "reprocess_source": _digest(source, root), "reprocess_repack": _digest(repack, root),
            "stats": hashlib.sha256(stats_text.encode()).hexdigest()}


@pytest.fixture
def fixed_dir():
    """The samples record their source's absolute path, so the digests need the same folder on every run."""
    path = Path(tempfile.gettempdir()) / "cavmae-test-jobs-digest"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.pinned
def test_outputs_are_unchanged(fixed_dir):
    """In a fresh process with its own Ray and every CPU-dependent code path off (tests/simd_off.py)."""
    script = "import json, sys; from tests import simd_off; print(json.dumps(simd_off.digests(sys.argv[1])))"
    proc = subprocess.run([sys.executable, "-c", script, str(fixed_dir)], cwd=REPO, text=True, timeout=600,
                          env={**os.environ, **simd_off.ENV, "PYTHONPATH": str(REPO)},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == PINNED


@pytest.mark.pinned
def test_a_pinned_test_cannot_make_media_with_the_ffmpeg_cli(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg CLI is off"):
        make_clip(tmp_path, "cli", seconds=0.2, size=(32, 24))
    assert not list(tmp_path.iterdir())
    exact = make_exact_clip(tmp_path / "a", "exact", seconds=0.2, size=(32, 24))
    assert exact.read_bytes() == make_exact_clip(tmp_path / "b", "exact", seconds=0.2, size=(32, 24)).read_bytes()


# ---- a toy job: item n becomes one sample holding n; item STALL never ends ----------------------------------
STALL = 5
TOY_SETS = ["shards.samples_per_shard=2", "ray.videos_per_task=1", "ray.video_timeout_s=2", "ray.max_retries=1"]


def _toy_samples(n: int, _ahead, cfg):
    time.sleep(3600 if n == STALL else 0.2)
    yield f"n{n:03d}", {}, [(f"n{n:03d}.json", json.dumps({"n": n}).encode())]


TOY = ShardJob("toy", samples=_toy_samples, who=lambda n: (f"n{n:03d}", f"toy:{n}", []))


def run_toy(out: str, count: int = 12):
    def pick(rows, planned):
        have = {r["video_id"] for r in rows} | planned
        return [n for n in range(count) if f"n{n:03d}" not in have], []

    return run_shard_job(TOY, Store.of(out), load_config(sets=TOY_SETS), pick, workers=2, address=None,
                         progress=False, desc="toy")


def test_a_toy_job_resumes_after_kill_9_holds_the_lock_and_times_out(local_ray, tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    script = ("import sys; from cavmae.preprocess.settings import register_sections; register_sections()\n"
              "from tests.test_jobs import run_toy; run_toy(sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while len(list(killed.glob("_parts/shard-*.parquet"))) < 2:  # two shards done (their manifest fragments)
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    with pytest.raises(OutputBusy):  # the running job holds the folder
        run_toy(str(killed))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "_plan.json").exists() and not (killed / "manifest.parquet").exists()

    resumed = run_toy(str(killed))
    assert resumed.items <= 8  # the shards done before the kill are not made again
    run_toy(str(clean))
    names = sorted(p.name for p in clean.glob("shard-*.tar"))
    assert len(names) == 6 and names == sorted(p.name for p in killed.glob("shard-*.tar"))
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes(), name
    rows = {r["video_id"]: r for r in read_manifest(Store.of(str(clean)))}
    assert rows == {r["video_id"]: r for r in read_manifest(Store.of(str(killed)))} and len(rows) == 12
    assert rows[f"n{STALL:03d}"]["status"] == "failed"
    assert rows[f"n{STALL:03d}"]["error"] == "timed out after 2 s"
    assert all(r["status"] == "ok" for v, r in rows.items() if v != f"n{STALL:03d}")
    assert not list(killed.glob("_*")) and not list(killed.glob(".*"))
