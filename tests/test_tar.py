"""The one tar layer (`shards.tar`) and grouping (`shards.samples`) against `tarfile`: every regular member of every
archive `tarfile` reads comes back with the same name and bytes, or the shard is one clean error."""

import gzip
import io
import lzma
import os
import random
import shutil
import subprocess
import tarfile

import numpy as np
import pytest

from cavmae.shards.index import SampleIndex, SpanReader, read_raw_sample, sample_index, scan_spans
from cavmae.shards.reader import decode_sample, raw_samples
from cavmae.shards.schema import BadSample, make_key, sample_members
from cavmae.shards.tar import ShardError, read_members
from cavmae.shards.writer import ShardWriter, write_shard


def ours(data: bytes) -> list[tuple[str, bytes]]:
    return [(name, member) for name, member, _, _ in read_members(io.BytesIO(data), "x.tar")]


def theirs(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


def random_name(rng: random.Random, longest: int) -> str:
    alphabet = "abcXYZ019_-.é€/ "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, longest))).strip("/") or "n"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_random_tarfile_archives_read_as_tarfile_reads_them(fmt):
    rng = random.Random(fmt)
    for _ in range(150):
        buf = io.BytesIO()
        glob = {"comment": "g" * rng.randint(0, 700)} if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3 else None
        with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=glob) as tar:
            for _ in range(rng.randint(0, 6)):
                info = tarfile.TarInfo(random_name(rng, 99 if fmt == tarfile.USTAR_FORMAT else 255))
                roll = rng.random()
                if roll < 0.1:
                    info.type = tarfile.DIRTYPE
                elif roll < 0.2:
                    info.type = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE])
                    info.linkname = random_name(rng, 99 if fmt == tarfile.USTAR_FORMAT else 200)
                elif roll < 0.25:
                    info.type = rng.choice([tarfile.FIFOTYPE, tarfile.CHRTYPE])
                if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3:
                    info.pax_headers = {"comment": "c" * rng.randint(0, 900), "mtime": "1.5"}
                data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randint(0, 3 * 512)]))
                if info.isreg():
                    info.size = len(data)
                try:
                    tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
                except ValueError:  # a name ustar cannot hold
                    pass
        try:
            want = theirs(buf.getvalue())
        except tarfile.ReadError:  # a global header and no member: tarfile reads none (outside the contract)
            continue
        assert ours(buf.getvalue()) == want


@pytest.mark.skipif(not shutil.which("tar"), reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "pax", "ustar", "v7"])
def test_gnu_tar_archives_read_as_tarfile_reads_them(tmp_path, fmt):
    rng = random.Random(fmt)
    root = tmp_path / "root"
    longest = {"v7": 90, "ustar": 90}.get(fmt, 240)
    made = 0
    for i in range(30):
        name = "".join(rng.choice("abcxyz019_-.") for _ in range(rng.randint(1, longest)))
        folder = root / ("sub" * rng.randint(0, 2))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}{name}"
        if len(str(path.relative_to(root))) > longest:
            continue
        path.write_bytes(rng.randbytes(rng.randint(0, 3 * 512)))
        made += 1
    os.symlink("0", root / "link")
    out = tmp_path / "x.tar"
    subprocess.run(["tar", f"--format={fmt}", "-C", str(root), "-cf", str(out), "."], check=True)
    data = out.read_bytes()
    assert len(ours(data)) == made and ours(data) == theirs(data)


def test_sparse_members_and_compressed_files_are_one_error(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    for fmt in ("gnu", "pax"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "-C", str(tmp_path), "-cf", str(out), "sparse"],
                       check=True)
        assert any(m.issparse() for m in tarfile.open(out).getmembers()) or fmt == "pax"
        with pytest.raises(ShardError, match="sparse"):
            ours(out.read_bytes())
    plain = io.BytesIO()
    write_tar = tarfile.open(fileobj=plain, mode="w")
    write_tar.close()
    for packed, kind in ((gzip.compress(plain.getvalue()), "gzip"), (lzma.compress(plain.getvalue()), "xz")):
        with pytest.raises(ShardError, match=f"x.tar: is a {kind}-compressed file"):
            ours(packed)


def _project_shard(path, keys=("clip_a", "clip_b")):
    rng = np.random.default_rng(0)
    members = []
    for key in keys:
        members += sample_members(key, {"video_id": key}, rng.standard_normal((5, 4)).astype(np.float32),
                                  [b"\xff\xd8jpeg" * (3 + i) for i in range(3)], label_indices=[1])
    with ShardWriter(path.parent, path.name) as shard:
        shard.add(members)
    return shard.spans


def test_every_cut_of_a_shard_is_an_error(tmp_path):
    """Truncation at every block boundary and inside data and padding: never a clean, shorter read."""
    shard = tmp_path / "s.tar"
    _project_shard(shard)
    data = shard.read_bytes()
    marker_end = len(data.rstrip(b"\0")) + 1024  # through the two zero blocks (the rest is record padding)
    marker_end += -marker_end % 512
    cuts = set(range(0, marker_end, 512)) | {n * 512 + d for n in range(marker_end // 512) for d in (1, 100, 511)}
    for cut in sorted(cuts):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match="cut.tar"):
            list(raw_samples([str(tmp_path / "cut.tar")]))
    for cut in range(marker_end, len(data) + 1, 512):  # the end-of-archive marker is whole: a complete archive
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        assert [s["__key__"] for s in raw_samples([str(tmp_path / "cut.tar")])] == ["clip_a", "clip_b"]


def test_a_cut_shard_read_at_manifest_spans_names_the_damaged_sample(tmp_path):
    shard = tmp_path / "s.tar"
    spans = _project_shard(shard)
    rows = [{"key": k, "shard": "s.tar", "offset": o, "length": n, "status": "ok"} for k, (o, n) in spans.items()]
    shard.write_bytes(shard.read_bytes()[:spans["clip_b"][0] + 700])  # inside clip_b's first member
    index = sample_index([str(shard)], rows)
    reader = SpanReader()
    assert decode_sample(read_raw_sample(reader, index, 0))["key"] == "clip_a"
    with pytest.raises(OSError, match="s.tar.*truncated"):
        read_raw_sample(reader, index, 1)


def test_long_keys_are_written_and_read_on_every_path(tmp_path):
    keys = [make_key("v" * 100), make_key("w" * 128), make_key("x" * 128, 7)]
    assert keys[0] == "v" * 100 and len(keys[1]) == 121 and len(keys[2]) <= 128
    shard = tmp_path / "long.tar"
    spans = _project_shard(shard, keys)
    again = tmp_path / "again.tar"
    _project_shard(again, keys)
    assert again.read_bytes() == shard.read_bytes()  # pax headers are as deterministic as the rest
    with tarfile.open(shard) as tar:
        assert [m.name for m in tar.getmembers()][0] == f"{keys[0]}.json"
    assert [decode_sample(r)["key"] for r in raw_samples([str(shard)])] == keys
    assert [k for k, _, _ in scan_spans(str(shard))] == keys
    assert [(o, n) for _, o, n in scan_spans(str(shard))] == [spans[k] for k in keys]
    index = sample_index([str(shard)])
    assert [decode_sample(read_raw_sample(SpanReader(), index, i))["key"] for i in range(3)] == keys


def test_short_names_give_the_bytes_ustar_gave(tmp_path):
    """The pax writer writes a ustar-fitting name exactly as the former ustar writer did (stable shard digests)."""
    members = sample_members("clip", {"video_id": "clip"}, np.zeros((2, 3), np.float32), [b"jpg"])
    write_shard(tmp_path / "new.tar", members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
            tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "new.tar").read_bytes() == buf.getvalue()


def test_dot_slash_names_directories_and_foreign_members_are_the_same_on_every_path(tmp_path, caplog):
    """`tar -C dir -cf x.tar .` of a shard's members reads as the shard does, on the streaming and the index path;
    a directory, a member outside the schema and a `../` name are counted and named."""
    shard = tmp_path / "s.tar"
    _project_shard(shard)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            (root / m.name).write_bytes(tar.extractfile(m).read())
    (root / "clip_b.pyd").write_bytes(b"pickle")
    dotted = tmp_path / "dotted.tar"
    subprocess.run(["tar", "--sort=name", "-C", str(root), "-cf", str(dotted), "."], check=True)
    with tarfile.open(dotted, "a") as tar:
        info = tarfile.TarInfo("../../x.fbank.npy")
        tar.addfile(info, io.BytesIO(b""))
    caplog.set_level("WARNING")
    raws = list(raw_samples([str(dotted)]))
    assert [r["__key__"] for r in raws] == ["clip_a", "clip_b", "../../x"]
    assert decode_sample(raws[0])["key"] == "clip_a"
    for raw, why in ((raws[1], "clip_b.pyd"), (raws[2], "key")):
        with pytest.raises(BadSample, match=why):
            decode_sample(raw)
    assert "skipped 1 member(s)" in caplog.text and "'./' (directory)" in caplog.text
    assert [k for k, _, _ in scan_spans(str(dotted))] == ["clip_a"]  # the other two named in warnings
    assert "'../../x' left out of the index" in caplog.text and "'clip_b' left out" in caplog.text
    index = sample_index([str(dotted)])
    assert isinstance(index, SampleIndex) and decode_sample(read_raw_sample(SpanReader(), index, 0))["key"] == "clip_a"


def test_git_archive_and_webdataset_tarwriter_read_as_tarfile_reads_them(tmp_path):
    """`git archive` (a pax global header with the commit id, long paths) and webdataset's own TarWriter."""
    import webdataset as wds

    repo = tmp_path / "repo"
    (repo / "deep" / ("d" * 90)).mkdir(parents=True)
    (repo / "deep" / ("d" * 90) / ("f" * 120 + ".txt")).write_bytes(b"long path\n" * 80)
    (repo / "short.txt").write_bytes(b"")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    archive = subprocess.run(git + ["archive", "--format=tar", "HEAD"], check=True, capture_output=True).stdout
    assert len(ours(archive)) == 2 and ours(archive) == theirs(archive)

    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}" + "k" * 100, "json": b"{}", "txt": "x" * (i * 300)})
    assert len(ours(buf.getvalue())) == 6 and ours(buf.getvalue()) == theirs(buf.getvalue())



def test_a_fifo_named_like_a_frame_fails_its_sample_on_every_path(tmp_path, caplog):
    """A FIFO member named like sample b's last frame (after its regular members): the scan, the streaming reader
    and a ranged read of b's span from the manifest all fail b, naming the member (counted as any bad sample),
    rather than one path warning about it and the other taking b without that frame and without a word."""
    from PIL import Image

    from cavmae.shards.samples import read_groups

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    url = str(tmp_path / "shard-000000.tar")
    with tarfile.open(url, "w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("a", "b", "c"):
            for name, data in sample_members(key, {"video_id": key, "labels": []}, np.zeros((4, 8), np.float16),
                                             [jpeg.getvalue()]):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            if key == "b":
                fifo = tarfile.TarInfo("b.frame1.jpg")
                fifo.type = tarfile.FIFOTYPE
                tar.addfile(fifo)
    why = "member 'b.frame1.jpg' is a FIFO, not a regular file"
    caplog.set_level("WARNING")

    assert [k for k, _, _ in scan_spans(url)] == ["a", "c"]
    assert f"sample 'b' left out of the index: {why}" in caplog.text
    raws = list(raw_samples([url]))
    assert [r["__key__"] for r in raws] == ["a", "b", "c"]
    with pytest.raises(BadSample, match=why):
        decode_sample(raws[1])
    with open(url, "rb") as f:  # the manifest's spans: contiguous, each sample's members and what follows them
        groups = list(read_groups(f, url))
    starts = [g.start for g in groups] + [groups[-1].end]
    rows = [{"url": url, "shard": "shard-000000.tar", "key": k, "offset": o, "length": e - o}
            for k, o, e in zip("abc", starts, starts[1:])]
    index = sample_index([url], rows)
    assert [index.key_of(i) for i in range(len(index))] == ["a", "b", "c"]
    reader = SpanReader()
    assert decode_sample(read_raw_sample(reader, index, 2))["key"] == "c"
    with pytest.raises(BadSample, match=why):
        decode_sample(read_raw_sample(reader, index, 1))
