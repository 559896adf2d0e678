"""Looking at the data: `cavmae-prep ingest` names what it did not take, `stats` agrees with a direct numpy pass over
the shards, and `stats` / `inspect` draw the pictures they promise. One real ingest (CLI, local Ray) for the module."""

import contextlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cavmae.preprocess.cli import main
from cavmae.preprocess.inspect_shards import pick
from cavmae.preprocess.plots import DPI, sheet_figure, stats_figure
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from tests.clips import make_clip

FRAMES = 3
SMALL = ["--set", f"video.num_frames={FRAMES}", "--set", "video.image_size=32", "--set", "clip.length_s=2.0",
         "--no-progress"]


@pytest.fixture(scope="module")
def ingested(local_ray, tmp_path_factory):
    """Two labelled folders of clips (one 3 s, longer than the 2 s clip), a truncated video, an audio file and
    files that are not media, ingested in shards of 2: (folder, out, label index, stderr of the run)."""
    root = tmp_path_factory.mktemp("look")
    folder = root / "in"
    make_clip(folder / "low", "red_low", seconds=1.5, size=(64, 48), color="red", tone_hz=330)
    make_clip(folder / "low", "blue_low", seconds=3.0, size=(64, 48), color="blue", tone_hz=330)
    make_clip(folder / "high", "green_high", seconds=1.2, size=(64, 48), color="green", tone_hz=1320,
              container="mkv", vcodec="libvpx-vp9", acodec="libopus")
    whole = make_clip(root / "src", "whole", seconds=1.5, size=(64, 48)).read_bytes()
    (folder / "high" / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    make_clip(folder / "high", "audio_only", seconds=1.0, video=False, container="m4a")
    (folder / "notes.txt").write_text("not media")
    (folder / ".DS_Store").write_bytes(b"\0")
    for name in "abcde":
        (folder / "more").mkdir(exist_ok=True)
        (folder / "more" / f"{name}.json.bak").write_text("{}")
    index = root / "class_labels_indices.csv"
    index.write_text("index,mid,display_name\n0,/m/low,low\n1,/m/high,\"high, bright\"\n")
    labels = root / "labels.csv"
    labels.write_text("video_id,labels\nred_low,/m/low\nblue_low,/m/low\ngreen_high,/m/high\n"
                      "truncated,/m/high\naudio_only,/m/high\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["ingest", str(folder), "--out", str(root / "out"), "--labels", str(labels), "--label-index",
                   str(index), "--set", "shards.samples_per_shard=2", *SMALL])
    assert rc == 0, err.getvalue()
    return folder, root / "out", index, err.getvalue().splitlines()


def test_ingest_names_ignored_files_and_fails_audio_files(ingested, tmp_path):
    folder, out, _, err = ingested
    assert "cavmae-prep: ignored 7 file(s) in the input folders (not a video or audio extension: 6, hidden file: 1)" \
        in err
    named = [line for line in err if line.startswith("cavmae-prep: ignored: ")]
    assert len(named) == 5 and f"cavmae-prep: ignored: {folder / '.DS_Store'}: hidden file" in named
    assert "cavmae-prep: ... and 2 more" in err
    rows = {r["video_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(rows) == {"red_low", "blue_low", "green_high", "truncated", "audio_only"}  # ignored: not rows
    assert rows["audio_only"]["status"] == "failed" and rows["audio_only"]["error"] == "no video stream"
    assert any(line.endswith("audio_only.m4a: no video stream") for line in err)

    kept = tmp_path / "kept"
    assert main(["ingest", str(folder / "high" / "audio_only.m4a"), "--out", str(kept), *SMALL,
                 "--set", "video.allow_missing=true"]) == 0
    (sample,) = map(decode_sample, raw_samples(list_shards(str(kept))))
    assert sample["meta"]["has_video"] is False and sample["frames"] == [] and sample["fbank"].shape[1] == 128


def _direct(out: Path, target_length: int, batch_size: int) -> dict:
    """The figures by a plain pass: tarfile, numpy.load, PIL; float64 over everything at once."""
    fbanks, pixels, durations = [], [], []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                data = tar.extractfile(m).read()
                if m.name.endswith(".fbank.npy"):
                    fbanks.append(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float64))
                elif m.name.endswith(".jpg"):
                    pixels.append(np.asarray(Image.open(io.BytesIO(data), formats=["JPEG"])).reshape(-1, 3))
                elif m.name.endswith(".json"):
                    durations.append(json.loads(data)["duration_s"])
    values = np.concatenate(fbanks)
    padded = np.zeros((len(fbanks), target_length, values.shape[1]))
    for i, fb in enumerate(fbanks):
        padded[i, : min(len(fb), target_length)] = fb[:target_length]
    batches = [padded[i:i + batch_size] for i in range(0, len(fbanks), batch_size)]
    return {"mean": values.mean(), "std": values.std(), "bin_mean": values.mean(0), "bin_std": values.std(0),
            "padded_mean": np.mean([b.mean() for b in batches]),
            "padded_std": np.mean([b.std(ddof=1) for b in batches]),
            "rgb": np.concatenate(pixels).astype(np.float64).mean(0), "samples": len(fbanks),
            "durations": durations}


def test_stats_agree_with_a_direct_numpy_pass(ingested, tmp_path, capsys):
    _, out, index, _ = ingested
    args = ["stats", str(out), "--out", str(tmp_path), "--label-index", str(index), "--batch-size", "2",
            "--rows", "128", "--no-progress"]
    assert main(args) == 0
    assert "train with --set data.mean=" in capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    direct = _direct(out, 128, 2)
    fb = stats["fbank"]
    assert stats["shards"] == 2 and stats["samples"] == direct["samples"] == 3 and stats["unreadable"] == 0
    assert abs(fb["mean"] - direct["mean"]) < 1e-4 and abs(fb["std"] - direct["std"]) < 1e-4
    assert np.abs(np.array(fb["per_bin_mean"]) - direct["bin_mean"]).max() < 1e-4
    assert np.abs(np.array(fb["per_bin_std"]) - direct["bin_std"]).max() < 1e-4
    pb = fb["padded_batches"]
    assert pb["batches"] == 2 and pb["target_length"] == 128
    assert abs(pb["mean"] - direct["padded_mean"]) < 1e-4 and abs(pb["std"] - direct["padded_std"]) < 1e-4
    assert np.abs(np.array(stats["frames"]["mean_rgb"]) - direct["rgb"]).max() < 1e-4
    assert stats["frames"]["frames"] == 3 * FRAMES
    assert stats["use"]["unpadded"] == f"--set data.mean={fb['mean']:.4f} --set data.std={fb['std']:.4f}"
    # counts and reasons from the manifest, labels by display name with their class index
    man = stats["manifest"]
    assert (man["ok"], man["failed"], man["skipped"]) == (3, 2, 0)
    assert man["failure_reasons"]["no video stream"] == 1 and sum(man["failure_reasons"].values()) == 2
    assert stats["label_counts"] == [{"label": "/m/low", "count": 2, "name": "low", "index": 0},
                                     {"label": "/m/high", "count": 1, "name": "high, bright", "index": 1}]
    hist = stats["duration_s"]["histogram"]
    assert sum(hist["counts"]) == 3 and stats["duration_s"]["max"] == pytest.approx(max(direct["durations"]))

    with Image.open(tmp_path / "stats.png", formats=["PNG"]) as png:
        assert png.size == (14 * DPI, 9 * DPI)
    assert len(stats_figure(stats).axes) == 4  # durations, labels, mean log-mel per bin, failure reasons


def test_stats_default_to_the_shard_folder(ingested, tmp_path):
    _, out, _, _ = ingested
    copy = shutil.copytree(out, tmp_path / "shards")
    assert main(["stats", str(copy), "--set", "model.target_length=128", "--no-progress"]) == 0
    assert json.loads((copy / "stats.json").read_text())["fbank"] and (copy / "stats.png").is_file()


def test_inspect_draws_frames_over_the_log_mel(ingested, tmp_path, capsys):
    _, out, index, _ = ingested
    assert main(["inspect", str(out), "--random", "2", "--out", str(tmp_path / "two.png")]) == 0
    assert main(["inspect", str(out), "--random", "2", "--out", str(tmp_path / "two.png")]) == 0  # redrawn in place
    with Image.open(tmp_path / "two.png", formats=["PNG"]) as png:
        assert png.size == (2 * 10 * DPI, round(4.4 * DPI))  # two cells side by side
    urls = list_shards(str(out))
    two = pick(urls, count=2, seed=0)
    assert len(two) == 2 and [s["key"] for s in two] == [s["key"] for s in pick(urls, count=2, seed=0)]
    assert len({s["key"] for s in pick(urls, count=10)}) == 3  # more than there are: all of them
    fig = sheet_figure(two, 0.01)
    assert len(fig.axes) == 2 * (FRAMES + 1)  # per sample: its frames, and one spectrogram under them
    spectrogram = fig.axes[FRAMES]
    assert spectrogram.get_xlabel().startswith("time in the video (s)")
    assert len(spectrogram.lines) == FRAMES  # the frame times, marked

    assert main(["inspect", str(out), "--key", "green_high", "--label-index", str(index),
                 "--out", str(tmp_path / "one.png")]) == 0
    with Image.open(tmp_path / "one.png", formats=["PNG"]) as png:
        assert png.size == (10 * DPI, round(4.4 * DPI))
    (one,) = pick(urls, key="green_high")
    assert "high, bright" in sheet_figure([one], 0.01, {"/m/high": "high, bright"}).subfigs[0].get_suptitle()
    capsys.readouterr()
    assert main(["inspect", str(out), "--key", "nope", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cavmae-prep: error: --key nope: no such sample in the 2 shard(s)"
    assert not (tmp_path / "x.png").exists()
