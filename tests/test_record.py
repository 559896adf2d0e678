"""A sample is one record driven by `shards.schema.MEMBER_KINDS` (issue 27): a member kind added in this test (its
table entry, its producer at ingest, its consumer) survives ingest → reprocess in every mode → training → inspect →
verify; every reader runs the one checked-sample loop (`shards.checked`) and reprocess the readers' validator; a
sample's byte span has one parser."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray

from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.inspect_shards import pick
from cavmae.preprocess.reprocess import _remake, reprocess, reprocess_config
from cavmae.preprocess.verify import verify_shard
from cavmae.shards import schema
from cavmae.shards.checked import checked_groups, checked_samples
from cavmae.shards.config import load_config
from cavmae.shards.frozen import SAMPLE_SECTIONS
from cavmae.shards.index import SpanReader, sample_index
from cavmae.shards.manifest import read_manifest, shard_manifests
from cavmae.shards.reader import list_shards
from cavmae.shards.schema import BadSample, MemberKind, add_member_kind, encode_npy, record_members
from cavmae.shards.validate import SampleSpec
from cavmae.train.epochs import EpochPlan
from cavmae.train.loaders import EpochBatches, decoded_samples, train_loader
from cavmae.train.transform import Transform
from tests.clips import make_clip
from tests.conftest import LOCAL_RAY

SETS = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=2",
        "audio.keep_waveform=true", "ray.videos_per_task=1"]
RUN = ["shards.samples_per_shard=2", "ray.videos_per_task=1"]
DATA = {"target_length": 128, "mean": -5.081, "std": 4.4849, "image_size": 32,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
NO_AUG = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}


def caption_of(clip, meta) -> str:
    """The new kind's producer: what ingest writes for a clip (a caption model would go here)."""
    return f"{meta['video_id']} from {meta['clip_start_s']:.2f}s"


def decode_caption(data: bytes) -> str:
    text = data.decode("utf-8")  # (a UnicodeDecodeError is a ValueError: `decode_sample` makes it a BadSample)
    if not text or len(text) > 200:
        raise BadSample("caption.txt is empty or longer than 200 characters")
    return text


CAPTION = MemberKind(r"caption\.txt", "caption.txt", "caption", decode_caption, str.encode, produce=caption_of)


def add_caption() -> None:
    """Ray's `worker_process_setup_hook`: every worker knows the kind, as the driver does."""
    add_member_kind(CAPTION)


@pytest.fixture
def caption_kind():
    """The kind in this process (without its producer, so an in-process source remake has to carry it over), and in
    the Ray workers (with it); the table is restored afterwards."""
    saved = schema.MEMBER_KINDS, schema._KINDS
    add_member_kind(replace(CAPTION, produce=None))
    ray.init(**LOCAL_RAY, runtime_env={"worker_process_setup_hook": add_caption,  # (a worker imports tests/ so)
                                       "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()
    schema.MEMBER_KINDS, schema._KINDS = saved
    schema.member_kind.cache_clear()


def captions(folder) -> dict[str, str]:
    """key → caption of every sample of a shard folder, through the one checked-sample loop (nothing skipped)."""
    def fail(skip):
        raise AssertionError(skip.line())

    return {s["key"]: s["caption"] for s in checked_samples(list_shards(str(folder)), on_skip=fail)}


def test_a_member_kind_added_here_survives_every_stage(caption_kind, tmp_path):
    videos = tmp_path / "videos"
    for i in range(3):
        make_clip(videos, f"v{i}", seconds=1.0 + 0.5 * i, size=(64, 48), tone_hz=300 + 70 * i)
    src = tmp_path / "src"
    assert ingest([str(videos)], src, load_config(sets=SETS)).ok == 3
    made = captions(src)
    assert sorted(made) == ["v0", "v1", "v2"] and made["v1"] == "v1 from 0.00s"

    # reprocess: repack and waveform carry it over, source makes it anew (its producer is the workers')
    for name, sets, kw in [("repack", ["shards.samples_per_shard=3"], {}),
                           ("waveform", ["audio.num_mel_bins=64"], {}),
                           ("source", ["video.num_frames=3"], {"sources": [str(videos)]})]:
        out = tmp_path / name
        assert reprocess(src, out, reprocess_config(src, sets=RUN + sets), **kw).mode == name
        assert captions(out) == made, name

    # in this process the kind has no producer: a source remake carries SRC's member over, byte for byte
    cfg = reprocess_config(src, sets=RUN + ["video.num_frames=3"])
    (group, _), = [g for g in checked_groups(str(src / "shard-000000.tar")) if g[0].key == "v0"]
    [(key, meta, members)] = _remake({"video_id": "v0", "source": str(videos / "v0.mp4"), "labels": []},
                                     [("v0", group.raw())], cfg, "source", cfg.digest(*SAMPLE_SECTIONS),
                                     (str(videos),))
    assert [n for n in dict(members) if not n.startswith("v0.frame")] == \
        ["v0.json", "v0.fbank.npy", "v0.flac", "v0.caption.txt"]
    assert dict(members)["v0.caption.txt"] == group.members["caption.txt"]
    assert sum(n.startswith("v0.frame") for n in dict(members)) == 3

    # training: the ranged reads and the evaluation stream hand the kind on; nothing is skipped
    index = sample_index(list_shards(str(src)), read_manifest(src))
    tf = Transform(DATA, NO_AUG, frame="middle", num_frames=2, num_classes=0, label_map=None, label_file=None, seed=0)
    plan = EpochPlan(size=3, samples=3, global_batch=3, accum_steps=1, world_size=1, rank=0, seed=0)
    batches = EpochBatches(index, tf, plan, 0, 0, 1)
    assert {index.key_of(i): batches.sample(i, SpanReader())["caption"] for i in range(len(index))} == made
    streamed = list(decoded_samples(iter([{"url": u} for u in list_shards(str(src))])))
    assert {s["key"]: s["caption"] for s in streamed} == made and not any(s["_skipped"] for s in streamed)
    (batch,) = list(train_loader(index, tf, plan, epoch=0, first=0, count=1, num_workers=0))
    assert sorted(batch["key"]) == ["v0", "v1", "v2"] and batch["skipped"] == 0

    # inspect and verify read it, each by its kind
    assert [s["caption"] for s in pick(list_shards(str(src)), count=3, spec=SampleSpec(image_size=32))] == \
        [made[k] for k in sorted(made)]
    settings = load_config(sets=SETS).to_dict()
    for url, rows in shard_manifests(list_shards(str(src))).items():
        assert verify_shard(url, rows, settings)[1] == []


def test_a_field_without_a_kind_is_refused_not_dropped():
    with pytest.raises(ValueError, match="no member kind for field"):
        record_members("k", {"meta": {}, "caption": "a dog barks"})


def test_reprocess_holds_src_samples_to_the_readers_validator(local_ray, tmp_path):
    """repack and waveform modes used to check SRC's members one by one (not the validator): an fbank with an
    infinite value was copied on. Now that video fails, named; the others are made."""
    videos = tmp_path / "videos"
    for i in range(2):
        make_clip(videos, f"v{i}", seconds=1.5, size=(64, 48), tone_hz=300 + 70 * i)
    src = tmp_path / "src"
    assert ingest([str(videos)], src, load_config(sets=SETS)).ok == 2
    shard = src / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    (group, sample), = [g for g in checked_groups(str(shard)) if g[0].key == "v1"]
    old = encode_npy(sample["fbank"])
    bad = sample["fbank"].copy()
    bad[0, 0] = np.inf
    at = data.index(old, group.start)
    data[at:at + len(old)] = encode_npy(bad)  # same shape: same size, the manifest's spans still hold
    shard.write_bytes(bytes(data))
    for name, sets in [("repack", ["shards.samples_per_shard=3"]), ("waveform", ["audio.num_mel_bins=64"])]:
        summary = reprocess(src, tmp_path / name, reprocess_config(src, sets=RUN + sets))
        assert summary.mode == name and summary.ok == 1
        (failed,) = [r for r in read_manifest(tmp_path / name) if r["status"] == "failed"]
        assert failed["video_id"] == "v1" and "NaN or infinite" in failed["error"]


def test_a_span_holding_two_samples_is_named_not_unpacked(tmp_path):
    """verify read a damaged shard's samples at their manifest spans with `(group,) = ...`: a span holding two
    samples was "too many values to unpack". The one span parser names what it found."""
    from tests.test_verify import SETS as VSETS
    from tests.test_verify import shard_set

    rows = shard_set(tmp_path, keys=("a0", "a1", "a2"), mel=8)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(b"X" + shard.read_bytes()[1:])  # a0's first header is damaged: the scan stops at byte 0
    rows[1] = {**rows[1], "length": rows[1]["length"] + rows[2]["length"]}  # a1's span also holds a2
    good, problems = verify_shard(str(shard), rows, load_config(sets=VSETS).to_dict())
    assert any("'a1', 'a2' found where manifest.parquet puts sample 'a1'" in p for p in problems), problems
    assert not any("unpack" in p for p in problems)
