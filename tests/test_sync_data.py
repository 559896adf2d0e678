"""CAV-MAE Sync data: frame-aligned audio segments cut at load time (the released rule, recorded in
tests/data/cavmae_sync_ref.npz), the examples and batches they make, and a tiny pretraining run of the sync
variant on real shards."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import COLORS, TINY, color_frames, label_index_csv, write_synthetic_shards  # noqa: E402

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.augment import device_augment  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.loaders import eval_loader  # noqa: E402
from cavmae.train.segments import cut_segments, frame_centres, segment_bounds  # noqa: E402
from cavmae.train.transform import Transform  # noqa: E402

REF = np.load(Path(__file__).parent / "data" / "cavmae_sync_ref.npz", allow_pickle=False)
NO_AUG = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}


def test_segment_bounds_are_the_released_loader_s():
    rows = REF["segments"]
    assert len(rows) == 16 + 10 + 4 + 16 + 5
    for t, s, n, i, start, end in rows.tolist():
        (centre,) = frame_centres([i], t, s, "index")
        assert segment_bounds(centre, n, s) == (start, end), (t, s, n, i)


def test_time_centres_and_cuts():
    assert frame_centres([0, 2], 4, 1000, "time", [3.5, 4.0, 7.25], clip_start_s=3.0, rows_per_s=100) == [50, 425]
    with pytest.raises(ValueError, match="frame_times_s"):
        frame_centres([3], 4, 1000, "time", [0.0, 1.0])
    fbank = torch.arange(10.0).repeat_interleave(2).view(10, 2)  # row r holds r
    cut = cut_segments(fbank, [0, 6, 12], rows=4, total=12)  # 12 rows: 10 real, 2 of padding
    assert cut[:, :, 0].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert cut_segments(fbank, [5], rows=16, total=12)[0, :, 0].tolist() == list(range(10)) + [0] * 6


def transform(frame, centre="index"):
    data = {**load_config(None).data.to_dict(), "target_length": 128, "image_size": 64, "num_mel_bins": 128,
            "segment": {"rows": 32, "centre": centre, "rows_per_s": 100.0}}
    return Transform(data, NO_AUG, frame=frame, num_frames=4, num_classes=0, label_map=None, label_file=None,
                     seed=0)


def test_examples_pair_each_frame_with_its_segment(tmp_path):
    urls = [str(p) for p in write_synthetic_shards(tmp_path, 6, 6)]
    (full,) = eval_loader(urls, transform("all"), batch_size=6, num_workers=0)
    assert full["audio"].shape == (6, 4, 32, 128) and full["image"].shape == (6, 4, 3, 64, 64)
    for frame in range(4):  # frame i of 4 in 128 rows: centred on row 32 i
        (one,) = eval_loader(urls, transform(frame), batch_size=6, num_workers=0)
        assert one["audio"].shape == (6, 32, 128)
        assert torch.equal(one["audio"], full["audio"][:, frame]) and torch.equal(one["image"], full["image"][:, frame])
    start, end = segment_bounds(64, 32, 128)
    (mid,) = eval_loader(urls, transform(2), batch_size=6, num_workers=0)
    (whole,) = eval_loader(urls, Transform({**transform(2).data, "segment": None}, NO_AUG, frame=2, num_frames=4,
                                           num_classes=0, label_map=None, label_file=None, seed=0),
                           batch_size=6, num_workers=0)
    assert whole["audio"].shape == (6, 128, 128) and torch.equal(mid["audio"], whole["audio"][:, start:end])
    finished = device_augment(full)
    torch.testing.assert_close(finished["audio"], (full["audio"].float() + 5.081) / 4.4849)


def test_sync_pretraining_then_retrieval_embed_finetuning_and_eval(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "shards", 16, 16)
    sets = [a for s in TINY + ["model.variant=sync", "model.audio_length=64", "model.num_register_tokens=2",
                               "model.global_local_losses=true", "pretrain.batch_size=4", "pretrain.epochs=2",
                               "pretrain.noise=false"] for a in ("--set", s)]
    assert main(["pretrain", "--shards", str(tmp_path / "shards"), "--val-shards", str(tmp_path / "shards"),
                 "--out", str(tmp_path / "run"), *sets]) == 0
    epochs = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch" and r["val_loss"] > 0] == [1, 2]  # middle frames
    sd = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    assert sd["module.register_tokens"].shape == (4, 64) and sd["module.cls_token_a"].shape == (1, 1, 64)
    assert sd["module.pos_embed_a"].shape == (1, 8 * 4, 64)  # 64-row segments: 8 x 4 patches
    first = torch.load(tmp_path / "run" / "model.1.pth", weights_only=True)
    assert not torch.equal(first["module.cls_token_a"], sd["module.cls_token_a"])  # trained

    capsys.readouterr()
    retrieve = ["retrieve", "--shards", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "run" / "model.pth"),
                *sets]
    for strategy in ("mean", "diagonal_max"):
        assert main([*retrieve, "--strategy", strategy]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["samples"] == 16 and result["strategy"] == strategy
        assert 1 <= result["audio_to_video"]["MR"] <= 16 and 0 <= result["video_to_audio"]["R@1"] <= 1
    assert main([*retrieve, "--strategy", "max", "--local"]) == 0
    assert json.loads(capsys.readouterr().out)["strategy"] == "max"
    assert main([*retrieve]) == 0  # the middle frame's pair, pooled, as CAV-MAE retrieval
    assert "strategy" not in json.loads(capsys.readouterr().out)
    assert main([*retrieve, "--strategy", "max", "--frames", "3"]) == 2
    assert "--strategy compares every frame" in capsys.readouterr().err
    parquet = tmp_path / "emb.parquet"
    assert main(["embed", "--shards", str(tmp_path / "shards"), "--checkpoint", str(tmp_path / "run" / "model.pth"),
                 "--out", str(parquet), "--per-frame", "--no-progress", *sets]) == 0
    table = pq.read_table(parquet).to_pylist()
    assert len(table) == 16 and all(len(r["audio"]) == len(r["visual"]) == 4 for r in table)  # 4 frames each
    assert len(table[0]["audio"][0]) == 64 and table[0]["audio"][0] != table[0]["audio"][3]  # own segments
    capsys.readouterr()

    # finetuning (our reading: one random frame pair per sample) and eval over every frame's pair
    labels = label_index_csv(tmp_path / "labels.csv")
    ft = [*sets, "--set", "model.sync_pool=both", "--set", "finetune.batch_size=4", "--set", "finetune.epochs=2",
          "--set", "finetune.wa_start=1", "--set", "finetune.wa_end=2"]
    assert main(["finetune", "--shards", str(tmp_path / "shards"), "--labels", str(labels), "--init",
                 str(tmp_path / "run" / "model.pth"), "--out", str(tmp_path / "ft"), *ft]) == 0
    assert "loaded" in capsys.readouterr().out
    assert main(["eval", "--shards", str(tmp_path / "shards"), "--labels", str(labels), "--checkpoint",
                 str(tmp_path / "ft" / "model.pth"), "--frames", "all", *ft]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 16 and len(result["mAP_per_frame"]) == 4 and 0 < result["mAP"] <= 1
    assert main(["finetune", "--shards", str(tmp_path / "shards"), "--labels", str(labels), "--out",
                 str(tmp_path / "ft2"), "--mode", "audioonly-lean", *ft]) == 2
    assert "no audio-only model" in capsys.readouterr().err


SYNC_RUN = TINY + ["model.variant=sync", "model.audio_length=64", "model.num_register_tokens=2",
                   "pretrain.batch_size=4", "pretrain.epochs=2", "pretrain.lr=1.0e-3", "pretrain.mixup=0.5",
                   "pretrain.freqm=8", "pretrain.timem=16", "pretrain.noise=true"]


def test_sync_stop_and_resume_is_bit_identical(tmp_path):
    """As CAV-MAE pretraining (tests/test_epochs.py): random frames, their segments, mixup, SpecAugment and noise
    included, a run stopped mid-epoch and resumed ends with the uninterrupted run's weights."""
    write_synthetic_shards(tmp_path / "shards", 9, 4)

    def pretrain(out, *extra):
        return main(["pretrain", "--shards", str(tmp_path / "shards"), "--out", str(out),
                     *[a for s in SYNC_RUN for a in ("--set", s)], *extra])

    assert pretrain(tmp_path / "whole") == 0
    assert pretrain(tmp_path / "run", "--stop-after-steps", "1") == 0
    assert pretrain(tmp_path / "run", "--resume", "--stop-after-steps", "2") == 0
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3
    assert pretrain(tmp_path / "run", "--resume") == 0
    whole = torch.load(tmp_path / "whole" / "model.pth", weights_only=True)
    resumed = torch.load(tmp_path / "run" / "model.pth", weights_only=True)
    assert "module.register_tokens" in whole and whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_time_centres_follow_the_frames_times_in_the_clip():
    """data.segment_centre time: frames decoded unevenly (a clip shorter than its frames, the last one repeated)
    take the segment around their own time, less the clip's start in the file."""
    fbank = np.tile(np.arange(128, dtype=np.float16)[:, None], (1, 128))  # row r holds r
    frames = [color_frames(COLORS[0], 64, 1, random.Random(0))[0]] * 4
    meta = {"frame_times_s": [5.0, 5.25, 5.5, 5.5], "clip_start_s": 5.0}
    sample = {"key": "k", "url": "u", "fbank": fbank, "frames": frames, "meta": meta, "flac": None, "labels": []}
    tf = transform("all", centre="time")
    rows = tf.example(sample, None, np.random.default_rng(0))["audio"][:, :, 0]
    assert [int(r[0]) for r in rows] == [0, 9, 34, 34]  # centres 0, 25, 50, 50 rows: 32-row segments from c - 16
    assert [int(r[0]) for r in transform("all").example(sample, None, np.random.default_rng(0))["audio"][:, :, 0]] \
        == [0, 16, 48, 80]  # index: rows 0, 32, 64, 96
    with pytest.raises(ValueError, match="frame_times_s"):
        tf.example({**sample, "meta": {}}, None, np.random.default_rng(0))


def test_predict_scores_every_frame_pair_of_raw_videos(train_shards, tmp_path, capsys):
    """`cavmae predict` on raw videos with a Sync classifier: the run's config.yaml carries the variant, the videos
    are decoded as ingest would (frame_times_s included) and every frame's pair is scored."""
    from cavmae.cli import main as cavmae

    root, labels = train_shards, train_shards / "labels.csv"
    sets = [a for s in TINY + ["model.variant=sync", "model.audio_length=64", "model.num_register_tokens=2",
                               "model.sync_pool=global", "data.segment_centre=time", "finetune.batch_size=8",
                               "finetune.epochs=1", "finetune.wa=false"] for a in ("--set", s)]
    assert main(["finetune", "--shards", str(root / "val"), "--labels", str(labels), "--out", str(tmp_path / "ft"),
                 *sets]) == 0
    videos = sorted((root / "inputs" / "val").glob("*.mp4"))[:3]
    capsys.readouterr()
    assert cavmae(["predict", *map(str, videos), "--checkpoint", str(tmp_path / "ft" / "model.pth"),
                   "--labels", str(labels), "--prep-config", str(root / "val" / "pipeline.yaml"),
                   "--out", str(tmp_path / "p.json")]) == 0
    results = json.loads((tmp_path / "p.json").read_text())
    assert [r["source"] for r in results] == list(map(str, videos))
    for r in results:  # sigmoid scores (finetune.metric mAP), best first
        scores = [t["score"] for t in r["top"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True) and all(0 < x < 1 for x in scores)
