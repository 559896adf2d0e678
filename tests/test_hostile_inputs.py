"""Hostile input, round two (issue 17): raw videos, input folders and downloaded shard folders never choose what is
read, run or contacted. Every case is built here at test time and runs under an alarm; a marker file's access time
shows it was not read, a listener on 127.0.0.1 shows nothing was contacted."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from cavmae.predict import video_samples
from cavmae.preprocess import cli as prep_cli
from cavmae.preprocess.decode import NOT_ALLOWED
from cavmae.preprocess.features import encode_flac
from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.inputs import InputError, LabelIndex
from cavmae.preprocess.reprocess import reprocess, reprocess_config, source_allowed
from cavmae.shards.config import load_config
from cavmae.shards.frozen import PREP_SECTIONS
from cavmae.shards.manifest import read_manifest, write_rows
from cavmae.shards.schema import sample_members
from cavmae.shards.store import Store
from cavmae.shards.writer import ShardWriter
from tests.clips import make_clip
from tests.conftest import time_limit

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["clip.length_s=1.0", "video.num_frames=2", "video.image_size=32", "shards.samples_per_shard=4"]


@pytest.fixture(autouse=True)
def no_hang():
    with time_limit(120, "hostile-input case"):
        yield


class Marker:
    """A real video outside every input, with its access time set before its change time: reading it (relatime
    or strictatime) moves the access time."""

    def __init__(self, path: Path):
        self.path = path
        st = path.stat()
        os.utime(path, ns=(st.st_mtime_ns - 10**11, st.st_mtime_ns))
        self.atime = path.stat().st_atime_ns

    def untouched(self) -> bool:
        return self.path.stat().st_atime_ns == self.atime


def atime_works(tmp: Path) -> bool:
    """Whether this filesystem records reads at all (a noatime mount would make the marker check vacuous)."""
    probe = tmp / "atime-probe"
    probe.write_bytes(b"x")
    marker = Marker(probe)
    probe.read_bytes()
    return not marker.untouched()


class Listener:
    """A TCP listener on 127.0.0.1 that records every connection made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory, local_ray):
    """Input folders holding every hostile case, their ingest, and a second ingest to reprocess."""
    root = tmp_path_factory.mktemp("hostile_inputs")
    elsewhere = root / "elsewhere"
    secret = make_clip(elsewhere, "secret", seconds=1.0, size=(64, 48), color="red", container="mkv")
    secret_ts = elsewhere / "secret.ts"  # what an HLS playlist can name
    shutil.copy(make_clip(elsewhere / "src", "ts", seconds=1.0, size=(64, 48), color="red", container="ts"), secret_ts)

    inputs = root / "inputs"
    make_clip(inputs, "good", seconds=1.0, size=(64, 48))
    (inputs / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-VERSION:3\n#EXTINF:1.0,\n"
                                      f"{secret_ts}\n#EXT-X-ENDLIST\n")
    (inputs / "concat.mp4").write_text("ffconcat version 1.0\nfile 'list.m3u8'\n")
    (inputs / "hls.mp4").write_text((inputs / "list.m3u8").read_text())
    with open(os.fsencode(inputs) + b"/caf\xe9.mp4", "wb") as f:  # a name that is not UTF-8
        f.write((inputs / "good.mp4").read_bytes())
    os.mkfifo(inputs / "fifo.mp4")
    (inputs / "dangling.mp4").symlink_to(root / "nowhere.mp4")
    (inputs / "loop.mp4").symlink_to(inputs / "loop.mp4")
    (inputs / "here").symlink_to(".")
    make_clip(root / "outside", "linked_clip", seconds=1.0, size=(64, 48))
    (inputs / "linked").symlink_to(root / "outside")
    markers = [Marker(secret), Marker(secret_ts)]
    summary = ingest([str(inputs)], root / "out", load_config(sets=SMALL))

    videos = root / "videos"
    for name in ("a", "b"):
        make_clip(videos, name, seconds=1.0, size=(64, 48), tone_hz=300 if name == "a" else 500)
    src = root / "src"
    assert ingest([str(videos)], src, load_config(sets=SMALL)).ok == 2
    return {"root": root, "inputs": inputs, "summary": summary, "markers": markers, "secret": secret,
            "videos": videos, "src": src, "atime": atime_works(root)}


def test_ingest_opens_only_allowed_demuxers_and_names_every_entry_it_skips(world):
    rows = {r["video_id"]: r for r in read_manifest(world["root"] / "out")}
    assert rows["good"]["status"] == "ok"
    assert rows["concat"]["status"] == "failed" and rows["concat"]["error"] == NOT_ALLOWED
    assert rows["hls"]["status"] == "failed" and "not a media file" in rows["hls"]["error"]
    # a name that is not UTF-8: ingested, recorded by its bytes' escapes, and a rerun finds it done
    assert rows["caf\\xe9"]["status"] == "ok" and rows["caf\\xe9"]["source"].endswith("caf\\xe9.mp4")
    assert rows["caf\\xe9"]["key"] == "caf_xe9_" + rows["caf\\xe9"]["key"].rsplit("_", 1)[1]
    assert set(rows) == {"good", "concat", "hls", "caf\\xe9"}
    assert not list((world["root"] / "out").glob("_*"))
    again = ingest([str(world["inputs"])], world["root"] / "out", load_config(sets=SMALL))
    assert again.already == 4 and again.videos == 0

    inputs = world["inputs"]
    ignored = dict(world["summary"].ignored)
    assert ignored[str(inputs / "fifo.mp4")] == "not a regular file (a FIFO, device or socket)"
    assert ignored[str(inputs / "dangling.mp4")] == "dangling link"
    assert ignored[str(inputs / "loop.mp4")] == "link loop"
    assert ignored[str(inputs / "here") + "/"] == ignored[str(inputs / "linked") + "/"] == \
        "link to a folder (not followed)"
    if world["atime"]:
        assert all(m.untouched() for m in world["markers"])


def test_predict_refuses_what_ingest_refuses(world):
    paths = [str(world["inputs"] / "concat.mp4"), str(world["inputs"] / "hls.mp4")]
    got = list(video_samples(paths, load_config(sets=SMALL)))
    assert [(p, s) for p, s, _ in got] == [(paths[0], None), (paths[1], None)]
    assert got[0][2] == NOT_ALLOWED and "not a media file" in got[1][2]
    if world["atime"]:
        assert all(m.untouched() for m in world["markers"])


@pytest.mark.parametrize("index", ["-1", str(10**12)])
def test_label_index_out_of_range_is_refused_at_ingest(tmp_path, capsys, index):
    csv = tmp_path / "index.csv"
    csv.write_text(f"index,mid,display_name\n0,/m/a,A\n{index},/m/b,B\n")
    with pytest.raises(InputError, match=f"index {index} of '/m/b' is not in 0..999999999"):
        LabelIndex.read(csv)
    code = prep_cli.main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--label-index", str(csv),
                          "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and f"index {index}" in err
    assert not (tmp_path / "o" / "manifest.parquet").exists()


def test_source_roots():
    roots = ("/data/videos", "s3://bucket/videos?endpoint_override=minio:9000")
    assert source_allowed("/data/videos/a.mp4", roots) and source_allowed("/data/videos/x/a.mp4", roots)
    for source in ("/data/videos2/a.mp4", "/data/videos/../secret.mp4", "relative/a.mp4", "/data/videos", None, 3,
                   "s3://bucket/videos/a.mp4", "s3://bucket/videos/a.mp4?endpoint_override=evil:80",
                   "s3://bucket/videos/../x.mp4?endpoint_override=minio:9000", "file:///data/videos/a.mp4"):
        assert not source_allowed(source, roots), source
    assert source_allowed("s3://bucket/videos/d/a.mp4?endpoint_override=minio:9000", roots)


def test_file_uri_roots_resolve_links_and_dots(tmp_path):
    """A `file://` root is a local folder: a link inside it pointing out, or a `..` spelled `%2E%2E`, is outside."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "elsewhere")
    roots = (f"file://{tmp_path}/root",)
    assert source_allowed(f"file://{tmp_path}/root/a.mp4", roots)
    for source in (f"file://{tmp_path}/root/link/x.mp4", f"file://{tmp_path}/root/%2E%2E/x.mp4",
                   f"file://{tmp_path}/root", "file://host/x.mp4"):
        assert not source_allowed(source, roots), source


def test_reprocess_reads_only_inside_sources_and_never_joins_the_folders_cluster(world, tmp_path):
    """A downloaded SRC whose manifest names a file outside the user's --sources and whose pipeline.yaml names a
    cluster: the outside file becomes a failed row naming it (never read), nothing connects to the cluster."""
    listener = Listener()
    try:
        src = tmp_path / "src"
        shutil.copytree(world["src"], src)
        frozen = yaml.safe_load((src / "pipeline.yaml").read_text())
        frozen["ray"].update(address=f"127.0.0.1:{listener.port}", max_retries=0)
        frozen["shards"]["samples_per_shard"] = 1
        (src / "pipeline.yaml").write_text(yaml.safe_dump(frozen))
        rows = read_manifest(src)
        for r in rows:
            if r["video_id"] == "b":
                r["source"] = str(world["secret"])
        write_rows(src / "manifest.parquet", rows)
        marker = Marker(world["secret"])

        cfg = reprocess_config(src, sets=["video.num_frames=3"])
        assert cfg.ray.address is None and cfg.ray.max_retries != 0 and cfg.shards.samples_per_shard != 1
        with pytest.raises(InputError, match="--sources DIR"):
            reprocess(src, tmp_path / "refused", cfg)
        assert not (tmp_path / "refused").exists()

        summary = reprocess(src, tmp_path / "dst", cfg, sources=[str(world["videos"])])
        got = {r["video_id"]: (r["status"], r["error"]) for r in read_manifest(tmp_path / "dst")}
        assert got == {"a": ("ok", None), "b": ("failed", f"source is outside --sources: {world['secret']}")}
        assert summary.ok == 1 and summary.failed == 1
        assert yaml.safe_load((tmp_path / "dst" / "pipeline.yaml").read_text())["ray"]["address"] is None
        assert listener.connections == 0
        if world["atime"]:
            assert marker.untouched()
    finally:
        listener.close()


def test_reprocess_reads_no_link_out_of_a_file_uri_root(world, tmp_path):
    """--sources file://ROOT where ROOT/link points outside: a source under the link is a failed row naming it,
    never decoded; the one really inside is remade."""
    src = tmp_path / "src"
    shutil.copytree(world["src"], src)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(world["videos"] / "a.mp4", root / "a.mp4")
    (root / "link").symlink_to(world["secret"].parent)
    sources = {"a": f"file://{root}/a.mp4", "b": f"file://{root}/link/{world['secret'].name}"}
    rows = read_manifest(src)
    for r in rows:
        r["source"] = sources[r["video_id"]]
    write_rows(src / "manifest.parquet", rows)
    marker = Marker(world["secret"])

    summary = reprocess(src, tmp_path / "dst", reprocess_config(src, sets=["video.num_frames=3"]),
                        sources=[f"file://{root}"])
    got = {r["video_id"]: (r["status"], r["error"]) for r in read_manifest(tmp_path / "dst")}
    assert got == {"a": ("ok", None), "b": ("failed", f"source is outside --sources: {sources['b']}")}
    assert summary.ok == 1 and summary.failed == 1
    if world["atime"]:
        assert marker.untouched()


def in_child(code: str, memory_gb: int = 2, timeout: int = 60) -> str:
    """Run `code` in a child Python whose address space is capped at `memory_gb`; its stdout (it must exit 0)."""
    cap = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb << 30}, {memory_gb << 30}))\n"
    res = subprocess.run([sys.executable, "-c", cap + code], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def flac_declaring(rate: int | None = None, samples: int | None = None, seconds: float = 1.0) -> bytes:
    """Our own mono 16 kHz FLAC of `seconds`, its STREAMINFO then patched to declare `rate` / `samples`."""
    data = bytearray(encode_flac(np.full(int(16000 * seconds), 0.1, np.float32), 16000))
    packed = int.from_bytes(data[18:26], "big")
    if rate is not None:
        packed = (packed & ((1 << 44) - 1)) | (rate << 44)
    if samples is not None:
        packed = (packed & ~((1 << 36) - 1)) | samples
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


def test_flac_streaminfo_is_checked_before_decoding(tmp_path):
    """A member declaring 1 Hz (resampled to 16000x its length), 2**36-1 samples, or fewer samples than it holds:
    each a BadSample, in a process capped at 2 GB; our own member decodes."""
    cases = {"one_hz": flac_declaring(rate=1), "endless": flac_declaring(samples=(1 << 36) - 1),
             "liar": flac_declaring(samples=1600, seconds=3.0), "ours": flac_declaring()}
    for name, data in cases.items():
        (tmp_path / f"{name}.flac").write_bytes(data)
    out = in_child(f"""
import json, pathlib
from cavmae.shards.media import decode_flac
from cavmae.shards.schema import BadSample
got = {{}}
for p in sorted(pathlib.Path({str(tmp_path)!r}).glob("*.flac")):
    try:
        got[p.stem] = int(decode_flac(p.read_bytes(), 16000, 10.0).size)
    except BadSample as exc:
        got[p.stem] = str(exc)
print(json.dumps(got))
""")
    got = json.loads(out)
    assert got["ours"] == 16000
    assert "declares 16000 samples of 1 channel(s) at 1 Hz" in got["one_hz"]
    assert f"declares {(1 << 36) - 1} samples" in got["endless"] and "at most 160000" in got["endless"]
    assert got["liar"] == ".flac member holds more than the 1600 samples it declares"


def jpeg_claiming(width: int, height: int) -> bytes:
    """A tiny JPEG (a few hundred bytes) whose frame header claims width x height."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_stats_and_inspect_check_each_sample_against_the_shards_settings(tmp_path):
    """A 64-mel sample first in the shard, then a frame whose 633-byte JPEG claims 12000x12000, then good samples:
    stats counts the two as unreadable and its mean/std are the good samples' alone; inspect draws the good ones;
    both in a process capped at 2 GB."""
    from PIL import Image

    folder = tmp_path / "shards"
    folder.mkdir()
    cfg = load_config(sets=["video.image_size=32", "video.num_frames=2"])
    (folder / "pipeline.yaml").write_text(cfg.to_yaml(*PREP_SECTIONS))
    rng = np.random.default_rng(0)
    frame = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(frame, format="JPEG")
    good = [rng.normal(-4, 2, (50, 128)).astype(np.float16) for _ in range(2)]
    bomb = jpeg_claiming(12000, 12000)
    assert len(bomb) < 1000
    with ShardWriter(folder, "shard-000000.tar") as shard:
        shard.add(sample_members("narrow", {"video_id": "narrow"}, np.full((50, 64), 30, np.float16),
                                 [frame.getvalue()]))
        shard.add(sample_members("bomb", {"video_id": "bomb"}, good[0], [bomb]))
        for i, fb in enumerate(good):
            shard.add(sample_members(f"good{i}", {"video_id": f"good{i}"}, fb, [frame.getvalue()] * 2))
    out = in_child(f"""
import json
from cavmae.preprocess.cli import main
from cavmae.preprocess.stats import shard_sums, merge
from cavmae.shards.config import load_config
from cavmae.shards.frozen import adopt_shard_settings
from cavmae.shards.validate import SampleSpec
url = {str(folder / "shard-000000.tar")!r}
cfg = adopt_shard_settings(load_config(), [url])
part = shard_sums(url, 1024, SampleSpec.of(cfg))
stats = merge([part], target_length=1024, batch_size=1000)
code = main(["inspect", {str(folder)!r}, "--random", "4", "--out", {str(tmp_path / "look.png")!r}])
print(json.dumps({{"samples": stats["samples"], "unreadable": stats["unreadable_reasons"],
                   "mean": stats["fbank"]["mean"], "rgb": stats["frames"]["mean_rgb"], "inspect": code}}))
""", timeout=120)
    got = json.loads(out.strip().splitlines()[-1])
    values = np.concatenate([g.astype(np.float64).ravel() for g in good])
    assert got["samples"] == 2 and got["mean"] == pytest.approx(values.mean())
    reasons = " ".join(got["unreadable"])
    assert "fbank has 64 mel bins, the settings say 128" in reasons and "not a readable JPEG" in reasons
    assert got["rgb"][0] > 150 and got["inspect"] == 0 and (tmp_path / "look.png").stat().st_size > 0


@pytest.mark.parametrize("meta, needle", [
    (b'{"video_id": 3}', "'video_id' is a int, not str"),
    (b'{"frame_times_s": {"a": 1}}', "'frame_times_s' is not a list of numbers"),
    (b'{"duration_s": NaN}', "not valid JSON (NaN"),
    (b'{"has_audio": 1}', "'has_audio' is a int, not bool"),
    (b'{"window": true}', "'window' is a bool, not int"),
])
def test_json_fields_of_the_wrong_type_are_bad_samples(meta, needle):
    from cavmae.shards.reader import decode_sample
    from cavmae.shards.schema import BadSample, encode_npy

    raw = {"__key__": "k", "__url__": "x.tar", "json": meta, "fbank.npy": encode_npy(np.zeros((4, 128), np.float16))}
    with pytest.raises(BadSample, match="x.tar: sample 'k': json ") as err:
        decode_sample(raw)
    assert needle in str(err.value)


TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64", "data.num_workers=0",
        "video.num_frames=2", "pretrain.epoch_samples=2", "pretrain.batch_size=2", "finetune.epoch_samples=2",
        "finetune.batch_size=2", "finetune.num_classes=4"]


@pytest.fixture()
def shard_folder(tmp_path):
    """A folder of one good shard and a FIFO named like the next one."""
    from PIL import Image

    from cavmae.shards.writer import write_shard

    frame = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 20, 200)).save(frame, format="JPEG")
    folder = tmp_path / "shards"
    folder.mkdir()
    fb = np.random.default_rng(1).normal(-5, 2, (40, 128)).astype(np.float16)
    write_shard(folder / "shard-000000.tar", [m for i in range(2) for m in sample_members(
        f"s{i}", {"video_id": f"s{i}", "labels": []}, fb, [frame.getvalue()] * 2, label_indices=[i])])
    return folder


def train_main(argv, capsys) -> tuple[int, str]:
    from cavmae.train import cli as train_cli

    sets = [x for s in TINY for x in ("--set", s)]
    code = train_cli.main(argv + sets)
    return code, capsys.readouterr().err.strip()


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(shard_folder, tmp_path, capsys):
    import torch

    from cavmae.train.model import build_finetune_model
    from cavmae.train.stage import model_settings

    ft = tmp_path / "ft.pth"
    torch.save(build_finetune_model(model_settings(load_config(None, TINY)), 4).state_dict(), ft)
    fifo = shard_folder / "shard-000002.tar"
    os.mkfifo(fifo)
    for argv in (["eval", "--shards", str(shard_folder), "--checkpoint", str(ft)],
                 ["order", "--shards", str(shard_folder), "--epoch", "1"]):
        code, err = train_main(argv, capsys)
        assert code == 2 and f"{fifo}: not a regular file" in err and "\n" not in err, err
    for argv in (["inspect", str(shard_folder), "--random", "1", "--out", str(tmp_path / "x.png")],
                 ["verify", "--list", str(shard_folder)]):
        code = prep_cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"{fifo}: not a regular file" in err and "\n" not in err, (argv, err)


def test_out_naming_a_folder_is_refused_before_the_work(shard_folder, tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    missing = str(tmp_path / "missing.pth")  # the work would fail on it: --out must be said first
    for argv in (["eval", "--shards", str(shard_folder), "--checkpoint", missing, "--out", str(folder)],
                 ["embed", "--shards", str(shard_folder), "--checkpoint", missing, "--out", str(folder)]):
        code, err = train_main(argv, capsys)
        assert code == 2 and err == f"cavmae-train: error: --out {folder}: exists and is not a regular file", err
    from cavmae import cli as cavmae_cli

    code = cavmae_cli.main(["predict", str(tmp_path / "v.mp4"), "--checkpoint", missing, "--labels",
                            str(tmp_path / "labels.csv"), "--out", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"cavmae: error: --out {folder}: exists and is not a regular file", err
    code = prep_cli.main(["inspect", str(shard_folder), "--random", "1", "--out", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"cavmae-prep: error: --out {folder}: exists and is not a regular file", err


def test_an_empty_out_is_one_line_on_every_cli(shard_folder, tmp_path, capsys, monkeypatch):
    """`--out ''` names nothing (a run folder '' would be the current folder): refused in one line, exit 2,
    before any work, by every command that takes one; nothing is written where the command runs."""
    from cavmae import cli as cavmae_cli

    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "missing.pth")
    for argv in (["embed", "--shards", str(shard_folder), "--checkpoint", missing],
                 ["eval", "--shards", str(shard_folder), "--checkpoint", missing],
                 ["retrieve", "--shards", str(shard_folder), "--checkpoint", missing],
                 ["pretrain", "--shards", str(shard_folder)], ["finetune", "--shards", str(shard_folder)]):
        code, err = train_main(argv + ["--out", ""], capsys)
        assert code == 2 and err.startswith("cavmae-train: error: --out is empty") and "\n" not in err, (argv, err)
    code = cavmae_cli.main(["predict", str(tmp_path / "v.mp4"), "--checkpoint", missing, "--labels",
                            str(tmp_path / "labels.csv"), "--out", ""])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("cavmae: error: --out is empty") and "\n" not in err, err
    for argv in (["ingest", str(tmp_path / "none")], ["stats", str(shard_folder)],
                 ["inspect", str(shard_folder), "--random", "1"],
                 ["reprocess", str(shard_folder)], ["fetch", str(tmp_path / "list.csv")]):
        code = prep_cli.main(argv + ["--out", ""])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("cavmae-prep: error: --out is empty") and "\n" not in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_a_fifo_given_as_any_file_argument_is_refused_not_waited_on(shard_folder, tmp_path, capsys):
    """Every file a command reads by name (label CSVs, configs, checkpoints, a resumed last.pt) is opened only if it
    is a regular file: a FIFO is one line naming it, exit 2, instead of a read that waits for a writer forever."""
    from cavmae import cli as cavmae_cli

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "last.pt")
    videos = tmp_path / "videos"
    make_clip(videos, "v", seconds=1.0, size=(64, 48))
    prep = [["ingest", str(videos), "--out", str(tmp_path / "o1"), "--label-index", str(fifo)],
            ["ingest", str(videos), "--out", str(tmp_path / "o2"), "--labels", str(fifo)],
            ["ingest", str(videos), "--out", str(tmp_path / "o3"), "--config", str(fifo)],
            ["stats", str(shard_folder), "--label-index", str(fifo)],
            ["inspect", str(shard_folder), "--random", "1", "--out", str(tmp_path / "x.png"), "--label-index",
             str(fifo)]]
    for argv in prep:
        code = prep_cli.main(argv + ["--no-progress"] * (argv[0] != "inspect"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and f"{fifo}: " in err and "not a regular file" in err and "\n" not in err, (argv, err)
    train = [["pretrain", "--shards", str(shard_folder), "--out", str(tmp_path / "r1"), "--init", str(fifo)],
             ["pretrain", "--shards", str(shard_folder), "--out", str(run), "--resume"],
             ["eval", "--shards", str(shard_folder), "--checkpoint", str(fifo)],
             ["order", "--shards", str(shard_folder), "--epoch", "1", "--config", str(fifo)]]
    for argv in train:
        code, err = train_main(argv, capsys)
        assert code == 2 and "fifo: " in err or "last.pt: " in err, (argv, err)
        assert "not a regular file" in err and "\n" not in err, (argv, err)
    code = cavmae_cli.main(["predict", str(videos / "v.mp4"), "--checkpoint", str(tmp_path / "none.pth"),
                            "--labels", str(fifo)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"{fifo}: " in err and "not a regular file" in err and "\n" not in err, err


def test_init_and_resume_of_another_model_shape_are_one_line(shard_folder, tmp_path, capsys):
    import torch

    from cavmae.train.model import build_pretrain_model
    from cavmae.train.stage import model_settings

    # another clip length alone loads (position tables are refitted); a patch embedding of another shape cannot
    other = build_pretrain_model(model_settings(load_config(None, TINY + ["model.target_length=256"]))).state_dict()
    other["patch_embed_a.proj.weight"] = torch.zeros(64, 1, 16, 8)
    init = tmp_path / "other.pth"
    torch.save(other, init)
    for command in ("pretrain", "finetune"):
        code, err = train_main([command, "--shards", str(shard_folder), "--init", str(init), "--out",
                                str(tmp_path / command)], capsys)
        assert code == 2 and f"--init {init}: does not fit" in err and "patch_embed_a" in err and "\n" not in err, err
    run = tmp_path / "resumed"
    run.mkdir()
    torch.save({"model": other, "optimizer": {}, "scheduler": {}, "scaler": {}, "step": 1, "epoch": 0,
                "batches_done": 1}, run / "last.pt")
    code, err = train_main(["pretrain", "--shards", str(shard_folder), "--out", str(run), "--resume"], capsys)
    assert code == 2 and f"{run / 'last.pt'}: does not fit" in err and "\n" not in err, err


def test_a_runs_files_are_new_files_never_written_through_links_left_there(shard_folder, tmp_path, capsys):
    """A run folder (and --out files) holding links to files elsewhere under the names a run writes: each output is
    created anew beside them and renamed into place; the files linked to keep their bytes."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    names = ["config.yaml", "metrics.jsonl", "last.pt", "model.pth", "model.1.pth", ".last.pt.tmp",
             f".model.pth.tmp-{os.getpid()}"]
    for name in names:
        (elsewhere / name).write_text("theirs\n")
        (run / name).symlink_to(elsewhere / name)
    code, err = train_main(["pretrain", "--shards", str(shard_folder), "--out", str(run), "--set", "pretrain.epochs=1"],
                           capsys)
    assert code == 0, err
    for name in names[:5]:
        assert (run / name).is_file() and not (run / name).is_symlink(), name
    assert '"kind": "epoch"' in (run / "metrics.jsonl").read_text() and (run / "model.pth").stat().st_size > 1000
    ckpt = run / "model.pth"
    for command, out in (("embed", "e.parquet"), ("retrieve", "r.json")):  # (eval and predict: the same writer)
        (elsewhere / out).write_text("theirs\n")
        (tmp_path / out).symlink_to(elsewhere / out)
        code, err = train_main([command, "--shards", str(shard_folder), "--checkpoint", str(ckpt), "--out",
                                str(tmp_path / out)], capsys)
        assert code == 0 and (tmp_path / out).is_file() and not (tmp_path / out).is_symlink(), (command, err)
    assert all(p.read_text() == "theirs\n" for p in elsewhere.iterdir())

    store = Store.of(tmp_path / "store")  # every publication of a shard folder (manifest, pipeline.yaml, stats)
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / f".x.tmp-{os.getpid()}").symlink_to(elsewhere / "config.yaml")
    (tmp_path / "store" / "x").symlink_to(elsewhere / "last.pt")
    store.write_text("x", "ours")
    assert (tmp_path / "store" / "x").read_text() == "ours" and not (tmp_path / "store" / "x").is_symlink()
    assert all(p.read_text() == "theirs\n" for p in elsewhere.iterdir())
