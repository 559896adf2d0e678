"""`cavmae-train embed`: one row per sample, finite vectors, the same video twice gives the same vectors, written
batch by batch; pretrained and finetuned checkpoints alike."""

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY  # noqa: E402

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.checkpoint import official_state_dict  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.model import build_finetune_model, build_pretrain_model  # noqa: E402
from cavmae.train.stage import model_settings  # noqa: E402


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def test_embed_rows_and_duplicate_videos(train_shards, tmp_path, capsys):
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    torch.save(official_state_dict(build_pretrain_model(model_settings(cfg))), tmp_path / "pt.pth")
    out = tmp_path / "emb" / "val.parquet"
    assert main(["embed", "--shards", str(train_shards / "val"), "--checkpoint", str(tmp_path / "pt.pth"),
                 "--out", str(out), "--no-progress", *sets("eval.batch_size=8")]) == 0
    assert json.loads(capsys.readouterr().out) == {"rows": 32, "frames": "middle", "out": str(out)}
    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 4  # written batch by batch
    assert str(table.schema.field("audio").type) == "list<element: float>"
    rows = table.to_pylist()
    manifest = pq.read_table(train_shards / "val" / "manifest.parquet").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in manifest)
    assert {r["key"]: r["video_id"] for r in rows} == {r["key"]: r["video_id"] for r in manifest}
    audio = {r["key"]: np.array(r["audio"], dtype=np.float32) for r in rows}
    visual = {r["key"]: np.array(r["visual"], dtype=np.float32) for r in rows}
    assert all(v.shape == audio[k].shape and np.isfinite(v).all() and np.isfinite(audio[k]).all()
               for k, v in visual.items())
    # the fixture's inputs are hard links to a few clips: the same file under several ids
    same_file = defaultdict(list)
    for r in manifest:
        same_file[os.stat(r["source"]).st_ino].append(r["key"])
    groups = [keys for keys in same_file.values() if len(keys) > 1]
    assert groups
    for keys in groups:
        for k in keys[1:]:
            np.testing.assert_allclose(audio[k], audio[keys[0]], rtol=0, atol=1e-5)
            np.testing.assert_allclose(visual[k], visual[keys[0]], rtol=0, atol=1e-5)
    distinct = [keys[0] for keys in same_file.values()]
    assert not np.allclose(visual[distinct[0]], visual[distinct[1]])


def test_embed_with_a_finetuned_checkpoint_and_one_frame(train_shards, tmp_path, capsys):
    cfg = load_config(None, TINY)
    torch.save(official_state_dict(build_finetune_model(model_settings(cfg), 4)), tmp_path / "ft.pth")
    out = tmp_path / "q.parquet"
    assert main(["embed", "--shards", str(train_shards / "query"), "--checkpoint", str(tmp_path / "ft.pth"),
                 "--out", str(out), "--frames", "middle", "--no-progress", *sets()]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 8 == pq.read_table(out).num_rows
    assert main(["embed", "--shards", str(train_shards / "query"), "--checkpoint", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "x.parquet"), *sets()]) == 2
    assert capsys.readouterr().err.strip() == f"cavmae-train: error: --checkpoint {tmp_path / 'nope.pth'}: no such file"
    assert not (tmp_path / "x.parquet").exists()


def test_retrieve_and_embed_vectors_agree(train_shards, tmp_path, capsys):
    """One setting (eval.feature_frames, default middle: official retrieval) and one code path: the retrieval
    metrics computed from embed's vectors are retrieve's own, unless --frames says otherwise."""
    import torch.nn.functional as F

    from cavmae.train.retrieve import retrieval

    torch.manual_seed(1)
    torch.save(official_state_dict(build_pretrain_model(model_settings(load_config(None, TINY)))),
               tmp_path / "pt.pth")
    common = ["--shards", str(train_shards / "val"), "--checkpoint", str(tmp_path / "pt.pth")]
    for extra in ([], ["--set", "eval.feature_frames=all"]):
        out = tmp_path / f"emb{len(extra)}.parquet"
        assert main(["retrieve", *common, "--out", str(tmp_path / "r.json"), *sets(), *extra]) == 0
        capsys.readouterr()
        assert main(["embed", *common, "--out", str(out), "--no-progress", *sets(), *extra]) == 0
        got = json.loads((tmp_path / "r.json").read_text())
        assert got["frames"] == json.loads(capsys.readouterr().out)["frames"] == ("all" if extra else "middle")
        rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["key"])
        a, v = (F.normalize(torch.tensor([r[side] for r in rows]), dim=-1) for side in ("audio", "visual"))
        assert retrieval(a, v) | {"frames": got["frames"]} == got
