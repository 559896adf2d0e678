"""The datasets' own lists as ingest inputs: generated rows in each published format + generated clips -> ingest on a
real local Ray -> shards whose samples cover the listed segments (frame times, fbank rows), with the list's labels,
splits and folds, and skipped rows for the files that are not there; reprocess from source keeps the segments."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cavmae.preprocess.cli import main
from cavmae.preprocess.datasets import ListOptions, dataset_items, sniff
from cavmae.preprocess.decode import Segment, decode_clips
from cavmae.preprocess.ingest import ingest
from cavmae.preprocess.inputs import InputError
from cavmae.preprocess.reprocess import reprocess, reprocess_config
from cavmae.shards.config import load_config
from cavmae.shards.reader import decode_sample, list_shards, raw_samples
from tests.clips import make_clip

SMALL = ["video.num_frames=4", "video.image_size=64", "shards.samples_per_shard=4"]
# 10 s of a file at 10 fps, 4 official picks int(i * 100 / 4) - 1 (clamped): frames 0, 24, 49, 74 of the segment
PICKS_S = (0.0, 2.4, 4.9, 7.4)


def clip(folder: Path, name: str, seconds: float, **kw) -> Path:
    return make_clip(folder, name, seconds=seconds, size=(80, 64), fps=10, channels=1, sample_rate=16000, **kw)


def samples(out: Path) -> dict[str, dict]:
    return {s["meta"]["video_id"]: s for s in map(decode_sample, raw_samples(list_shards(str(out))))}


def manifest(out: Path) -> dict[str, dict]:
    return {r["video_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def assert_segment(sample: dict, start_in_file: float, listed: list[float], cut: bool) -> None:
    meta = sample["meta"]
    assert meta["frame_times_s"] == pytest.approx([start_in_file + t for t in PICKS_S])
    assert sample["fbank"].shape == (998, 128)  # 10 s of audio: the segment's, not the file's
    assert meta["duration_s"] == pytest.approx(10.0, abs=0.05)  # the segment's length, not the file's
    assert meta["segment"] == {"listed_s": listed, "in_file_s": [start_in_file, start_in_file + 10.0],
                               "file_is_segment": cut}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("lists")
    videos = root / "videos"
    full = clip(videos, "AAAAAAAAAAA", 14.0)                   # a whole video: the segment is cut from it
    clip(videos / "cut", "BBBBBBBBB_B_30.000", 10.0, tone_hz=880.0)  # already the 10 s cut, named by its start
    return root, videos, full


def test_audioset_segments_labels_and_missing_files(local_ray, media, tmp_path):
    root, videos, _ = media
    listing = root / "balanced_train_segments.csv"
    listing.write_text(
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"
        "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
        'AAAAAAAAAAA, 3.000, 13.000, "/m/09x0r,/m/04rlf"\n'
        'BBBBBBBBB_B, 30.000, 40.000, "/m/068hy"\n'
        'CCCCCCCCCCC, 0.000, 10.000, "/m/09x0r"\n')
    assert sniff(listing) == "audioset"
    index = root / "labels.csv"
    index.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n2,/m/068hy,"Domestic '
                     'animals, pets"\n')
    summary = ingest([str(listing)], tmp_path / "as", load_config(sets=SMALL), label_index_csv=str(index),
                     lists=ListOptions(videos_dir=str(videos)))
    assert (summary.ok, summary.skipped, summary.failed) == (2, 1, 0)
    assert summary.problems == [f"skipped: {listing}:6: no file for YTID 'CCCCCCCCCCC' in {videos}"]
    rows = manifest(tmp_path / "as")
    assert rows["CCCCCCCCCCC"]["status"] == "skipped" and rows["CCCCCCCCCCC"]["labels"] == ["/m/09x0r"]
    assert rows["AAAAAAAAAAA"]["duration_s"] == pytest.approx(10.0)  # the segment of the 14 s file
    got = samples(tmp_path / "as")
    assert_segment(got["AAAAAAAAAAA"], 3.0, [3.0, 13.0], cut=False)
    assert_segment(got["BBBBBBBBB_B"], 0.0, [30.0, 40.0], cut=True)
    assert got["AAAAAAAAAAA"]["labels"] == [0, 1] and got["BBBBBBBBB_B"]["labels"] == [2]
    assert got["AAAAAAAAAAA"]["meta"]["dataset"] == {"format": "audioset", "ytid": "AAAAAAAAAAA"}

    # reprocess from the sources (a video setting changed) takes the same segments again
    cfg = reprocess_config(tmp_path / "as", sets=["video.num_frames=2"])
    assert reprocess(tmp_path / "as", tmp_path / "as2", cfg, sources=[str(videos)]).ok == 2
    again = samples(tmp_path / "as2")["AAAAAAAAAAA"]["meta"]
    assert again["frame_times_s"] == pytest.approx([3.0, 7.9]) and again["segment"]["in_file_s"] == [3.0, 13.0]


def test_vggsound_and_kinetics_lists_with_split_filters(local_ray, media, tmp_path):
    root, videos, _ = media
    clip(videos, "DDDDDDDDDDD_000002", 10.0)  # VGGSound's own naming: {ytid}_{start:06d}
    vgg = root / "vggsound.csv"
    vgg.write_text('AAAAAAAAAAA,3,people marching,train\nDDDDDDDDDDD,2,"cattle, bovinae cowbell",train\n'
                   "EEEEEEEEEEE,5,dog barking,test\n")
    kin = root / "kinetics_train.csv"
    kin.write_text("label,youtube_id,time_start,time_end,split\nabseiling,AAAAAAAAAAA,3,13,train\n"
                   '"tying bow tie",BBBBBBBBB_B,30,40,val\n')
    assert (sniff(vgg), sniff(kin)) == ("vggsound", "kinetics")
    cfg = load_config(sets=SMALL)
    summary = ingest([str(vgg)], tmp_path / "vgg", cfg, lists=ListOptions(videos_dir=str(videos), split=("train",)))
    assert (summary.ok, summary.skipped) == (2, 0)  # the test row is not taken at all
    got = samples(tmp_path / "vgg")
    assert set(got) == {"AAAAAAAAAAA_000003", "DDDDDDDDDDD_000002"}
    assert_segment(got["AAAAAAAAAAA_000003"], 3.0, [3.0, 13.0], cut=False)
    assert_segment(got["DDDDDDDDDDD_000002"], 0.0, [2.0, 12.0], cut=True)
    assert got["DDDDDDDDDDD_000002"]["meta"]["labels"] == ["cattle, bovinae cowbell"]
    assert got["DDDDDDDDDDD_000002"]["meta"]["dataset"] == {"format": "vggsound", "ytid": "DDDDDDDDDDD",
                                                            "split": "train"}

    summary = ingest([str(kin)], tmp_path / "kin", cfg, lists=ListOptions(videos_dir=str(videos), split=("val",)))
    got = samples(tmp_path / "kin")
    assert summary.ok == 1 and got["BBBBBBBBB_B"]["meta"]["labels"] == ["tying bow tie"]
    assert_segment(got["BBBBBBBBB_B"], 0.0, [30.0, 40.0], cut=True)
    with pytest.raises(InputError, match="no split column"):
        dataset_items(str(root / "balanced_train_segments.csv"), ListOptions(split=("train",)))


def test_esc50_folds_audio_only(local_ray, tmp_path):
    root = tmp_path / "ESC-50-master"
    for name, hz in (("1-100032-A-0", 500.0), ("2-100038-A-14", 1500.0)):
        make_clip(root / "audio", name, seconds=5.0, video=False, container="wav", acodec="pcm_s16le",
                  channels=1, sample_rate=44100, tone_hz=hz)
    (root / "meta").mkdir()
    listing = root / "meta" / "esc50.csv"
    listing.write_text("filename,fold,target,category,esc10,src_file,take\n1-100032-A-0.wav,1,0,dog,True,100032,A\n"
                       "2-100038-A-14.wav,2,14,chirping_birds,False,100038,A\n3-1-A-1.wav,3,1,rooster,False,1,A\n")
    cfg = load_config(sets=SMALL + ["video.allow_missing=true"])
    summary = ingest([str(listing)], tmp_path / "esc", cfg, lists=ListOptions(split=("1", "2", "3")))
    assert (summary.ok, summary.skipped) == (2, 1)
    assert summary.problems == [f"skipped: {listing}:4: no file for '3-1-A-1' in {root / 'audio'}"]
    got = samples(tmp_path / "esc")
    dog = got["1-100032-A-0"]
    assert dog["fbank"].shape == (498, 128) and dog["frames"] == [] and dog["meta"]["has_video"] is False
    assert dog["labels"] == [0] and dog["meta"]["labels"] == ["dog"]
    assert dog["meta"]["dataset"] == {"format": "esc50", "fold": 1, "target": 0} and "segment" not in dog["meta"]
    assert got["2-100038-A-14"]["labels"] == [14]
    held_out = ingest([str(listing)], tmp_path / "esc_fold2", cfg, lists=ListOptions(split=("2",)))
    assert held_out.ok == 1 and set(samples(tmp_path / "esc_fold2")) == {"2-100038-A-14"}


def test_windows_within_a_segment(media):
    """clip.mode windows covers the segment only: windows start at its start, the last one ends at its end."""
    _, _, full = media
    cfg = load_config(sets=SMALL + ["clip.mode=windows", "clip.length_s=4.0", "clip.hop_s=4.0"])
    clips = decode_clips(full, cfg, segment=Segment(3.0, 13.0))
    assert [c.clip_start_s for c in clips] == [3.0, 7.0, 11.0]
    assert [len(c.waveform) for c in clips] == [64000, 64000, 32000]
    assert all(3.0 <= t < 13.0 for c in clips for t in c.frame_times_s)
    assert all(c.segment_s == (3.0, 13.0) and c.file_is_segment is False for c in clips)


def test_a_segment_sample_lasts_as_long_as_its_segment(media):
    """duration_s (sample json, manifest, stats) is the input's length: the segment's of a longer file, clipped at
    the file's end; a whole file's own."""
    _, videos, full = media
    cfg = load_config(sets=SMALL)
    assert [c.duration_s for c in decode_clips(full, cfg, segment=Segment(3.0, 13.0))] == [pytest.approx(10.0)]
    assert [c.duration_s for c in decode_clips(full, cfg, segment=Segment(10.0, 20.0))] == [pytest.approx(4.0)]
    assert [c.duration_s for c in decode_clips(full, cfg)] == [pytest.approx(14.0)]
    cut = videos / "cut" / "BBBBBBBBB_B_30.000.mp4"
    assert [c.duration_s for c in decode_clips(cut, cfg, segment=Segment(30.0, 40.0))] == [pytest.approx(10.0)]


def test_list_format_errors(tmp_path):
    bad = tmp_path / "vgg.csv"
    bad.write_text("AAAAAAAAAAA,3,dog,train\nBBBBBBBBBBB,soon,dog,train\n")
    with pytest.raises(InputError, match=r"vgg.csv:2: 'soon' is not a time in seconds"):
        dataset_items(str(bad), ListOptions(format="vggsound"))
    good = tmp_path / "vgg_good.csv"
    good.write_text("AAAAAAAAAAA,3,dog,train\n")
    with pytest.raises(InputError, match="no such folder"):
        dataset_items(str(good), ListOptions(format="vggsound", videos_dir=str(tmp_path / "nope")))
    paths = tmp_path / "list.csv"
    paths.write_text("a.mp4\nb.mp4\n")
    assert sniff(paths) is None and dataset_items(str(paths), None) is None  # a plain path list stays one


VGG = "AAAAAAAAAAA,3,dog,train\nBBBBBBBBBBB,4,cat,test\n"
ESC = "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,1,0,dog,True,1,A\n2-2-A-1.wav,2,1,cat,False,2,A\n"
KINETICS = "label,youtube_id,time_start,time_end,split\nabseiling,AAAAAAAAAAA,3,13,train\n"


def write(path: Path, text: str, bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def test_unknown_split_names_the_splits_the_list_holds(tmp_path):
    """A typo in --split is an error naming what the list holds, never a filter that keeps no row."""
    vgg, esc = write(tmp_path / "vgg.csv", VGG), write(tmp_path / "meta" / "esc50.csv", ESC)
    (tmp_path / "audio").mkdir()
    with pytest.raises(InputError, match=r"^--split trian: not a split of .*vgg.csv, which holds the splits train, "
                                         r"test$"):
        dataset_items(str(vgg), ListOptions(split=("trian",)))
    with pytest.raises(InputError, match=r"^--split trian: not a split"):  # one typo among good splits too
        dataset_items(str(vgg), ListOptions(split=("train", "trian")))
    with pytest.raises(InputError, match=r"^--split 6: not a fold of .*esc50.csv, which holds the folds 1, 2$"):
        dataset_items(str(esc), ListOptions(split=("6",)))
    test_list = write(tmp_path / "kinetics_test.csv", "youtube_id,time_start,time_end\nAAAAAAAAAAA,3,13\n")
    with pytest.raises(InputError, match="kinetics_test.csv: this list has no split column"):
        dataset_items(str(test_list), ListOptions(split=("test",)))
    assert [it.video_id for it in dataset_items(str(esc), ListOptions(split=("2",)))] == ["2-2-A-1"]


def test_lists_saved_with_a_byte_order_mark(tmp_path):
    """A "CSV UTF-8" list starts with a BOM: every format keeps its first column (Kinetics its labels)."""
    kin = write(tmp_path / "k.csv", KINETICS, bom=True)
    (item,) = dataset_items(str(kin), None)
    assert item.labels == ("abseiling",) and item.dataset["split"] == "train"
    (first, _) = dataset_items(str(write(tmp_path / "v.csv", VGG, bom=True)), None)
    assert first.video_id == "AAAAAAAAAAA_000003"
    esc = write(tmp_path / "meta" / "esc50.csv", ESC, bom=True)
    (tmp_path / "audio").mkdir()
    assert sniff(esc) == "esc50" and [it.labels for it in dataset_items(str(esc), None)] == [("dog",), ("cat",)]
    audioset = write(tmp_path / "as.csv", '# YTID, start_seconds, end_seconds, positive_labels\nAAAAAAAAAAA, 3, 13, '
                                          '"/m/a"\n', bom=True)
    assert sniff(audioset) == "audioset" and dataset_items(str(audioset), None)[0].labels == ("/m/a",)


def test_header_without_the_columns_of_its_format(tmp_path):
    """A list named with another --list-format than its own: one line naming the file and the missing columns."""
    vgg = write(tmp_path / "vgg.csv", VGG)
    with pytest.raises(InputError, match=r"vgg.csv: a Kinetics list needs the column\(s\) youtube_id, time_start, "
                                         r"time_end in its header \(it has: aaaaaaaaaaa,3,dog,train\)"):
        dataset_items(str(vgg), ListOptions(format="kinetics"))
    kin = write(tmp_path / "k.csv", KINETICS)
    with pytest.raises(InputError, match=r"k.csv: an ESC-50 list needs the column\(s\) filename, fold, target, "
                                         "category in its header"):
        dataset_items(str(kin), ListOptions(format="esc50"))
    swapped = write(tmp_path / "meta" / "esc50.csv", "fold,filename,category,target\n1,1-1-A-0.wav,dog,0\n")
    (tmp_path / "audio").mkdir()
    (item,) = dataset_items(str(swapped), ListOptions(format="esc50"))  # columns found by name, not place
    assert (item.video_id, item.labels, item.label_indices) == ("1-1-A-0", ("dog",), (0,))


def test_cli_every_row_skipped_exits_1_then_names_retry_failed(tmp_path, capsys):
    """An ingest that takes no row is exit 1 with each row as `skipped:`; a re-run says how to take them again, and
    --retry-failed records the rows whose file is still missing as skipped again."""
    vgg = write(tmp_path / "vgg.csv", VGG)
    (tmp_path / "empty").mkdir()
    argv = ["ingest", str(vgg), "--videos-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == [f"cavmae-prep: skipped: {vgg}:{n}: no file for YTID '{y}' in {tmp_path / 'empty'}"
                       for n, y in ((1, "AAAAAAAAAAA"), (2, "BBBBBBBBBBB"))]
    assert err[2] == "cavmae-prep: error: no input could be processed (see the error column of manifest.parquet)"
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert "skipped 0, already done 2" in out and "skipped:" not in err
    assert f"2 of the inputs already done are recorded as failed or skipped (the error column of {tmp_path / 'out'}" \
           "/manifest.parquet says why); once fixed, re-run with --retry-failed" in err
    assert main(argv + ["--retry-failed"]) == 1
    out, err = capsys.readouterr()
    assert "skipped 2, already done 0" in out and err.count("cavmae-prep: skipped: ") == 2
    assert {r["status"] for r in manifest(tmp_path / "out").values()} == {"skipped"}
