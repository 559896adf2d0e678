"""Nothing ignored in silence: `cavmae-prep ingest` over a folder names what it did not take, and audio files
become failed rows (or audio-only samples with video.allow_missing)."""

from pathlib import Path

import pyarrow.parquet as pq

from preprocess.cli import main
from shards.reader import decode_sample, list_shards, raw_samples
from tests.clips import make_clip

SMALL = ["--set", "video.num_frames=2", "--set", "video.image_size=32", "--no-progress"]


def test_ingest_reports_ignored_files_and_fails_audio_only(local_ray, tmp_path, capsys):
    folder = tmp_path / "in"
    make_clip(folder, "video", seconds=1.0, size=(64, 48))
    make_clip(folder, "audio_only", seconds=1.0, video=False, container="m4a")
    (folder / "notes.txt").write_text("not media")
    (folder / ".DS_Store").write_bytes(b"\0")
    for name in ("a", "b", "c", "d", "e"):
        (folder / "more" / f"{name}.json.bak").parent.mkdir(exist_ok=True)
        (folder / "more" / f"{name}.json.bak").write_text("{}")

    assert main(["ingest", str(folder), "--out", str(tmp_path / "out"), *SMALL]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "cavmae-prep: ignored 7 file(s) in the input folders (not a video or audio extension: 6, hidden file: 1)" \
        in err
    named = [line for line in err if line.startswith("cavmae-prep: ignored: ")]
    assert len(named) == 5 and f"cavmae-prep: ignored: {folder / '.DS_Store'}: hidden file" in named
    assert "cavmae-prep: ... and 2 more" in err
    rows = {r["video_id"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert set(rows) == {"video", "audio_only"}  # ignored files are not manifest rows
    assert rows["audio_only"]["status"] == "failed" and rows["audio_only"]["error"] == "no video stream"
    assert any(line.endswith("audio_only.m4a: no video stream") for line in err)

    assert main(["ingest", str(folder), "--out", str(tmp_path / "kept"), *SMALL,
                 "--set", "video.allow_missing=true"]) == 0
    samples = {s["meta"]["video_id"]: s for s in map(decode_sample, raw_samples(list_shards(str(tmp_path / "kept"))))}
    assert samples["audio_only"]["meta"]["has_video"] is False and samples["audio_only"]["frames"] == []
    assert samples["audio_only"]["fbank"].shape[1] == 128
    assert Path(samples["audio_only"]["meta"]["source"]).suffix == ".m4a"
