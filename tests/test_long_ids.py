"""Video ids of 100 and 128 characters go end to end: ingest → pretrain → embed → reprocess (member names past
ustar's 100 bytes, written with pax `path` records)."""

import pyarrow.parquet as pq

from cavmae.preprocess import cli as prep_cli
from cavmae.preprocess.ingest import ingest
from cavmae.shards.config import load_config
from cavmae.shards.manifest import read_manifest
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from cavmae.shards.schema import make_key
from cavmae.train import cli as train_cli
from tests.clips import make_clip

IDS = ["a" * 100, "B-" * 64]  # both in the key alphabet
PREP = ["clip.length_s=1.0", "video.num_frames=2", "video.image_size=32", "audio.keep_waveform=true"]
TRAIN = ["model.size=tiny", "model.target_length=128", "data.num_workers=0", "pretrain.epoch_samples=2",
         "pretrain.batch_size=2", "pretrain.epochs=1", "eval.batch_size=2"]


def sets(items):
    return [x for s in items for x in ("--set", s)]


def test_long_video_ids_end_to_end(tmp_path, local_ray, capsys):
    videos = tmp_path / "videos"
    for i, vid in enumerate(IDS):
        make_clip(videos, vid, seconds=1.0, size=(48, 32), tone_hz=300 + 100 * i)
    keys = sorted(make_key(v) for v in IDS)
    assert keys[0] != IDS[0] and len(keys[0]) == 121 and keys[1] == IDS[0]  # 128: cut at 112 and hashed

    src = tmp_path / "src"
    assert ingest([str(videos)], src, load_config(sets=PREP)).ok == 2
    rows = read_manifest(src)
    assert sorted(r["key"] for r in rows) == keys and sorted(r["video_id"] for r in rows) == sorted(IDS)
    samples = [decode_sample(r) for r in raw_samples(list_shards(str(src)))]
    assert sorted(s["key"] for s in samples) == keys

    run = tmp_path / "run"
    assert train_cli.main(["pretrain", "--shards", str(src), "--out", str(run)] + sets(TRAIN)) == 0
    checkpoint = run / "model.pth"
    out = tmp_path / "emb.parquet"
    capsys.readouterr()
    assert train_cli.main(["embed", "--shards", str(src), "--checkpoint", str(checkpoint), "--out", str(out),
                           "--no-progress"] + sets(TRAIN)) == 0
    assert sorted(pq.read_table(out).column("key").to_pylist()) == keys

    dst = tmp_path / "dst"
    assert prep_cli.main(["reprocess", str(src), "--out", str(dst), "--no-progress",
                          "--set", "audio.num_mel_bins=64"]) == 0
    remade = [decode_sample(r) for r in raw_samples(list_shards(str(dst)))]
    assert sorted(s["key"] for s in remade) == keys and {s["fbank"].shape[1] for s in remade} == {64}
    assert sorted(s["meta"]["video_id"] for s in remade) == sorted(IDS)
