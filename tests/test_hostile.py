"""Hostile input (issue 8): untrusted shards, configs and checkpoints never execute, escape or hang, and one bad
sample is a counted skip. The hostile corpus is built here at test time; every test runs under an alarm."""

import io
import itertools
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cavmae.preprocess import cli as prep_cli
from cavmae.preprocess.features import encode_flac
from cavmae.preprocess.inputs import LabelIndex, collect_inputs
from cavmae.preprocess.jobs import next_index
from cavmae.preprocess.reprocess import _videos_in_source_order
from cavmae.shards.config import ConfigError, load_config
from cavmae.shards.errors import NoSamples, one_line
from cavmae.shards.media import decode_flac, open_flac, open_jpeg
from cavmae.shards.names import PatternError, check_pattern, shard_index, shard_name
from cavmae.shards.reader import raw_samples
from cavmae.shards.samples import read_groups
from cavmae.shards.schema import BadSample, encode_npy, sample_members
from cavmae.shards.tar import read_members
from cavmae.shards.writer import write_shard
from cavmae.train import cli as train_cli
from cavmae.train.checkpoint import CheckpointError, read_checkpoint
from cavmae.train.loaders import decoded_samples, eval_loader
from cavmae.train.stage import model_settings
from cavmae.train.transform import Transform
from tests.conftest import time_limit

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64  # the configured frame size of these tests
DATA = {"target_length": 128, "mean": -5.081, "std": 4.4849, "image_size": SIZE, "num_mel_bins": 128,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
NO_AUG = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}
TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64", "data.num_workers=0",
        "video.num_frames=2"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke showpage\n%%EOF\n"


@pytest.fixture(autouse=True)
def no_hang():
    """Every case must finish: a hang (the old pax loop, a stream where nothing decodes) fails the test."""
    with time_limit(60, "hostile-input case"):
        yield


@pytest.fixture()
def fake_gs(tmp_path, monkeypatch):
    """A stand-in Ghostscript first on PATH that leaves a marker if anything runs it."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return marker


def jpeg(size=SIZE, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size) if isinstance(size, int) else size, color).save(buf, format="JPEG")
    return buf.getvalue()


def huge_header_jpeg(width=30000, height=30000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(jpeg(8))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def fbank(rows=40, bins=128, dtype=np.float16) -> np.ndarray:
    return np.random.default_rng(rows).normal(-5, 2, (rows, bins)).astype(dtype)


def npy_claiming(shape) -> bytes:
    """An npy member whose header claims `shape` (float16) but holds 16 bytes."""
    header = ("{'descr': '<f2', 'fortran_order': False, 'shape': %r, }" % (shape,)).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(16)


def good(key: str, label: int = 1) -> list[tuple[str, bytes]]:
    return sample_members(key, {"video_id": key, "labels": []}, fbank(), [jpeg(), jpeg()], label_indices=[label])


def raw_members(key: str, **override: bytes) -> list[tuple[str, bytes]]:
    """A sample's members written by hand (any key, any member bytes), for what `sample_members` refuses."""
    members = {"json": b'{"video_id": "x"}', "fbank.npy": encode_npy(fbank()), "frame0.jpg": jpeg(),
               "labels.txt": b"1"}
    members.update({k.replace("_", "."): v for k, v in override.items()})
    return [(f"{key}.{suffix}", data) for suffix, data in members.items()]


# key -> (members, reason the skip names)
HOSTILE = {
    "eps_frame": (raw_members("eps_frame", frame0_jpg=EPS), "not a readable JPEG"),
    "bomb_header": (raw_members("bomb_header", frame0_jpg=huge_header_jpeg()), "JPEG"),
    "big_frame": (raw_members("big_frame", frame0_jpg=jpeg(5 * SIZE)), "far larger"),
    "nan_fbank": (raw_members("nan_fbank", fbank_npy=encode_npy(np.full((40, 128), np.nan, np.float16))), "NaN"),
    "inf_fbank": (raw_members("inf_fbank", fbank_npy=encode_npy(np.full((40, 128), np.inf, np.float32))), "NaN"),
    "narrow_fbank": (raw_members("narrow_fbank", fbank_npy=encode_npy(fbank(bins=64))), "mel bins"),
    "empty_fbank": (raw_members("empty_fbank", fbank_npy=encode_npy(np.zeros((0, 0), np.float16))), "with rows"),
    "no_rows": (raw_members("no_rows", fbank_npy=encode_npy(np.zeros((0, 128), np.float16))), "with rows"),
    "huge_npy": (raw_members("huge_npy", fbank_npy=npy_claiming((1 << 20, 1 << 20))), "header claims"),
    "deep_json": (raw_members("deep_json", json=b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    "list_json": (raw_members("list_json", json=b"[1, 2]"), "not an object"),
    "bad_labels_json": (raw_members("bad_labels_json", json=b'{"labels": [{"a": 1}]}'), "list of strings"),
    "label_out_of_range": (raw_members("label_out_of_range", labels_txt=b"7"), "outside 0..3"),
    "label_negative": (raw_members("label_negative", labels_txt=b"-1"), "non-negative"),
    "../climb": (raw_members("../climb"), "key"),
    "/abs/path": (raw_members("/abs/path"), "key"),
    "sub/dir": (raw_members("sub/dir"), "key"),
    "sp ace": (raw_members("sp ace"), "key"),
    "ünï": (raw_members("ünï"), "key"),
}
GOOD = ["good_a", "good_b", "good_c"]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these member names (tarfile writes `../x` and `/x` as given)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture()
def hostile_shard(tmp_path):
    members = good(GOOD[0])
    for key, (bad, _) in HOSTILE.items():
        members += bad
        if key == "big_frame":
            members += good(GOOD[1])
    return write_tar(tmp_path / "hostile.tar", members + good(GOOD[2]))


def test_hostile_samples_are_counted_skips_and_nothing_runs(hostile_shard, fake_gs, caplog, tmp_path):
    tf = Transform(DATA, NO_AUG, frame=0, num_frames=2, num_classes=4, label_map=None, label_file=None, seed=0)
    before = set(tmp_path.rglob("*"))
    with caplog.at_level(logging.WARNING, logger="cavmae.train.failures"):
        batches = list(eval_loader([str(hostile_shard)], tf, batch_size=2, num_workers=0))
    assert [k for b in batches for k in b["key"]] == GOOD
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert sum(b["skipped"] for b in batches) == len(warnings) == len(HOSTILE)
    for key, (_, reason) in HOSTILE.items():
        (line,) = [w for w in warnings if f"sample {key!r} of" in w]
        assert str(hostile_shard) in line and reason in line, line
    assert not fake_gs.exists()
    assert set(tmp_path.rglob("*")) == before  # nothing written (no member name became a path)


def test_control_plain_pil_would_run_gs(fake_gs):
    """The EPS case is real: PIL left to pick the plugin hands these bytes to `gs` (in a fresh process, so PIL's
    cached Ghostscript lookup sees the stand-in)."""
    code = "import io; from PIL import Image\ntry: Image.open(io.BytesIO(%r)).load()\nexcept Exception: pass" % EPS
    subprocess.run([sys.executable, "-c", code], env=os.environ, timeout=60, check=True)
    assert fake_gs.exists()
    with pytest.raises(BadSample, match="not a readable JPEG"):
        open_jpeg(EPS, SIZE)


def test_jpeg_pixel_cap_follows_the_configured_size():
    assert open_jpeg(jpeg(4 * SIZE), SIZE).size == (4 * SIZE, 4 * SIZE)
    for data in (jpeg((4 * SIZE + 1, 8)), huge_header_jpeg(30000, 30000), huge_header_jpeg(9000, 9000)):
        with pytest.raises(BadSample):
            open_jpeg(data, SIZE)


def test_flac_member_is_decoded_as_flac_only(tmp_path, monkeypatch):
    """An ffconcat script in a `.flac` member must not make FFmpeg open the files it names."""
    import av

    monkeypatch.chdir(tmp_path)
    target = tmp_path / "local.flac"
    target.write_bytes(encode_flac(np.zeros(16000, np.float32), 16000))
    script = b"ffconcat version 1.0\nfile local.flac\n"
    with av.open(io.BytesIO(script)) as probing:  # control: a probing open follows the script
        assert sum(f.samples for f in probing.decode(audio=0)) == 16000
    with pytest.raises(BadSample, match="not FLAC"):
        open_flac(script)
    assert decode_flac(target.read_bytes(), 16000, 1.0).shape == (16000,)


def pax_tar(record_length: bytes) -> bytes:
    """A one-member pax tar whose path record says it is `record_length` bytes long."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k." + "x" * 120 + ".json")  # a long name: written as a pax `path` record
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    data = buf.getvalue()
    start = data.index(b" path=") - 3
    return data[:start] + record_length + data[start + 3:]


@pytest.mark.parametrize("length", [b"000", b"999", b"00x", b"010"])
def test_malformed_pax_header_is_a_read_error(length):
    with pytest.raises(tarfile.ReadError):
        list(read_members(io.BytesIO(pax_tar(length)), "pax.tar"))


def test_a_set_where_nothing_decodes_stops_with_one_line(tmp_path, caplog):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    zero_pax = tmp_path / "pax.tar"
    zero_pax.write_bytes(pax_tar(b"000"))
    endless = itertools.cycle([{"url": str(junk)}, {"url": str(zero_pax)}])  # what a resampled stream does
    with caplog.at_level(logging.ERROR), pytest.raises(NoSamples) as err:
        next(decoded_samples(endless))
    message = str(err.value)
    assert "junk.tar" in message and "pax.tar" in message and "\n" not in message
    # every sample outside the config: the transform gives up too
    wrong = write_tar(tmp_path / "wrong.tar", raw_members("w", fbank_npy=encode_npy(fbank(bins=64))))
    tf = Transform(DATA, NO_AUG, frame=0, num_frames=1, num_classes=4, label_map=None, label_file=None, seed=0)
    with caplog.at_level(logging.ERROR), pytest.raises(NoSamples, match="wrong.tar.*mel bins"):
        next(tf(decoded_samples(itertools.repeat({"url": str(wrong)}))))


# ---------------------------------------------------------------------------------------------- names and configs

@pytest.mark.parametrize("pattern", ["shard-%06d.tar", "as2m-v2-%06d.tar", "x%d.tar", "100%%-%03d.tar", "%d1.tar"])
def test_shard_names_round_trip(pattern):
    for index in (0, 3, 17, 123456, 10 ** 7):
        name = shard_name(pattern, index)
        assert "/" not in name and shard_index(pattern, name) == index
    assert shard_index("as2m-v2-%06d.tar", "as2m-v2-000003.tar") == 3  # not 22000003 (digits stripped)
    with pytest.raises(ValueError):
        shard_index(pattern, "other-000001.tar")


@pytest.mark.parametrize("pattern", ["../../x%06d.tar", "x.tar", "a/%d.tar", "%d%d.tar", "%s.tar", ".hidden%d.tar",
                                     "x%d.tgz", "%%d.tar", "x%d%.tar", "..%d.tar", "c:\\%d.tar"])
def test_unsafe_patterns_are_refused(pattern):
    with pytest.raises(PatternError):
        check_pattern(pattern)


def test_next_index_reads_odd_patterns_back():
    rows = [{"shard": "as2m-v2-000003.tar"}, {"shard": None}, {"shard": "old-name-000099.tar"}]
    assert next_index(rows, [], "as2m-v2-%06d.tar") == 4  # a name by another pattern cannot collide


@pytest.mark.parametrize("sets, needle", [
    (["shards.pattern=../../x%06d.tar"], "plain file name"),
    (["shards.pattern=shards.tar"], "one %d-style field"),
    (["video.num_frames=0"], "video.num_frames"),
    (["audio.sample_rate=0"], "audio.sample_rate"),
])
def test_bad_config_is_one_line_before_anything_is_written(tmp_path, capsys, sets, needle):
    out = tmp_path / "out"
    argv = ["ingest", str(tmp_path), "--out", str(out), "--no-progress"] + [x for s in sets for x in ("--set", s)]
    assert prep_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not out.exists() and not (tmp_path.parent / "x000000.tar").exists()


def test_reprocess_refuses_a_source_folder_with_a_climbing_pattern(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "pipeline.yaml").write_text("shards:\n  pattern: ../../evil%06d.tar\n")
    assert prep_cli.main(["reprocess", str(src), "--out", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(src / "pipeline.yaml") in err and "plain file name" in err and "\n" not in err
    assert not dst.exists() and not list(tmp_path.parent.glob("evil*"))
    row = {"status": "ok", "shard": "../../etc/x.tar", "video_id": "v", "source": "v.mp4", "labels": [],
           "window": None, "key": "v"}
    with pytest.raises(ConfigError, match="not a file name inside"):
        _videos_in_source_order([row], "shard-%06d.tar", str(src))


def test_out_naming_a_file_and_negative_workers_are_usage_errors(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("keep me")
    assert prep_cli.main(["ingest", str(tmp_path), "--out", str(regular), "--no-progress"]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        prep_cli.main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "-1"])
    assert exit_.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert regular.read_text() == "keep me"


def test_label_display_name_with_a_comma(tmp_path):
    (tmp_path / "v1.mp4").write_bytes(b"")
    index = tmp_path / "index.csv"
    index.write_text('index,mid,display_name\n0,/m/bee,"Bee, wasp, etc."\n1,/m/dog,Dog\n')
    labels = tmp_path / "labels.csv"
    labels.write_text('video_id,labels\nv1,"Bee, wasp, etc.;/m/dog"\n')
    (item,) = collect_inputs([str(tmp_path / "v1.mp4")], labels_csv=str(labels), label_index=LabelIndex.read(index))
    assert item.error is None and item.labels == ("/m/bee", "/m/dog") and item.label_indices == (0, 1)


# ---------------------------------------------------------------------------------------------- checkpoints, CLI

class _Payload:
    pass


def test_checkpoint_errors_are_one_line(tmp_path):
    good_pt = tmp_path / "ok.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, good_pt)
    truncated = tmp_path / "last.pt"
    truncated.write_bytes(good_pt.read_bytes()[:200])
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload()}, evil)
    for path, needle in ((truncated, "truncated"), (evil, "pickled objects"), (tmp_path / "none.pt", "no such")):
        with pytest.raises(CheckpointError) as err:
            read_checkpoint(path)
        assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="not a training state"):
        read_checkpoint(good_pt, need=("model", "optimizer"))


@pytest.fixture()
def tiny_shard(tmp_path):
    return write_shard(tmp_path / "ok.tar", good("s0", 0) + good("s1", 1)) and tmp_path / "ok.tar"


def run_train(argv, capsys) -> tuple[int, str]:
    code = train_cli.main(argv)
    return code, capsys.readouterr().err.strip()


def test_train_cli_clear_errors(tmp_path, tiny_shard, capsys):
    sets = [x for s in TINY + ["pretrain.epoch_samples=2", "pretrain.batch_size=2", "finetune.epoch_samples=2",
                              "finetune.batch_size=2", "finetune.num_classes=4"] for x in ("--set", s)]
    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)
    code, err = run_train(["finetune", "--shards", str(tiny_shard), "--init", str(evil), "--out",
                           str(tmp_path / "ft")] + sets, capsys)
    assert code == 2 and "evil.pt" in err and "pickled" in err and "\n" not in err

    run = tmp_path / "pt"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 truncated")
    code, err = run_train(["pretrain", "--shards", str(tiny_shard), "--out", str(run), "--resume"] + sets, capsys)
    assert code == 2 and "last.pt" in err and "\n" not in err

    code, err = run_train(["pretrain", "--shards", str(tiny_shard), "--out", str(evil)] + sets, capsys)
    assert code == 2 and "not a folder" in err

    from cavmae.train.model import build_finetune_model
    ft = tmp_path / "ft.pth"
    torch.save(build_finetune_model(model_settings(load_config(None, TINY)), 4).state_dict(), ft)
    junk = write_tar(tmp_path / "junk.tar", raw_members("j", json=b"[]"))
    for command in ("eval", "retrieve"):
        code, err = run_train([command, "--shards", str(junk), "--checkpoint", str(ft)] + sets, capsys)
        assert code == 2 and "no decodable sample" in err and "junk.tar" in err and "\n" not in err, err


def test_reprocess_checks_every_source_sample(tmp_path, fake_gs):
    """A downloaded shard set: each source sample is checked before it is copied (repack), a malformed source shard
    fails the rest of its work unit with the reason, and nothing is written outside the output folder; the same
    when the samples are read at the spans SRC's manifest records."""
    from cavmae.preprocess.reprocess import reprocess_job
    from cavmae.preprocess.units import assemble_shard, work_unit

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    write_tar(src / "shard-000000.tar", good("g0") + HOSTILE["eps_frame"][0] + HOSTILE["../climb"][0])
    (src / "shard-000001.tar").write_bytes(pax_tar(b"000"))
    rows_in = [{"video_id": key, "key": key, "window": None, "source": f"{key}.mp4", "status": "ok", "labels": [],
                "shard": f"shard-00000{n}.tar"} for key, n in (("g0", 0), ("eps_frame", 0), ("../climb", 0), ("g1", 1))]
    items = _videos_in_source_order(rows_in, "shard-%06d.tar", str(src))
    before = set(tmp_path.rglob("*"))
    cfg = load_config().to_dict()
    part, rows = work_unit(reprocess_job(str(src), "repack"), 0, 0, items, str(dst), cfg)
    out = {r["video_id"]: r for r in assemble_shard(0, [part], rows, str(dst), cfg)}
    def checked(out):
        assert out["g0"]["status"] == "ok"
        for key, needle in (("eps_frame", "not a readable JPEG"), ("../climb", "key"), ("g1", "source shard")):
            assert out[key]["status"] == "failed" and needle in out[key]["error"], out[key]

    checked(out)
    assert [s["__key__"] for s in raw_samples([str(dst / "shard-000000.tar")])] == ["g0"]
    assert {p for p in set(tmp_path.rglob("*")) - before if dst not in p.parents} == {dst}
    assert not fake_gs.exists()

    # the same by ranged reads at the spans a manifest records: every sample is still checked
    with open(src / "shard-000000.tar", "rb") as f:  # every sample's span, the refused one's too (not scan_spans)
        spans = [(g.key, g.start, g.end - g.start) for g in read_groups(f, "shard-000000.tar")]
    spans += [("g1", 0, (src / "shard-000001.tar").stat().st_size)]
    with_spans = [dict(r, offset=o, length=n) for r, (_, o, n) in zip(rows_in, spans)]
    items = _videos_in_source_order(with_spans, "shard-%06d.tar", str(src))
    assert all(it["spans"] for it in items)
    part, rows = work_unit(reprocess_job(str(src), "repack"), 1, 0, items, str(dst), cfg)
    ranged = {r["video_id"]: r for r in assemble_shard(1, [part], rows, str(dst), cfg)}
    checked(ranged)
    assert [s["__key__"] for s in raw_samples([str(dst / "shard-000001.tar")])] == ["g0"]
    with pytest.raises(ConfigError, match="lists sample 'g0' more than once"):
        _videos_in_source_order(rows_in + rows_in[:1], "shard-%06d.tar", str(src))


def test_late_audio_start_is_recorded(tmp_path):
    """Audio whose first sample comes 1.5 s into the file: the waveform starts there, and the sample says so."""
    from cavmae.preprocess.decode import decode_clips
    from cavmae.preprocess.sample import clip_meta
    from tests.clips import FFMPEG

    late = tmp_path / "late.mp4"
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=s=64x48:r=25:d=3",
                    "-itsoffset", "1.5", "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=1.5",
                    "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac",
                    str(late)], check=True, timeout=60)
    cfg = load_config(sets=["clip.length_s=1.0", "video.num_frames=2", "video.image_size=32"])
    (clip,) = decode_clips(late, cfg)
    meta = clip_meta(clip, video_id="late", source=str(late), labels=[], audio_frames=1, config_digest="x")
    assert 1.3 < meta["audio_start_s"] <= 1.5  # 1.5 s less the AAC encoder delay


def test_worker_errors_print_their_own_line():
    """A NoSamples raised in a DataLoader worker comes back with the worker's traceback as its text; the CLI
    prints the original one line."""
    from torch._utils import ExceptionWrapper

    try:
        raise NoSamples("no sample decoded in 1000 tries in a row (shards: junk.tar; last: bad)")
    except NoSamples:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(NoSamples) as err:
        wrapped.reraise()
    assert "\n" in str(err.value)
    assert one_line(err.value) == "no sample decoded in 1000 tries in a row (shards: junk.tar; last: bad)"
