"""Input expansion and labels: folders, lists, official dataset JSON, label CSVs, duplicates."""

import json
from pathlib import Path

import pytest

from cavmae.preprocess.datasets import ListOptions
from cavmae.preprocess.inputs import InputError, LabelIndex, collect_inputs
from cavmae.train.labels import LabelError, read_label_index


@pytest.fixture
def tree(tmp_path):
    for rel in ["dogs/a.mp4", "dogs/b.1.MKV", "cats/c.webm", "cats/notes.txt", "cats/deep/d.avi", "x/a.mov"]:
        p = tmp_path / "videos" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not really a video")
    index = tmp_path / "class_labels_indices.csv"
    index.write_text('index,mid,display_name\n0,/m/dog,"dogs"\n1,/m/cat,"cats"\n')
    return tmp_path


def test_folder_is_recursive_sorted_and_video_only(tree):
    items = collect_inputs([str(tree / "videos")])
    assert [it.video_id for it in items] == ["a", "a", "b.1", "c", "d"]
    assert all(it.path.startswith(str(tree)) for it in items)
    # official video id = file name without extension, dots kept
    assert items[2].video_id == "b.1"


def test_duplicate_ids_are_skipped_with_a_reason(tree):
    items = collect_inputs([str(tree / "videos")])
    dup = [it for it in items if it.video_id == "a"]
    assert dup[0].error is None
    assert "duplicate video_id 'a'" in dup[1].error


def test_labels_from_folders_with_index(tree):
    items = collect_inputs([str(tree / "videos" / "dogs"), str(tree / "videos" / "cats" / "c.webm")],
                           labels_from_folders=True, label_index=LabelIndex.read(tree / "class_labels_indices.csv"))
    by_id = {it.video_id: it for it in items}
    # folder names match display names; stored as mids with indices
    assert by_id["a"].labels == ("/m/dog",) and by_id["a"].label_indices == (0,)
    assert by_id["c"].labels == ("/m/cat",) and by_id["c"].label_indices == (1,)


def test_labels_csv_and_unknown_label(tree):
    labels = tree / "labels.csv"
    labels.write_text('video_id,labels\na,"/m/dog,/m/cat"\nc,/m/bird\n')
    items = collect_inputs([str(tree / "videos" / "dogs"), str(tree / "videos" / "cats")], labels_csv=str(labels),
                           label_index=LabelIndex.read(tree / "class_labels_indices.csv"))
    by_id = {it.video_id: it for it in items}
    assert by_id["a"].labels == ("/m/dog", "/m/cat") and by_id["a"].label_indices == (0, 1)
    assert "'/m/bird' not in the label index" in by_id["c"].error


def test_path_list_relative_to_its_folder(tree):
    lst = tree / "list.csv"
    lst.write_text("videos/dogs/a.mp4\n# a comment\n\nvideos/cats/c.webm\n")
    items = collect_inputs([str(lst)])
    assert [it.video_id for it in items] == ["a", "c"]
    assert items[0].path == str((tree / "videos/dogs/a.mp4").resolve())


def test_official_dataset_json(tree):
    data = {"data": [
        {"video_id": "a", "wav": "x.flac", "video_path": "videos/dogs", "labels": "/m/dog"},
        {"video_id": "c", "wav": "y.flac", "video_path": str(tree / "videos/cats/c.webm"), "labels": "/m/cat,/m/dog"},
        {"video_id": "zz", "wav": "z.flac", "video_path": "videos/dogs", "labels": ""},
    ]}
    js = tree / "train.json"
    js.write_text(json.dumps(data))
    items = collect_inputs([str(js)])
    by_id = {it.video_id: it for it in items}
    assert by_id["a"].path.endswith("dogs/a.mp4") and by_id["a"].labels == ("/m/dog",)
    assert by_id["c"].labels == ("/m/cat", "/m/dog")
    assert "no video file for video_id 'zz'" in by_id["zz"].error


def test_missing_argument_is_an_input_error(tree):
    with pytest.raises(InputError, match="nowhere: no such file or folder"):
        collect_inputs([str(tree / "nowhere")])
    bad = tree / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InputError, match="bad.json: not a dataset JSON"):
        collect_inputs([str(bad)])


def test_files_not_taken_are_reported_with_a_reason(tree):
    videos = tree / "videos"
    (videos / "cats" / "song.M4A").write_bytes(b"audio")
    (videos / "dogs" / ".hidden.mp4").write_bytes(b"hidden")
    (videos / ".cache" / "deep").mkdir(parents=True)
    (videos / ".cache" / "deep" / "e.mp4").write_bytes(b"inside a hidden folder")
    ignored = []
    items = collect_inputs([str(videos)], ignored=ignored)
    assert "song" in {it.video_id for it in items}  # audio files are inputs (the decoder decides their fate)
    assert sorted((Path(p).name, reason) for p, reason in ignored) == [
        (".cache", "hidden folder"), (".hidden.mp4", "hidden file"),
        ("notes.txt", "not a video or audio extension")]


BOM = b"\xef\xbb\xbf"


def test_lists_saved_with_a_byte_order_mark(tree):
    """--labels, --label-index (both sides' readers), path lists and dataset JSONs saved as "CSV UTF-8" (a BOM
    first) read as without it: the first path, the header, the first label are not lost."""
    index = tree / "bom_index.csv"
    index.write_bytes(BOM + (tree / "class_labels_indices.csv").read_bytes())
    labels = tree / "bom_labels.csv"
    labels.write_bytes(BOM + b"a,/m/cat\nc,/m/dog\n")
    paths = tree / "bom_list.txt"
    paths.write_bytes(BOM + b"videos/dogs/a.mp4\nvideos/cats/c.webm\n")
    items = collect_inputs([str(paths)], labels_csv=str(labels), label_index=LabelIndex.read(index))
    assert [(it.video_id, it.labels, it.label_indices, it.error) for it in items] == [
        ("a", ("/m/cat",), (1,), None), ("c", ("/m/dog",), (0,), None)]
    assert items[0].path == str((tree / "videos/dogs/a.mp4").resolve())
    assert read_label_index(index) == {"/m/dog": 0, "/m/cat": 1}
    js = tree / "bom.json"
    js.write_bytes(BOM + json.dumps({"data": [{"video_id": "a", "video_path": "videos/dogs"}]}).encode())
    assert [it.video_id for it in collect_inputs([str(js)]) if it.error is None] == ["a"]


def test_label_index_without_its_columns(tree):
    """A label index whose header lacks index or mid, or a row short of cells: one line naming the file and what is
    missing, on both sides (never a KeyError or TypeError)."""
    no_mid = tree / "no_mid.csv"
    no_mid.write_text("index,name\n0,dog\n")
    short = tree / "short.csv"
    short.write_text("index,mid,display_name\n0,/m/dog,dog\n1\n")
    for read, error in ((LabelIndex.read, InputError), (read_label_index, LabelError)):
        with pytest.raises(error, match=r"no_mid.csv: a label index CSV \(index,mid,display_name\) needs the "
                                        r"column\(s\) mid in its header \(it has: index,name\)"):
            read(no_mid)
        with pytest.raises(error, match="short.csv: bad label index row .line 3 has fewer cells than the header"):
            read(short)


def test_split_without_a_dataset_list(tree):
    """--split given where no input is a dataset list would keep every input: an error instead."""
    with pytest.raises(InputError, match="--split train: none of the inputs is a dataset list"):
        collect_inputs([str(tree / "videos")], lists=ListOptions(split=("train",)))
