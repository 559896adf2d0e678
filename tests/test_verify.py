"""`cavmae-prep verify`: a downloaded shard set read through before training; `--list` agrees with `tarfile`."""

import hashlib
import json
import subprocess
import tarfile

import numpy as np

from cavmae.preprocess.cli import main
from cavmae.preprocess.features import encode_flac, encode_jpeg
from cavmae.preprocess.verify import verify_shard
from cavmae.shards.config import load_config
from cavmae.shards.manifest import write_rows
from cavmae.shards.schema import sample_members
from cavmae.shards.writer import ShardWriter

SETS = ["video.image_size=16", "video.num_frames=2", "audio.num_mel_bins=8"]


def shard_set(folder, keys=("a0", "a1"), mel=8):
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for i, key in enumerate(keys):
        frames = [encode_jpeg(np.full((16, 16, 3), 40 * j, np.uint8), 75) for j in range(2)]
        members += sample_members(key, {"video_id": key}, np.full((4 + i, mel), 0.5, np.float32), frames,
                                  flac=encode_flac(np.zeros(1600, np.float32), 16000))
    with ShardWriter(folder, "shard-000000.tar") as shard:
        shard.add(members)
    rows = shard.locate([{"video_id": k, "key": k, "status": "ok", "shard": "shard-000000.tar", "labels": []}
                         for k in keys])
    write_rows(folder / "manifest.parquet", rows)
    return rows


def run(argv, capsys):
    code = main(["verify", "--no-progress", "--workers", "1", *argv, *[x for s in SETS for x in ("--set", s)]])
    out, err = capsys.readouterr()
    return code, out, "\n".join(line for line in err.splitlines() if line.startswith("cavmae-prep"))  # (not Ray's log)


def test_a_clean_set_passes_and_every_kind_of_damage_is_one_line(tmp_path, capsys):
    rows = shard_set(tmp_path / "ok")
    code, out, _ = run([str(tmp_path / "ok")], capsys)
    assert code == 0 and "verified 1 shard(s), 2 good sample(s), 0 problem(s)" in out

    shard_set(tmp_path / "mel", mel=16)  # samples made with other settings than the ones given
    shard_set(tmp_path / "cut")
    cut = tmp_path / "cut" / "shard-000000.tar"
    cut.write_bytes(cut.read_bytes()[:rows[1]["offset"] + 700])
    moved = shard_set(tmp_path / "moved")
    moved[1]["offset"] += 512
    write_rows(tmp_path / "moved" / "manifest.parquet", moved)
    code, out, _ = run([str(tmp_path / d) for d in ("mel", "cut", "moved")], capsys)
    lines = [line for line in out.splitlines() if "problem:" in line]
    assert code == 1 and len(lines) == 5, out  # the cut shard: the truncation, and the one sample it took
    assert sum("mel" in line and "16 mel bins, the settings say 8" in line for line in lines) == 2
    assert any(str(cut) in line and "truncated" in line for line in lines)
    assert any("'a1': manifest.parquet puts it at bytes" in line for line in lines)
    assert any(str(cut) in line and "'a1' (in manifest.parquet) is damaged" in line for line in lines)
    assert "verified 3 shard(s), 3 good sample(s), 5 problem(s)" in out


def test_nothing_decodable_and_bad_arguments_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    code, _, err = run([str(junk)], capsys)
    assert code == 2 and "no decodable sample in 1 shard(s)" in err and len(err.strip().splitlines()) == 1
    code, _, err = run([str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "no shards found" in err


def test_list_agrees_with_tarfile(tmp_path, capsys):
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / ("long" * 40 + ".bin")).write_bytes(b"x" * 700)
    (root / "small").write_bytes(b"")
    shard_set(tmp_path / "set")
    archives = [tmp_path / f"{fmt}.tar" for fmt in ("gnu", "pax", "oldgnu")]
    for path in archives:
        subprocess.run(["tar", f"--format={path.stem}", "-C", str(root), "-cf", str(path), "."], check=True)
    archives.append(tmp_path / "set" / "shard-000000.tar")
    code = main(["verify", "--list", *map(str, archives)])
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = []
    for path in sorted(map(str, archives)):
        with tarfile.open(path) as tar:
            want += [{"shard": path, "name": m.name, "size": m.size,
                      "sha256": hashlib.sha256(tar.extractfile(m).read()).hexdigest()} for m in tar if m.isreg()]
    assert code == 0 and got == want and len(got) == 3 * 2 + 2 * 5


def test_verify_shard_is_a_pure_function_of_plain_data(tmp_path):
    rows = shard_set(tmp_path / "ok")
    settings = load_config(None, SETS).to_dict()
    url = str(tmp_path / "ok" / "shard-000000.tar")
    assert verify_shard(url, rows, settings) == (2, [])
    good, problems = verify_shard(url, rows[:1], settings)
    assert good == 2 and problems == [f"{url}: sample 'a1' is in the shard but not in manifest.parquet"]
    assert verify_shard(url, rows + rows[1:], settings)[1] == [f"{url}: sample 'a1' is listed 2 times in "
                                                               "manifest.parquet"]
