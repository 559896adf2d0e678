"""Every reading command treats a shard set where no sample decodes the same way: one line, exit 2, no output
that looks like a result (issue 18, item 5)."""

import io
import tarfile

import numpy as np
import torch

from cavmae.preprocess import cli as prep_cli
from cavmae.shards.config import load_config
from cavmae.shards.schema import encode_npy
from cavmae.train import cli as train_cli
from cavmae.train.model import build_pretrain_model
from cavmae.train.stage import model_settings

TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64", "data.num_workers=0",
        "video.num_frames=2", "pretrain.epoch_samples=2", "pretrain.batch_size=2"]


def junk_set(folder):
    """Two samples whose json is a list, not an object: each one a BadSample."""
    folder.mkdir()
    with tarfile.open(folder / "shard-000000.tar", "w") as tar:
        for key in ("j0", "j1"):
            for suffix, data in (("json", b"[]"), ("fbank.npy", encode_npy(np.zeros((4, 128), np.float16)))):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def one_line_exit_2(code, err, needle="no decodable sample"):
    lines = [line for line in err.strip().splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_train_side_commands(tmp_path, capsys):
    shards = junk_set(tmp_path / "junk")
    sets = [x for s in TINY for x in ("--set", s)]
    ckpt = tmp_path / "pt.pth"
    torch.save(build_pretrain_model(model_settings(load_config(None, TINY))).state_dict(), ckpt)
    out = tmp_path / "emb.parquet"
    code = train_cli.main(["embed", "--shards", str(shards), "--checkpoint", str(ckpt), "--out", str(out),
                           "--no-progress"] + sets)
    one_line_exit_2(code, capsys.readouterr().err)
    assert not out.exists() and not list(tmp_path.glob(".emb.parquet*"))
    code = train_cli.main(["pretrain", "--shards", str(tmp_path / "junk"), "--out", str(tmp_path / "run")] + sets)
    one_line_exit_2(code, capsys.readouterr().err)


def test_prep_side_commands(tmp_path, capsys, local_ray):
    shards = str(junk_set(tmp_path / "junk"))
    for argv in (["stats", shards, "--out", str(tmp_path / "stats"), "--no-progress"],
                 ["inspect", shards, "--random", "2", "--out", str(tmp_path / "look.png")],
                 ["verify", shards]):
        code = prep_cli.main(argv)
        one_line_exit_2(code, capsys.readouterr().err)
    assert not (tmp_path / "stats" / "stats.json").exists() and not (tmp_path / "look.png").exists()
