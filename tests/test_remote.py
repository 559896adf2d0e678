"""Remote inputs and outputs: a real S3-compatible server (moto's server mode on 127.0.0.1, started here)
through pyarrow's S3FileSystem, and `file://` URIs. No mocks: bytes go over HTTP to a real server."""

import logging
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
import torch

from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.reprocess import reprocess, reprocess_config
from cavmae.shards.config import load_config
from cavmae.shards.frozen import adopt_shard_settings
from cavmae.shards.index import sample_index
from cavmae.shards.manifest import read_manifest, read_rows
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from cavmae.shards.store import Store
from cavmae.train.cli import main
from cavmae.train.epochs import EpochPlan
from cavmae.train.loaders import train_loader
from cavmae.train.transform import Transform
from tests.clips import make_clip
from tests.conftest import LOCAL_RAY
from tests.train_fixtures import write_synthetic_shards

SMALL = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=2"]
BUCKET = "cavmae-test"


@pytest.fixture(scope="module")
def s3_server():
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        # Ray workers inherit the environment of the process that starts Ray: start it after the env is set
        ray.init(**LOCAL_RAY)
        yield endpoint
    finally:
        ray.shutdown()
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def videos(clips_dir):
    return [make_clip(clips_dir / "remote", f"r{i}", seconds=1.0, size=(64, 48), tone_hz=300 + 50 * i)
            for i in range(3)]


def _tree(store: Store) -> dict[str, bytes]:
    return {n: store.read_bytes(n) for n in store.list(recursive=True)}


def test_ingest_to_s3_equals_local_and_reads_back(s3_server, videos, tmp_path):
    cfg = load_config(sets=SMALL)
    inputs = [str(p) for p in videos]
    local = ingest(inputs, tmp_path / "local", cfg)
    remote = ingest(inputs, f"s3://{BUCKET}/run1/shards", cfg)
    assert (local.ok, remote.ok) == (3, 3)

    s3 = Store.of(f"s3://{BUCKET}/run1/shards")
    assert s3.fs.type_name == "s3"
    names = sorted(s3.list(recursive=True))
    # only published files: shards, manifest, frozen config (no plan, fragments or temporaries)
    assert names == ["manifest.parquet", "pipeline.yaml", "shard-000000.tar", "shard-000001.tar"]
    for name in ("shard-000000.tar", "shard-000001.tar", "pipeline.yaml"):
        assert s3.read_bytes(name) == (tmp_path / "local" / name).read_bytes()
    assert read_manifest(s3) == read_manifest(tmp_path / "local")

    # the streaming reader lists and opens the shards from the bucket
    urls = list_shards(f"s3://{BUCKET}/run1/shards/")
    samples = [decode_sample(r) for r in raw_samples(urls)]
    assert sorted(s["meta"]["video_id"] for s in samples) == ["r0", "r1", "r2"]
    # ingest records where each sample lies: the manifest's offsets are what a scan of the shards finds
    rows = read_manifest(s3)
    assert all(r["offset"] is not None and r["length"] > 0 for r in rows)
    assert (sample_index(urls, rows).offset == sample_index(urls).offset).all()
    # training takes the sample-side settings from the pipeline.yaml in the bucket
    adopted = adopt_shard_settings(load_config(), urls)
    assert (adopted.video.image_size, adopted.video.num_frames) == (32, 2)

    # a re-run resumes from the remote manifest: nothing to do
    again = ingest(inputs, f"s3://{BUCKET}/run1/shards", cfg)
    assert (again.videos, again.already) == (0, 3)

    # reprocess reads a unit's samples from the bucket by ranged reads: the same shards as from the local copy
    sets = ["shards.samples_per_shard=3", "ray.videos_per_task=1"]
    for src, out in ((f"s3://{BUCKET}/run1/shards", tmp_path / "re_s3"), (tmp_path / "local", tmp_path / "re_local")):
        assert reprocess(src, out, reprocess_config(src, sets=sets)).ok == 3
    made = [p.name for p in (tmp_path / "re_local").glob("shard-*.tar")]
    assert made == ["shard-000000.tar"]
    assert (tmp_path / "re_s3" / made[0]).read_bytes() == (tmp_path / "re_local" / made[0]).read_bytes()
    assert read_manifest(tmp_path / "re_s3") == read_manifest(tmp_path / "re_local")


def test_training_reads_an_epoch_from_s3_with_ranged_reads(s3_server, tmp_path, capsys):
    """The same epoch, sample for sample, from the bucket as from the local copy: the index from the remote
    manifest's offsets (or from a scan when the manifest is gone), each sample one ranged read."""
    local = tmp_path / "local"
    write_synthetic_shards(local, 11, 4)
    s3 = Store.of(f"s3://{BUCKET}/epochs")
    for p in sorted(local.iterdir()):
        s3.write_bytes(p.name, p.read_bytes())

    def keys(shards):
        capsys.readouterr()
        assert main(["order", "--shards", shards, "--epoch", "2", "--world-size", "2", "--rank", "1",
                     "--set", "pretrain.batch_size=4"]) == 0
        return capsys.readouterr().out

    assert keys(f"s3://{BUCKET}/epochs/") == keys(str(local)) and len(keys(str(local)).split()) == 4
    urls = list_shards(f"s3://{BUCKET}/epochs/")
    rows = read_rows(f"s3://{BUCKET}/epochs/manifest.parquet")
    index = sample_index(urls, rows)
    assert (index.offset == sample_index(urls).offset).all()  # manifest offsets = a scan of the remote shards
    tf = Transform({"target_length": 128, "mean": -5.081, "std": 4.4849, "image_size": 64,
                    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
                   {"freqm": 8, "timem": 8, "mixup": 0.5, "noise": True, "label_smooth": 0.1}, frame="random",
                   num_frames=4, num_classes=4, label_map=None, label_file=None, seed=0)
    plan = EpochPlan(size=11, samples=11, global_batch=4, accum_steps=1, world_size=1, rank=0, seed=0)
    remote = list(train_loader(index, tf, plan, epoch=1, first=0, count=2, num_workers=0))
    here = list(train_loader(sample_index(list_shards(str(local))), tf, plan, epoch=1, first=0, count=2,
                             num_workers=0))
    for a, b in zip(remote, here):
        assert a["key"] == b["key"] and torch.equal(a["audio"], b["audio"]) and torch.equal(a["image"], b["image"])


def test_remote_inputs_from_s3(s3_server, videos, tmp_path):
    s3 = Store.of(f"s3://{BUCKET}/videos")
    for p in videos:
        s3.write_bytes(f"set/{p.name}", p.read_bytes())
    s3.write_bytes("set/notes.txt", b"not a video")
    cfg = load_config(sets=SMALL)
    summary = ingest([f"s3://{BUCKET}/videos/", f"s3://{BUCKET}/videos/missing.mp4"], tmp_path / "out", cfg)
    rows = {r["video_id"]: r for r in read_manifest(tmp_path / "out")}
    assert {v for v, r in rows.items() if r["status"] == "ok"} == {"r0", "r1", "r2"}
    assert rows["r0"]["source"] == f"s3://{BUCKET}/videos/set/r0.mp4"
    assert rows["missing"]["status"] == "failed" and "not found" in rows["missing"]["error"]
    assert summary.ok == 3
    # same samples as from the local files, apart from the recorded source
    local = ingest([str(p) for p in videos], tmp_path / "local", cfg)
    assert local.ok == 3
    a = {s["key"]: s for s in map(decode_sample, raw_samples(list_shards(str(tmp_path / "out"))))}
    b = {s["key"]: s for s in map(decode_sample, raw_samples(list_shards(str(tmp_path / "local"))))}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k]["frames"] == b[k]["frames"] and (a[k]["fbank"] == b[k]["fbank"]).all()
        assert a[k]["meta"]["source"].startswith("s3://")


def test_failed_upload_publishes_nothing(s3_server):
    s3 = Store.of(f"s3://{BUCKET}/atomic")
    with pytest.raises(RuntimeError):
        with s3.publish("shard-000000.tar") as f:
            f.write(b"half a shard")
            raise RuntimeError("task died")
    assert s3.list(recursive=True) == []
    with s3.publish("shard-000000.tar") as f:
        f.write(b"a whole shard")
    assert s3.read_bytes("shard-000000.tar") == b"a whole shard"
    assert isinstance(s3.fs, pafs.S3FileSystem) and not s3.renames


def test_file_uri_output(s3_server, videos, tmp_path):
    cfg = load_config(sets=SMALL)
    uri = f"file://{tmp_path}/viauri"
    summary = ingest([str(videos[0])], uri, cfg)
    assert summary.ok == 1
    out = Path(tmp_path / "viauri")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "pipeline.yaml", "shard-000000.tar"]
    store = Store.of(uri)
    assert store.local and store.renames and read_manifest(uri)[0]["status"] == "ok"
    # a failed local publish leaves neither the final name nor its temporary
    with pytest.raises(RuntimeError):
        with store.publish("x.tar") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not list(out.glob("x.tar")) and not list(out.glob(".x.tar*"))
