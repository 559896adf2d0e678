"""`cavmae-prep reprocess`: from the stored waveform (sources hidden), from the source videos, repack only,
sources gone; each compared byte for byte with a fresh ingest of the new settings; the same bytes whatever the
work unit size; a unit reads only its samples of SRC; the per-video time limit in source mode."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.reprocess import SourcesGone, choose_mode, reprocess, reprocess_config
from cavmae.shards.config import load_config
from cavmae.shards.manifest import read_manifest, write_rows
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from tests.clips import endless_stream, make_clip

SHARDS = ["shards.samples_per_shard=2"]  # a run's own (never taken from SRC's pipeline.yaml)
BASE = ["clip.length_s=2.0", "video.num_frames=2", "video.image_size=32", "audio.keep_waveform=true", *SHARDS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, local_ray):
    """Four labelled clips and SRC, their shards made with BASE (waveforms kept)."""
    root = tmp_path_factory.mktemp("reprocess")
    videos = root / "videos"
    for i in range(4):
        make_clip(videos, f"v{i}", seconds=1.0 + 0.5 * i, size=(64, 48), tone_hz=300 + 70 * i)
    (root / "index.csv").write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    (root / "labels.csv").write_text('video_id,labels\nv0,"/m/a,/m/b"\nv1,/m/b\nv2,/m/a\nv3,/m/a\n')
    kw = dict(labels_csv=str(root / "labels.csv"), label_index_csv=str(root / "index.csv"))
    src = root / "src"
    assert ingest([str(videos)], src, load_config(sets=BASE), **kw).ok == 4
    return {"root": root, "videos": videos, "src": src, "kw": kw}


def _fresh(corpus, sets, name, samples=4):
    out = corpus["root"] / name
    if not out.exists():
        assert ingest([str(corpus["videos"])], out, load_config(sets=BASE + sets), **corpus["kw"]).ok == samples
    return out


def _same_folder(a: Path, b: Path):
    names = sorted(p.name for p in a.glob("shard-*.tar"))
    assert names == sorted(p.name for p in b.glob("shard-*.tar")) and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert read_manifest(a) == read_manifest(b)
    assert (a / "pipeline.yaml").read_text() == (b / "pipeline.yaml").read_text()
    assert not list(a.glob("_*")) and not list(a.glob(".*"))


class hidden:
    """Move the source videos away for the duration (proves they are not opened)."""

    def __init__(self, path: Path):
        self.path, self.away = path, path.with_name(path.name + "_away")

    def __enter__(self):
        os.replace(self.path, self.away)

    def __exit__(self, *exc):
        os.replace(self.away, self.path)


def test_mode_choice(corpus):
    old = load_config(sets=BASE)
    for sets, mode in [(["audio.num_mel_bins=64"], "waveform"), (["audio.frame_shift_ms=20"], "waveform"),
                       (["audio.keep_waveform=false", "audio.num_mel_bins=64"], "waveform"),
                       (["audio.sample_rate=8000"], "source"), (["audio.channel_policy=mix"], "source"),
                       (["video.num_frames=3"], "source"), (["clip.mode=windows"], "source"),
                       (["shards.samples_per_shard=1"], "repack"), (["ray.max_retries=0"], "repack")]:
        assert choose_mode(old, old.with_overrides(sets))[0] == mode, sets
    no_wave = load_config(sets=BASE + ["audio.keep_waveform=false"])
    assert choose_mode(no_wave, no_wave.with_overrides(["audio.num_mel_bins=64"]))[0] == "source"


def test_from_waveform_without_the_sources(corpus):
    expected = _fresh(corpus, ["audio.num_mel_bins=64"], "fresh_mel64")
    cfg = reprocess_config(corpus["src"], sets=SHARDS + ["audio.num_mel_bins=64"])
    out = corpus["root"] / "re_mel64"
    with hidden(corpus["videos"]):
        summary = reprocess(corpus["src"], out, cfg)
    assert summary.mode == "waveform" and summary.ok == 4 and summary.changed == ("audio.num_mel_bins",)
    _same_folder(out, expected)
    fb = [decode_sample(r)["fbank"] for r in raw_samples(list_shards(str(out)))]
    assert all(f.shape[1] == 64 for f in fb)
    # re-running finds everything done
    again = reprocess(corpus["src"], out, cfg)
    assert (again.videos, again.already) == (0, 4)


def test_from_sources_equals_fresh_ingest(corpus):
    sets = ["video.num_frames=3", "clip.mode=windows", "clip.length_s=1.0", "clip.hop_s=1.0"]
    expected = _fresh(corpus, sets, "fresh_frames3", samples=6)
    cfg = reprocess_config(corpus["src"], sets=SHARDS + sets)
    out = corpus["root"] / "re_frames3"
    summary = reprocess(corpus["src"], out, cfg, sources=[str(corpus["videos"])])
    assert summary.mode == "source" and summary.videos == 4
    _same_folder(out, expected)
    rows = [r for r in read_manifest(out) if r["video_id"] == "v3"]
    assert [r["window"] for r in rows] == [0, 1]   # 2.5 s in 1 s windows (the last 0.5 s < min_window_s)
    samples = {s["key"]: s for s in map(decode_sample, raw_samples(list_shards(str(out))))}
    assert samples["v0_w0000"]["labels"] == [0, 1] and len(samples["v0_w0000"]["frames"]) == 3


def test_repack_copies_members_unchanged(corpus):
    cfg = reprocess_config(corpus["src"], sets=SHARDS + ["shards.samples_per_shard=1"])
    out = corpus["root"] / "re_repack"
    with hidden(corpus["videos"]):
        summary = reprocess(corpus["src"], out, cfg)
    assert summary.mode == "repack" and summary.ok == 4
    assert len(list(out.glob("shard-*.tar"))) == 4
    a = {s["__key__"]: s for s in raw_samples(list_shards(str(corpus["src"])))}
    b = {s["__key__"]: s for s in raw_samples(list_shards(str(out)))}
    strip = lambda s: {k: v for k, v in s.items() if k != "__url__"}  # noqa: E731
    assert {k: strip(v) for k, v in a.items()} == {k: strip(v) for k, v in b.items()}


def _cli(args):
    return subprocess.run([sys.executable, "-m", "cavmae.preprocess.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_sources_gone(corpus, tmp_path):
    with hidden(corpus["videos"]):
        with pytest.raises(SourcesGone, match="all 4 inside --sources are gone"):
            reprocess(corpus["src"], tmp_path / "x", reprocess_config(corpus["src"], sets=["video.num_frames=3"]),
                      sources=[str(corpus["videos"])])
        res = _cli(["reprocess", str(corpus["src"]), "--out", str(tmp_path / "y"), "--set", "video.num_frames=3",
                    "--sources", str(corpus["videos"]), "--workers", "1", "--no-progress"])
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert "\n" not in err and "video.num_frames changed" in err and str(corpus["videos"] / "v0.mp4") in err
    assert not (tmp_path / "y").exists()

    # one source gone: a failed row naming it, the others done
    partial = corpus["root"] / "partial_videos"
    shutil.copytree(corpus["videos"], partial)
    src = tmp_path / "src"
    assert ingest([str(partial)], src, load_config(sets=BASE)).ok == 4
    (partial / "v2.mp4").unlink()
    summary = reprocess(src, tmp_path / "z", reprocess_config(src, sets=["video.num_frames=3"]), sources=[str(partial)])
    rows = {r["video_id"]: r for r in read_manifest(tmp_path / "z")}
    assert summary.ok == 3 and rows["v2"]["status"] == "failed"
    assert rows["v2"]["error"] == f"source video is gone: {partial / 'v2.mp4'}"


def test_cli_says_which_way(corpus, tmp_path):
    res = _cli(["reprocess", str(corpus["src"]), "--out", str(tmp_path / "o"), "--set", "audio.num_mel_bins=32",
                "--workers", "1", "--no-progress"])
    assert res.returncode == 0, res.stderr
    assert "reprocess from the stored waveforms" in res.stdout and "audio.num_mel_bins" in res.stdout
    assert "ok 4 samples" in res.stdout
    assert "cavmae-prep reprocess" in _cli(["--help"]).stdout


def _folder_files(out: Path) -> dict[str, bytes]:
    assert not list(out.glob("_*")) and not list(out.glob(".*"))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "pipeline.yaml"}


def _without_ray(out: Path) -> dict:
    data = yaml.safe_load((out / "pipeline.yaml").read_text())
    data.pop("ray")
    return data


@pytest.mark.parametrize("sets", [["audio.num_mel_bins=64"], ["shards.samples_per_shard=3"], ["video.num_frames=3"]],
                         ids=["waveform", "repack", "source"])
def test_same_bytes_whatever_the_task_size(corpus, sets):
    """Work units of 1 video, of 2 (a whole shard of 2, part of one of 3) and the default 4 (a whole shard) give
    the same shards, manifest and pipeline.yaml (but for ray.*)."""
    runs = {}
    for size in (None, 1, 2):
        out = corpus["root"] / f"units_{sets[0]}_{size}"
        units = [] if size is None else [f"ray.videos_per_task={size}"]
        cfg = reprocess_config(corpus["src"], sets=SHARDS + sets + units)
        assert reprocess(corpus["src"], out, cfg, sources=[str(corpus["videos"])]).ok == 4, size
        runs[size] = out
    ref = _folder_files(runs[None])
    assert [n for n in ref if n.startswith("shard-")]
    for size, out in runs.items():
        assert _folder_files(out) == ref, size
        assert _without_ray(out) == _without_ray(runs[None])


def test_a_unit_reads_only_its_samples(corpus, tmp_path):
    """SRC's samples are read at the spans its manifest records: a broken tar header in front of v0 fails v0 only
    (not v1 of the same shard), a span outside its shard fails that video with one line naming the shard. Without
    spans (an older set) SRC's shards are streamed: the broken header fails every unit of that shard."""
    src = tmp_path / "src"
    shutil.copytree(corpus["src"], src)
    shard = src / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1  # the first member's name: its header checksum no longer matches
    shard.write_bytes(bytes(data))
    rows = read_manifest(src)
    assert {r["video_id"] for r in rows if r["shard"] == shard.name} == {"v0", "v1"}
    for r in rows:
        if r["video_id"] == "v2":
            r["offset"] = 1 << 40
    write_rows(src / "manifest.parquet", rows)

    def run(source, out):
        cfg = reprocess_config(source, sets=SHARDS + ["audio.num_mel_bins=64", "ray.videos_per_task=1"])
        reprocess(source, out, cfg)
        return {r["video_id"]: (r["status"], r["error"]) for r in read_manifest(out)}

    got = run(src, tmp_path / "ranged")
    assert got["v0"] == ("failed", f"source shard: {shard}: sample 'v0': bad tar header checksum at byte 0")
    assert got["v1"] == got["v3"] == ("ok", None)
    assert got["v2"][0] == "failed" and f"{src / 'shard-000001.tar'}: manifest.parquet puts" in got["v2"][1]
    assert "\n" not in got["v2"][1] and "outside the shard" in got["v2"][1]

    for r in rows:
        r["offset"] = r["length"] = None
    write_rows(src / "manifest.parquet", rows)
    got = run(src, tmp_path / "streamed")
    assert got["v0"] == got["v1"] == ("failed", f"source shard: {shard}: bad tar header checksum at byte 0")
    assert got["v2"] == got["v3"] == ("ok", None)

    for r in rows:  # a manifest naming a sample its shard does not hold: that video fails, one line
        if r["video_id"] == "v3":
            r["key"] = "v3_gone"
    write_rows(src / "manifest.parquet", rows)
    got = run(src, tmp_path / "missing")
    assert got["v2"] == ("ok", None) and got["v3"][0] == "failed"
    assert got["v3"][1].endswith("sample(s) v3_gone of 'v3' are not in the shard(s) the manifest names")


def test_a_stalled_source_times_out(corpus, tmp_path):
    """Source mode has ingest's per-video time limit: a source that never ends (an endless stream written to a
    growing file as fast as ffmpeg writes, read in windows mode) becomes a failed row "timed out after N s", the
    rest of its unit is made (by a fresh worker, whose imports count against the limit too: 5 s leaves room on a
    busy machine)."""
    endless = tmp_path / "endless.mkv"
    writer = endless_stream(endless)
    try:
        src = tmp_path / "src"
        shutil.copytree(corpus["src"], src)
        rows = read_manifest(src)
        for r in rows:
            if r["video_id"] == "v1":
                r["source"] = str(endless)
        write_rows(src / "manifest.parquet", rows)
        cfg = reprocess_config(src, sets=SHARDS + ["clip.mode=windows", "clip.length_s=1.0", "clip.hop_s=1.0",
                                                   "ray.videos_per_task=2", "ray.video_timeout_s=5",
                                                   "ray.max_retries=1"])
        summary = reprocess(src, tmp_path / "out", cfg, sources=[str(tmp_path), str(corpus["videos"])])
    finally:
        writer.kill()
        writer.wait()
    got = {r["video_id"]: (r["status"], r["error"]) for r in read_manifest(tmp_path / "out")}
    assert got["v1"] == ("failed", "timed out after 5 s") and summary.mode == "source"
    assert got["v0"] == got["v2"] == got["v3"] == ("ok", None)


def test_resumes_an_interrupted_run(corpus, tmp_path):
    """A run killed after its first shard, whose plan was saved before work units (items without spans), is
    finished by running again: the same folder as an uninterrupted run."""
    from cavmae.preprocess.jobs import cut, save_plan
    from cavmae.preprocess.reprocess import _videos_in_source_order, reprocess_job
    from cavmae.preprocess.units import assemble_shard, work_unit
    from cavmae.shards.frozen import FROZEN_CONFIG, PREP_SECTIONS
    from cavmae.shards.store import Store

    cfg = reprocess_config(corpus["src"], sets=SHARDS + ["audio.num_mel_bins=64", "ray.videos_per_task=1"])
    reprocess(corpus["src"], tmp_path / "whole", cfg)
    out = tmp_path / "resumed"
    store = Store.of(out)
    store.makedirs()
    items = _videos_in_source_order(read_manifest(corpus["src"]), "shard-%06d.tar", str(corpus["src"]))
    groups = cut([{k: v for k, v in it.items() if k != "spans"} for it in items], 2, first_index=0)
    store.write_text(FROZEN_CONFIG, cfg.to_yaml(*PREP_SECTIONS))
    save_plan(store, reprocess_job(str(corpus["src"]), "waveform"), groups, cfg)
    part, rows = work_unit(reprocess_job(str(corpus["src"]), "waveform"), 0, 0, groups[0][1], str(out), cfg.to_dict())
    assemble_shard(0, [part], rows, str(out), cfg.to_dict())

    summary = reprocess(corpus["src"], out, cfg)
    assert (summary.videos, summary.already, summary.ok) == (2, 2, 2)
    assert _folder_files(out) == _folder_files(tmp_path / "whole")
