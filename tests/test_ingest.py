"""The ingest job end to end: real clips, real PyAV decoding, a real local Ray, real shards read back."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from cavmae.preprocess.ingest import ingest
from cavmae.shards.config import ConfigError, load_config
from cavmae.shards.frozen import PREP_SECTIONS
from tests.clips import corrupt_corpus, endless_stream, make_clip

SMALL = ["clip.length_s=3.0", "video.num_frames=4", "video.image_size=64", "shards.samples_per_shard=2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    good = [make_clip(d / "good", "clip_a", seconds=2.0, size=(160, 120)),
            make_clip(d / "good", "clip.b", seconds=2.5, size=(176, 144), container="mkv", vcodec="libvpx-vp9",
                      acodec="libopus"),
            make_clip(d / "good", "clip_c", seconds=4.0, size=(200, 112), container="webm", vcodec="libvpx",
                      acodec="libvorbis", channels=6, sample_rate=48000),
            make_clip(d / "good", "clip_d", seconds=1.5, size=(96, 160), container="mov")]
    bad = corrupt_corpus(d)
    return {"dir": d, "good": good, "bad": bad}


def _inputs(videos):
    bad = [p for name, p in videos["bad"].items() if name != "missing"]
    return [str(videos["dir"] / "good")] + [str(p) for p in bad]


def _manifest(out):
    return {r["video_id"]: r for r in pq.read_table(Path(out) / "manifest.parquet").to_pylist()}


def test_mixed_folder_gives_samples_and_a_truthful_manifest(local_ray, videos, tmp_path, capsys):
    cfg = load_config(sets=SMALL)
    summary = ingest(_inputs(videos), tmp_path / "out", cfg, progress=True)
    rows = _manifest(tmp_path / "out")
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "11/11" in bar and "failed=7" in bar, bar

    ok = {vid for vid, r in rows.items() if r["status"] == "ok"}
    assert ok == {"clip_a", "clip.b", "clip_c", "clip_d"}
    failed = {vid: r["error"] for vid, r in rows.items() if r["status"] == "failed"}
    assert set(failed) == {"zero", "truncated", "random", "text", "no_audio", "no_video", "too_short"}
    assert all(err and "\n" not in err for err in failed.values())
    assert "audio" in failed["no_audio"] and "video" in failed["no_video"]
    assert summary.ok == 4 and summary.failed == 7 and len(summary.problems) == 7
    assert all(r["shard"] is None for r in rows.values() if r["status"] == "failed")

    # stock webdataset reads every shard, and the samples match the manifest and the config
    shards = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert sorted(s["json"]["video_id"] for s in samples) == sorted(ok)
    for s in samples:
        meta, fbank = s["json"], s["fbank.npy"]
        assert rows[meta["video_id"]]["key"] == s["__key__"] and "." not in s["__key__"]
        assert fbank.dtype == np.float16 and fbank.shape == (meta["audio_frames"], 128)
        expected = 1 + (int(min(meta["duration_s"], 3.0) * 16000) - 400) // 160
        assert abs(meta["audio_frames"] - expected) <= 5  # container duration vs audio stream length
        if meta["video_id"] == "clip_c":  # longer than the 3 s clip: exactly 3 s of audio
            assert meta["audio_frames"] == 1 + (3 * 16000 - 400) // 160
        assert [s[f"frame{i}.jpg"].size for i in range(4)] == [(64, 64)] * 4
        assert meta["config_digest"] == cfg.digest("audio", "video", "clip")
    assert (tmp_path / "out" / "pipeline.yaml").read_text() == cfg.to_yaml(*PREP_SECTIONS)
    assert not list((tmp_path / "out").glob("_*")) and not list((tmp_path / "out").glob(".*"))


def test_same_inputs_same_bytes(local_ray, videos, tmp_path):
    cfg = load_config(sets=SMALL)
    for name in ("one", "two"):
        ingest([str(videos["dir"] / "good")], tmp_path / name, cfg)
    one = sorted((tmp_path / "one").glob("shard-*.tar"))
    assert len(one) == 2  # 4 videos, 2 per shard
    for a in one:
        assert a.read_bytes() == (tmp_path / "two" / a.name).read_bytes()


def test_rerun_skips_known_inputs_and_appends_new_ones(local_ray, videos, tmp_path):
    cfg = load_config(sets=SMALL)
    out = tmp_path / "out"
    first = ingest([str(p) for p in videos["good"][:2]] + [str(videos["bad"]["zero_bytes"])], out, cfg)
    assert (first.ok, first.failed) == (2, 1)
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}

    again = ingest([str(p) for p in videos["good"][:2]], out, cfg)
    assert (again.videos, again.already) == (0, 2)

    more = ingest([str(p) for p in videos["good"]] + [str(videos["bad"]["zero_bytes"])], out, cfg)
    assert (more.videos, more.ok, more.already, more.already_failed) == (2, 2, 3, 1)  # zero: held as failed
    after = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    assert {k: after[k] for k in before} == before  # nothing already written is touched
    assert sorted(after) == ["shard-000000.tar", "shard-000001.tar"]  # a failures-only group writes no shard
    rows = _manifest(out)
    assert len(rows) == 5 and rows["zero"]["status"] == "failed"

    # the failure is retried only on request (and still fails, with its reason)
    retry = ingest([str(videos["bad"]["zero_bytes"])], out, cfg, retry_failed=True)
    assert (retry.videos, retry.failed) == (1, 1)
    assert len(_manifest(out)) == 5


def test_other_settings_need_another_folder(local_ray, videos, tmp_path):
    ingest([str(videos["good"][0])], tmp_path / "out", load_config(sets=SMALL))
    with pytest.raises(ConfigError, match="other audio/video/clip settings"):
        ingest([str(videos["good"][0])], tmp_path / "out", load_config(sets=SMALL + ["audio.num_mel_bins=64"]))
    # settings outside audio/video/clip do not matter to the samples
    ingest([str(videos["good"][1])], tmp_path / "out", load_config(sets=SMALL + ["ray.max_retries=1"]))


def test_labels_become_json_and_label_members(local_ray, videos, tmp_path):
    index = tmp_path / "index.csv"
    index.write_text("index,mid,display_name\n0,/m/a,A\n1,/m/b,B\n")
    labels = tmp_path / "labels.csv"
    labels.write_text('video_id,labels\nclip_a,"/m/a,/m/b"\nclip_c,B\nclip_d,/m/zzz\n')
    cfg = load_config(sets=SMALL)
    good = [str(p) for p in videos["good"]]
    summary = ingest(good, tmp_path / "out", cfg, labels_csv=str(labels), label_index_csv=str(index))
    rows = _manifest(tmp_path / "out")
    assert rows["clip_a"]["labels"] == ["/m/a", "/m/b"] and rows["clip_c"]["labels"] == ["/m/b"]
    assert rows["clip_d"]["status"] == "skipped" and "/m/zzz" in rows["clip_d"]["error"]
    assert summary.skipped == 1
    shards = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    samples = {s["json"]["video_id"]: s for s in wds.WebDataset(shards, shardshuffle=False).decode()}
    assert samples["clip_a"]["labels.txt"] == "0,1"
    assert "labels.txt" not in samples["clip.b"]

    # once the label is fixed, --retry-failed takes the skipped input again (and only it)
    labels.write_text('video_id,labels\nclip_a,"/m/a,/m/b"\nclip_c,B\nclip_d,/m/a\n')
    again = ingest(good, tmp_path / "out", cfg, labels_csv=str(labels), label_index_csv=str(index), retry_failed=True)
    assert (again.videos, again.ok) == (1, 1)
    assert _manifest(tmp_path / "out")["clip_d"]["status"] == "ok"


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "cavmae.preprocess.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_cli_errors_are_one_line(tmp_path, videos):
    res = _cli(["ingest", str(videos["good"][0]), "--out", str(tmp_path / "o"), "--set", "audio.nope=1"])
    assert res.returncode == 2
    assert res.stderr.strip() == "cavmae-prep: error: --set: unknown config key 'audio.nope'"
    res = _cli(["ingest", str(tmp_path / "missing_folder"), "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "missing_folder: no such file or folder" in res.stderr
    help_text = _cli(["ingest", "--help"]).stdout
    assert "--retry-failed" in help_text and "--labels-from-folders" in help_text


def test_cli_nothing_processable_exits_1(tmp_path, videos):
    res = _cli(["ingest", str(videos["bad"]["zero_bytes"]), str(videos["bad"]["text_file"]), "--out",
                str(tmp_path / "o"), "--workers", "1", "--no-progress"])
    assert res.returncode == 1, res.stderr
    assert f"failed: {videos['bad']['zero_bytes']}:" in res.stderr
    assert "ok 0 samples, failed 2" in res.stdout
    assert not [line for line in res.stderr.splitlines() if "INFO" in line.split()]  # Ray's start-up lines stay quiet


def test_cli_inputs_with_nothing_to_ingest_exit_1(tmp_path):
    """An empty folder (or one of only non-video files) is no success: exit 1 with a line that says so."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a video\n")
    res = _cli(["ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"])
    assert res.returncode == 1, res.stderr
    assert "the inputs hold nothing to ingest" in res.stderr


def test_kill_minus_9_then_rerun_equals_a_clean_run(tmp_path, videos):
    """The driver dies mid-run; the re-run completes the same plan: same shards, same bytes, same manifest."""
    clips = [make_clip(videos["dir"] / "many", f"m{i:02d}", seconds=1.0, size=(96, 64), tone_hz=300 + 40 * i)
             for i in range(12)]
    args = ["ingest", str(videos["dir"] / "many"), "--workers", "1", "--no-progress",
            "--set", "shards.samples_per_shard=1", "--set", "video.image_size=32", "--set", "video.num_frames=2"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cavmae.preprocess.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("shard-*.tar"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("shard-*.tar")))
    assert 3 <= done_before < len(clips), "the run must be interrupted midway"
    assert not (killed / "manifest.parquet").exists() or len(_manifest(killed)) < len(clips)

    assert _cli([*args, "--out", str(killed)]).returncode == 0
    clean = tmp_path / "clean"
    assert _cli([*args, "--out", str(clean)]).returncode == 0
    names = sorted(p.name for p in clean.glob("shard-*.tar"))
    assert names == sorted(p.name for p in killed.glob("shard-*.tar")) and len(names) == len(clips)
    for name in names:
        assert (clean / name).read_bytes() == (killed / name).read_bytes()
    assert _manifest(clean) == _manifest(killed)
    assert not list(killed.glob(".*")) and not (killed / "_plan.json").exists()


def test_ray_data_reads_the_shards(local_ray, videos, tmp_path):
    """DESIGN.md promises Ray Data's read_webdataset reads our shards as they are."""
    import ray.data

    ingest([str(p) for p in videos["good"][:2]], tmp_path / "out", load_config(sets=SMALL))
    rows = ray.data.read_webdataset(sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))).take_all()
    assert sorted(r["json"]["video_id"] for r in rows) == ["clip.b", "clip_a"]
    for r in rows:
        assert r["fbank.npy"].dtype == np.float16 and r["fbank.npy"].shape[1] == 128
        assert r["frame3.jpg"].shape == (64, 64, 3)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_bytes_whatever_the_task_size_and_worker_count(local_ray, videos, tmp_path):
    """Shards are assembled from work units in plan order: units of 1, 4 or a whole shard (9) of inputs, on 2
    or on 1 worker, give the very same folder (shards, manifest, pipeline.yaml differ only in ray.*)."""
    base = ["clip.length_s=3.0", "video.num_frames=4", "video.image_size=64", "shards.samples_per_shard=9"]
    inputs = _inputs(videos) + [str(make_clip(videos["dir"] / "late", "zz_late", seconds=1.0, size=(96, 64)))]
    runs = {}
    for size in (1, 9):
        out = tmp_path / f"size{size}"
        summary = ingest(inputs, out, load_config(sets=base + [f"ray.videos_per_task={size}"]))
        assert (summary.ok, summary.failed) == (5, 7)
        runs[size] = out
    one_worker = tmp_path / "size4_1worker"
    res = _cli(["ingest", *inputs, "--out", str(one_worker), "--workers", "1", "--no-progress",
                *sum((["--set", s] for s in base + ["ray.videos_per_task=4"]), [])])
    assert res.returncode == 0, res.stderr[-2000:]
    runs[4] = one_worker
    ref = _files(runs[1])
    assert len([n for n in ref if n.startswith("shard-")]) == 2  # 12 inputs, 9 per shard, ok samples in both
    for size, out in runs.items():
        got = _files(out)
        assert sorted(got) == sorted(ref), size
        for name in ref:
            if name != "pipeline.yaml":
                assert got[name] == ref[name], (size, name)


def test_a_stalled_video_times_out_and_the_job_goes_on(local_ray, videos, tmp_path):
    """A stream that never ends (an endless lavfi source written to a growing file, read in windows mode),
    twice (the same file under a second name) among good clips, in one work unit: each ends its worker after
    the time limit; the first time-out is retried by Ray, the second exhausts Ray's retries and is resubmitted
    by the driver; both become failed rows and the good clips' samples are written."""
    d = tmp_path / "in"
    d.mkdir()
    writer = endless_stream(d / "b_endless.mkv")
    try:
        (d / "d_endless.mkv").symlink_to(d / "b_endless.mkv")
        inputs = [str(videos["good"][0]), str(d / "b_endless.mkv"), str(videos["good"][3]), str(d / "d_endless.mkv")]
        cfg = load_config(sets=SMALL + ["clip.mode=windows", "clip.length_s=1.0", "clip.hop_s=1.0",
                                        "shards.samples_per_shard=4", "ray.videos_per_task=4",
                                        "ray.video_timeout_s=2", "ray.max_retries=1"])
        summary = ingest(inputs, tmp_path / "out", cfg)
    finally:
        writer.kill()
        writer.wait()
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    status = {(r["video_id"], r["status"], r["error"]) for r in rows}
    assert status == {("clip_a", "ok", None), ("clip_d", "ok", None), ("b_endless", "failed", "timed out after 2 s"),
                      ("d_endless", "failed", "timed out after 2 s")}
    assert summary.failed == 2 and summary.ok == sum(r["status"] == "ok" for r in rows) >= 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.parquet", "pipeline.yaml",
                                                                    "shard-000000.tar"]


def test_two_runs_into_one_folder(tmp_path, videos):
    """While a run holds --out, a second one says so in one line and exits 2 (touching nothing)."""
    from cavmae.preprocess.outlock import output_lock
    from cavmae.shards.store import Store

    out = tmp_path / "out"
    out.mkdir()
    (out / ".shard-000000.tar.tmp-1").write_bytes(b"the first run's temporary shard")
    with output_lock(Store.of(out)):
        res = _cli(["ingest", str(videos["good"][0]), "--out", str(out), "--no-progress"])
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "another cavmae-prep run is writing into this folder" in res.stderr
    assert (out / ".shard-000000.tar.tmp-1").exists()


def test_an_address_with_nothing_behind_it(tmp_path, videos):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    res = _cli(["ingest", str(videos["good"][0]), "--out", str(tmp_path / "o"), "--no-progress",
                "--address", f"127.0.0.1:{port}"])
    assert res.returncode == 2 and time.time() - t0 < 30
    assert res.stderr.count("\n") == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in res.stderr
    assert not (tmp_path / "o").exists()  # refused before anything is written
