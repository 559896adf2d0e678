"""The sample index trusts a manifest only where it describes its own shard: full-URI matching across folders,
spans that tile the shard, keys unique across the set, typed columns (issue 17, items 4 and 5)."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cavmae.shards.index import sample_index
from cavmae.shards.manifest import ManifestError, manifest_rows, read_rows, write_rows
from cavmae.shards.schema import sample_members
from cavmae.shards.writer import ShardWriter


def ingest_like(folder, keys, name="shard-000000.tar"):
    """A shard of `keys` and its manifest, as ingest writes them (spans from the writer)."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i, key in enumerate(keys):
        members += sample_members(key, {"video_id": key}, np.full((3 + i, 4), i, np.float32), [b"jpeg" * (i + 1)])
    with ShardWriter(folder, name) as shard:
        shard.add(members)
    rows = shard.locate([{"video_id": k, "key": k, "status": "ok", "shard": name, "labels": []} for k in keys])
    write_rows(folder / "manifest.parquet", rows)
    return rows


def index_of(*folders):
    urls = [str(f / "shard-000000.tar") for f in folders]
    return sample_index(urls, manifest_rows(urls))


def test_two_folders_with_the_same_shard_names_are_indexed_each_by_its_own_manifest(tmp_path):
    a = ingest_like(tmp_path / "A", ["a0", "a1"])
    b = ingest_like(tmp_path / "B", ["b0", "b1", "b2"])
    index = index_of(tmp_path / "A", tmp_path / "B")
    assert [k.decode() for k in index.key] == ["a0", "a1", "b0", "b1", "b2"]
    assert list(index.shard) == [0, 0, 1, 1, 1]
    assert list(index.offset) == [r["offset"] for r in a + b]


@pytest.mark.parametrize("damage", ["missing", "duplicated", "huge_length", "bad_key", "moved"])
def test_a_manifest_that_disagrees_with_its_shard_is_replaced_by_a_scan(tmp_path, caplog, damage):
    rows = ingest_like(tmp_path / "A", ["a0", "a1", "a2"])
    if damage == "missing":
        rows = rows[:1] + rows[2:]
    elif damage == "duplicated":
        rows = rows + rows[1:2]
    elif damage == "huge_length":
        rows[2]["length"] = 2 ** 40
    elif damage == "bad_key":
        rows[1]["key"] = "../a1"
    else:
        rows[1]["offset"] += 512
    write_rows(tmp_path / "A" / "manifest.parquet", rows)
    with caplog.at_level(logging.WARNING):
        index = index_of(tmp_path / "A")
    assert [k.decode() for k in index.key] == ["a0", "a1", "a2"]
    assert "manifest.parquet" in caplog.text and "re-indexed by a scan" in caplog.text
    assert len([r for r in caplog.records if "re-indexed" in r.getMessage()]) == 1


def test_a_key_in_two_shards_is_indexed_once(tmp_path, caplog):
    ingest_like(tmp_path / "A", ["a0", "same"])
    ingest_like(tmp_path / "B", ["same", "b1"])
    with caplog.at_level(logging.WARNING):
        index = index_of(tmp_path / "A", tmp_path / "B")
    assert [k.decode() for k in index.key] == ["a0", "same", "b1"] and list(index.shard) == [0, 0, 1]
    assert "'same'" in caplog.text and str(tmp_path / "A" / "shard-000000.tar") in caplog.text


def test_a_manifest_that_is_not_one_is_a_one_line_error(tmp_path):
    folder = tmp_path / "A"
    ingest_like(folder, ["a0"])
    path = folder / "manifest.parquet"
    good = pq.read_table(path)
    cases = {
        "not a readable parquet": lambda: path.write_bytes(b"PAR1 not really"),
        "no column status": lambda: pq.write_table(good.drop(["status"]), path),
        "column 'offset' is string": lambda: pq.write_table(
            good.set_column(good.schema.get_field_index("offset"), "offset", pa.array(["0"])), path),
    }
    for needle, damage in cases.items():
        damage()
        with pytest.raises(ManifestError) as err:
            read_rows(path)
        assert needle in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


def test_training_on_a_folder_whose_manifest_is_not_one_stops_with_one_line(tmp_path, capsys):
    from cavmae.train import cli as train_cli

    ingest_like(tmp_path / "A", ["a0", "a1"])
    (tmp_path / "A" / "manifest.parquet").write_bytes(b"not parquet at all")
    code = train_cli.main(["pretrain", "--shards", str(tmp_path / "A"), "--out", str(tmp_path / "run"),
                           "--set", "model.size=tiny", "--set", "data.num_workers=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "manifest.parquet: not a readable parquet file" in err
