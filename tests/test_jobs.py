"""The preprocessing job framework (`preprocess.jobs`): ingest, reprocess and stats give the very bytes they gave
before the framework existed (digests pinned below, taken on the code before the refactor), and a toy job of a
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
from tests.clips import make_clip

REPO = Path(__file__).resolve().parents[1]
SETS = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=2",
        "audio.keep_waveform=true", "ray.videos_per_task=1"]
# sha256 over every shard's name and bytes, the manifest's rows and pipeline.yaml (`_digest`); for stats, over
# stats.json without its folder. Taken with the drivers before `preprocess.jobs` (ingest.run_groups and
# schedule.run_units), on this repo's pinned PyAV/ffmpeg/Pillow/pyarrow (constraints.txt).
PINNED = {
    "ingest": "f1d0c64edc9183fffb64303cd496420bcadafd1505e98b285f8b62cc83dc55f9",
    "reprocess_waveform": "e3e9ade5bbf2ed0c956b1ba9cfbdf6ccac9b7bff4a62ee0ba5587e4feafb9259",
    "reprocess_source": "91a72af372f5c984921305e4b058b646a5b468a5d5246d63bd029a1a521e656d",
    "reprocess_repack": "cd008133cb6abf503c1053de16d0a9d09abc38fb19e7f5ead398b186369b567f",
    "stats": "95701c8717c7abbda4fd0e8677401870e82d0796d394387eab2c7bd6ad8eb723",  # + `missing` counts (issue 21)
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


@pytest.fixture
def fixed_dir():
    """The samples record their source's absolute path, so the digests need the same folder on every run."""
    path = Path(tempfile.gettempdir()) / "cavmae-test-jobs-digest"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_outputs_are_unchanged(local_ray, fixed_dir):
    root = fixed_dir
    videos = root / "videos"
    for i in range(5):
        make_clip(videos, f"v{i}", seconds=1.0 + 0.5 * i, size=(64, 48), tone_hz=300 + 70 * i)
    make_clip(videos, "silent", seconds=1.5, size=(64, 48), audio=False)
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
    got = {"ingest": _digest(src, root), "reprocess_waveform": _digest(wave, root),
           "reprocess_source": _digest(source, root), "reprocess_repack": _digest(repack, root),
           "stats": hashlib.sha256(stats_text.encode()).hexdigest()}
    assert got == PINNED


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
    script = "import sys; from tests.test_jobs import run_toy; run_toy(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
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
