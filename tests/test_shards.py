"""The on-disk contract: keys, deterministic atomic tars, stock-webdataset readability, safe decoding."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cavmae.shards.errors import NotFound
from cavmae.shards.manifest import merge_rows, read_rows, write_rows
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from cavmae.shards.schema import BadSample, all_finite, decode_npy, make_key, sample_members
from cavmae.shards.writer import write_shard


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _members(key="clip_a", frames=3):
    meta = {"video_id": "clip.a", "labels": ["/m/x"], "duration_s": 1.5}
    fbank = np.arange(12, dtype=np.float32).reshape(3, 4)
    return sample_members(key, meta, fbank, [_jpeg((10 * i, 0, 0)) for i in range(frames)], flac=None,
                          label_indices=[3, 17])


@pytest.mark.parametrize("video_id", ["--4gqARaEJE_30.000", "a/b", "a.b", "", "ünï cødé", "x" * 300])
def test_keys_are_safe_distinct_and_stable(video_id):
    key = make_key(video_id)
    assert key and "." not in key and "/" not in key and len(key) <= 128
    assert key == make_key(video_id)
    assert make_key(video_id, 3).endswith("_w0003") and len(make_key(video_id, 99999)) <= 128


def test_keys_do_not_collide_after_sanitising():
    ids = ["a.b", "a_b", "a/b", "a b"]
    assert len({make_key(i) for i in ids}) == len(ids)
    assert make_key("plain_id-1") == "plain_id-1"


def test_shard_is_deterministic_atomic_and_stock_readable(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, _members())
    write_shard(b, _members())
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))
    with tarfile.open(a) as tar:
        infos = tar.getmembers()
    assert [i.name for i in infos][:2] == ["clip_a.json", "clip_a.fbank.npy"]
    assert {(i.mtime, i.uid, i.gid, i.uname) for i in infos} == {(0, 0, 0, "")}

    (sample,) = list(wds.WebDataset(str(a), shardshuffle=False).decode("pil"))
    assert sample["__key__"] == "clip_a"
    assert sample["json"]["video_id"] == "clip.a"
    assert isinstance(sample["frame2.jpg"], Image.Image)
    raw = next(iter(wds.WebDataset(str(a), shardshuffle=False)))
    assert np.load(io.BytesIO(raw["fbank.npy"]), allow_pickle=False).dtype == np.float16


def test_our_reader_decodes_the_schema(tmp_path):
    write_shard(tmp_path / "s.tar", _members())
    (raw,) = list(raw_samples([str(tmp_path / "s.tar")]))
    sample = decode_sample(raw)
    assert sample["meta"]["labels"] == ["/m/x"]
    assert sample["fbank"].shape == (3, 4) and sample["fbank"].dtype == np.float16
    assert len(sample["frames"]) == 3 and sample["labels"] == [3, 17] and sample["flac"] is None


def test_writer_refuses_members_outside_the_schema(tmp_path):
    with pytest.raises(BadSample):
        write_shard(tmp_path / "s.tar", [("k.pyd", b"x")])
    with pytest.raises(BadSample):
        sample_members("bad.key", {}, None, [])
    assert not (tmp_path / "s.tar").exists()


def test_reader_rejects_pickles_and_junk(tmp_path):
    """A hostile shard: a pickle member (webdataset's default handlers would unpickle it) and a pickled npy."""
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        for name, data in [("k.json", json.dumps({"video_id": "k"}).encode()),
                           ("k.fbank.npy", _pickled_npy()), ("k.pyd", pickle.dumps({"x": 1}))]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (raw,) = list(raw_samples([str(evil)]))
    with pytest.raises(BadSample, match="evil.tar: sample 'k'"):
        decode_sample(raw)
    raw.pop("pyd"), raw.pop("__problem__")  # the grouping named the foreign member; now the pickle alone
    with pytest.raises(BadSample, match="fbank.npy has dtype object"):
        decode_sample(raw)


def _pickled_npy():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_list_shards_forms(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"shard-{i:06d}.tar", _members())
    (tmp_path / ".shard-000009.tar.tmp-1").write_bytes(b"")
    assert len(list_shards(str(tmp_path))) == 3
    assert len(list_shards(str(tmp_path / "shard-{000000..000001}.tar"))) == 2
    assert list_shards(f"{tmp_path}/shard-000000.tar::{tmp_path}/shard-000002.tar")[-1].endswith("2.tar")
    with pytest.raises(NotFound, match="no shards found"):
        list_shards(str(tmp_path / "missing-{0..1}.tar"))


def test_manifest_round_trip_and_merge(tmp_path):
    rows = [{"video_id": "b", "status": "failed", "error": "no audio stream", "labels": []},
            {"video_id": "a", "key": "a", "status": "ok", "shard": "shard-000000.tar", "labels": ["/m/x"],
             "bytes": 10, "duration_s": 1.0}]
    write_rows(tmp_path / "m.parquet", rows)
    back = read_rows(tmp_path / "m.parquet")
    assert [r["video_id"] for r in back] == ["a", "b"]
    assert back[1]["error"] == "no audio stream" and back[0]["labels"] == ["/m/x"]
    merged = merge_rows(back, [{"video_id": "b", "status": "ok"}])
    assert sorted((r["video_id"], r["status"]) for r in merged) == [("a", "ok"), ("b", "ok")]


def test_our_tar_parser_yields_what_webdataset_does(tmp_path):
    """raw_samples (the tar layer and grouping) against webdataset's own tar iteration, on real shards."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    for i in range(2):
        write_shard(tmp_path / f"s{i}.tar", _members(f"k{i}") + _members(f"k{i}b", frames=2))
    urls = [str(tmp_path / f"s{i}.tar") for i in range(2)]
    theirs = []
    for url in urls:
        with open(url, "rb") as f:
            theirs += list(group_by_keys(tar_file_expander([{"url": url, "stream": f}])))
    assert list(raw_samples(urls)) == theirs


@pytest.mark.parametrize("damage", ["truncated", "checksum", "huge_size"])
def test_tar_parser_refuses_damaged_or_hostile_headers(tmp_path, damage):
    write_shard(tmp_path / "s.tar", _members())
    data = bytearray((tmp_path / "s.tar").read_bytes())
    if damage == "truncated":  # inside the first member's data
        data = data[: 512 + 20]
    elif damage == "checksum":
        data[0] ^= 1
    else:  # a header claiming 8 GiB: refused before any allocation, with a valid checksum
        data[124:136] = b"%011o\0" % (8 << 30)
        data[148:156] = b" " * 8
        data[148:156] = b"%06o\0 " % sum(data[:512])
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(tarfile.TarError):
        list(raw_samples([str(tmp_path / "bad.tar")]))


def test_a_process_that_read_a_manifest_exits_cleanly(tmp_path):
    """pyarrow's threaded parquet read from memory left its thread pool aborting the interpreter at exit in about
    half of the runs ("terminate called without an active exception", status 134): a CLI that printed its result
    then died. Five fresh processes each read a manifest; every one must exit 0."""
    import subprocess
    import sys
    from pathlib import Path

    rows = [{"video_id": f"v{i}", "key": f"v{i}", "status": "ok", "shard": "shard-000000.tar", "labels": ["/m/a"]}
            for i in range(50)]
    write_rows(tmp_path / "manifest.parquet", rows)
    code = f"from cavmae.shards.manifest import read_manifest; assert len(read_manifest({str(tmp_path)!r})) == 50"
    repo = Path(__file__).resolve().parents[1]
    codes = [subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True).returncode for _ in range(5)]
    assert codes == [0] * 5


def test_finish_flushes_and_exits_with_the_status_without_teardown(tmp_path):
    """`shards.process.finish` ends a CLI with `os._exit` (no interpreter teardown of native thread pools): what was
    printed and logged before it still arrives in full, through a pipe, and the status is the one given, even with
    pyarrow's pools and torch's running."""
    import subprocess
    import sys
    from pathlib import Path

    write_rows(tmp_path / "manifest.parquet", [{"video_id": "v", "key": "v", "status": "ok"}])
    code = (f"import logging, torch; from cavmae.shards.manifest import read_manifest; "
            f"from cavmae.shards.process import finish\n"
            f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
            f"read_manifest({str(tmp_path)!r}); torch.ones(256, 256) @ torch.ones(256, 256)\n"
            f"logging.info('done'); print('x' * 200000, end=''); finish(3)")
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-2000:]
    assert res.stdout == "x" * 200000 and "terminate called" not in res.stderr
    assert "done" in (tmp_path / "log.txt").read_text()


def test_decode_npy_and_all_finite_agree_with_numpy():
    """The fast fbank path (one cached header parse, a bit test for float16) gives what np.load and np.isfinite
    give: every float16 class (subnormal, max, ±inf, NaN), Fortran order, npy version 2 headers."""
    halves = np.array([0.0, -0.0, 6e-8, 65504.0, -65504.0, np.inf, -np.inf, np.nan], dtype=np.float16)
    for value in halves:
        for dtype in (np.float16, np.float32, np.float64):
            array = np.full((3, 4), 1.5, dtype=dtype)
            array[1, 2] = value
            assert all_finite(array) == bool(np.isfinite(array).all()), (value, dtype)
    for array, version in ((np.arange(12, dtype=np.float16).reshape(3, 4), None),
                           (np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)), None),
                           (np.arange(6, dtype=np.float64).reshape(2, 3), (2, 0))):
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array, version=version)
        got = decode_npy(buf.getvalue())
        assert got.dtype == array.dtype and got.flags.writeable and np.array_equal(got, array)
        assert got.flags.f_contiguous == array.flags.f_contiguous
