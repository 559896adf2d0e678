"""Missing modalities end to end: a Kinetics-style list whose clips partly have no audio track (cav-mae #5) is
ingested from its list, finetunes in `videoonly` with every sample, is skipped and counted where audio is needed
(pretraining, audio modes) unless `data.missing_modality: fill`, and stats, inspect, embed and predict handle it."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY  # noqa: E402

from cavmae.predict import predict_videos  # noqa: E402
from cavmae.preprocess.datasets import ListOptions  # noqa: E402
from cavmae.preprocess.ingest import ingest  # noqa: E402
from cavmae.preprocess.inspect_shards import inspect  # noqa: E402
from cavmae.preprocess.stats import merge, shard_sums  # noqa: E402
from cavmae.shards.config import load_config  # noqa: E402
from cavmae.shards.reader import decode_sample, list_shards, raw_samples  # noqa: E402
from cavmae.shards.validate import SampleSpec  # noqa: E402
from cavmae.train.augment import device_augment  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.transform import FILL, MissingModality, Transform  # noqa: E402
from tests.clips import make_clip  # noqa: E402

CLASSES = {"abseiling": "0xdc2828", "juggling": "0x283cdc"}
N, SILENT = 12, {1, 4, 7, 10}  # clip i has no audio track when i is in SILENT


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


@pytest.fixture(scope="module")
def kinetics(local_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(N):
        label = list(CLASSES)[i % 2]
        make_clip(root / "videos", f"vid{i:08d}", seconds=2.0, size=(80, 64), fps=10, channels=1,
                  sample_rate=16000, color=CLASSES[label], tone_hz=300.0 + 200 * i, audio=i not in SILENT)
        rows.append(f"{label},vid{i:08d},5,7,train")  # the files are the cut 2 s segments
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.csv").write_text("index,mid,display_name\n0,/k/0,abseiling\n1,/k/1,juggling\n")
    cfg = load_config(sets=["video.num_frames=4", "video.image_size=64", "audio.allow_missing=true",
                            "shards.samples_per_shard=6"])
    summary = ingest([str(root / "train.csv")], root / "shards", cfg, label_index_csv=str(root / "labels.csv"),
                     lists=ListOptions(videos_dir=str(root / "videos")))
    assert summary.ok == N and not summary.problems
    return root


def epoch_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]


def test_samples_without_audio_read_everywhere(kinetics, tmp_path):
    shards = kinetics / "shards"
    samples = {s["meta"]["video_id"]: s for s in map(decode_sample, raw_samples(list_shards(str(shards))))}
    silent = {f"vid{i:08d}" for i in SILENT}
    assert {v for v, s in samples.items() if s["fbank"] is None} == silent
    assert all(s["meta"]["has_audio"] is False and len(s["frames"]) == 4 for v, s in samples.items() if v in silent)

    spec = SampleSpec(num_mel_bins=128, num_frames=4)
    stats = merge([shard_sums(u, 1024, spec) for u in list_shards(str(shards))], target_length=1024, batch_size=4)
    assert stats["samples"] == N and stats["missing"] == {"audio": 4, "video": 0} and stats["unreadable"] == 0
    assert stats["fbank"]["samples"] == N - 4 and stats["fbank"]["rows"] == (N - 4) * 198

    assert inspect(str(shards), str(tmp_path / "one.png"), load_config(), key="vid00000001") == 1
    assert (tmp_path / "one.png").stat().st_size > 0

    cfg = load_config(sets=TINY)
    data_cfg = {**cfg.data.to_dict(), "target_length": 128, "image_size": 64, "num_mel_bins": 128}
    tf = Transform(data_cfg, {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0},
                   frame="middle", num_frames=4, num_classes=0, label_map=None, label_file=None, seed=0)
    rng = np.random.default_rng(0)
    with pytest.raises(MissingModality, match="no audio, which this mode reads"):
        tf.example(samples["vid00000001"], None, rng)
    filled = Transform({**data_cfg, "missing_modality": "fill"}, tf.aug, frame="middle", num_frames=4,
                       num_classes=0, label_map=None, label_file=None, seed=0)
    example = filled.example(samples["vid00000001"], None, rng)
    assert example["has_audio"] is False and torch.equal(example["audio"], torch.full((128, 128), FILL))
    video_only = Transform(data_cfg, tf.aug, frame="middle", num_frames=4, num_classes=0, label_map=None,
                           label_file=None, seed=0, needs="v")
    assert video_only.example(samples["vid00000001"], None, rng)["has_video"]  # videoonly reads it as it is
    both = video_only.example(samples["vid00000000"], None, rng)
    assert both["has_audio"] and both["has_video"]
    no_frames = filled.example(samples["vid00000000"] | {"frames": []}, None, rng) | {"_skipped": 0}
    batch = device_augment(filled.collate([no_frames]))
    assert torch.allclose(batch["image"], torch.full_like(batch["image"], FILL), atol=0.01)  # official 0.01 image


def test_videoonly_finetunes_on_all_and_pretraining_skips_and_counts(kinetics, tmp_path):
    shards, labels = kinetics / "shards", kinetics / "labels.csv"
    ft = ["finetune.batch_size=4", "finetune.epochs=1", "finetune.wa=false", "finetune.lr=1.0e-3",
          "finetune.mixup=0.0"]
    assert main(["finetune", "--shards", str(shards), "--labels", str(labels), "--mode", "videoonly",
                 "--out", str(tmp_path / "video"), *sets(*ft)]) == 0
    assert epoch_records(tmp_path / "video")[-1]["skipped"] == 0
    assert main(["finetune", "--shards", str(shards), "--labels", str(labels), "--mode", "audioonly",
                 "--out", str(tmp_path / "audio"), *sets(*ft)]) == 0
    assert epoch_records(tmp_path / "audio")[-1]["skipped"] == 4

    pt = ["pretrain.batch_size=4", "pretrain.epochs=1"]
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path / "pt"), *sets(*pt)]) == 0
    assert epoch_records(tmp_path / "pt")[-1]["skipped"] == 4
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path / "pt_fill"),
                 *sets(*pt, "data.missing_modality=fill")]) == 0
    assert epoch_records(tmp_path / "pt_fill")[-1]["skipped"] == 0

    assert main(["embed", "--shards", str(shards), "--checkpoint", str(tmp_path / "pt" / "model.pth"),
                 "--out", str(tmp_path / "emb.parquet"), *sets()]) == 0
    rows = {r["video_id"]: r for r in pq.read_table(tmp_path / "emb.parquet").to_pylist()}
    assert len(rows) == N
    assert {v for v, r in rows.items() if r["audio"] is None} == {f"vid{i:08d}" for i in SILENT}
    assert all(len(r["visual"]) == 64 for r in rows.values())

    cfg = load_config(sets=TINY + ["audio.allow_missing=true"])
    video = str(kinetics / "videos" / "vid00000001.mp4")  # no audio track
    (got,) = predict_videos([video], cfg, str(tmp_path / "video" / "model.pth"), top_k=1, mode="videoonly",
                            frames="middle")
    assert got.video_id == "vid00000001" and len(got.top) == 1
    (failed,) = predict_videos([video], cfg, str(tmp_path / "video" / "model.pth"), top_k=1, mode="multimodal",
                               frames="middle")
    assert failed[0] == video and "cannot be scored in mode multimodal (no audio, which this mode reads" in failed[1]


def test_a_batch_of_skipped_samples_is_skipped_and_counted(kinetics, tmp_path):
    """Multimodal finetuning one sample per step: a step whose only sample has no audio is skipped and counted (it
    stopped the run, exit 2, "no decodable sample in a batch"); the other steps train."""
    ft = ["finetune.batch_size=1", "finetune.epochs=1", "finetune.wa=false", "finetune.mixup=0.0"]
    run = tmp_path / "mm"
    assert main(["finetune", "--shards", str(kinetics / "shards"), "--labels", str(kinetics / "labels.csv"),
                 "--mode", "multimodal", "--out", str(run), *sets(*ft)]) == 0
    assert epoch_records(run)[-1]["skipped"] == len(SILENT)
    rows = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, N + 1))  # every step logged, with a loss once one trained
    assert all("loss" in r for r in rows if r["skipped"] < r["step"])


def test_ddp_ranks_pass_over_a_micro_batch_of_skipped_samples(kinetics, tmp_path):
    """2 DDP processes, one sample per rank and step: a rank whose sample has no audio runs its (stand-in) batch
    with a loss of 0, so the all-reduce of every step still has both ranks; the run ends at the last step."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541", "-m",
           "cavmae.train", "pretrain", "--shards", str(kinetics / "shards"), "--out", str(tmp_path / "pt"),
           *sets("pretrain.batch_size=2", "pretrain.epochs=1")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(tmp_path / "pt" / "last.pt", weights_only=True)["step"] == N // 2
    assert 0 < epoch_records(tmp_path / "pt")[-1]["skipped"] <= len(SILENT)  # rank 0's count


def test_ray_data_reads_a_set_with_video_only_samples(kinetics):
    """Ray Data's read_webdataset reads a set whose samples lack a member with `decoder=None` (every member as
    bytes; its default decoder makes fbank.npy a tensor column, which a missing one cannot join: docs/formats.md)."""
    import io

    import ray.data

    rows = ray.data.read_webdataset(list_shards(str(kinetics / "shards")), decoder=None).take_all()
    assert len(rows) == N
    fbanks = {json.loads(r["json"])["video_id"]: r["fbank.npy"] for r in rows}
    silent = {f"vid{i:08d}" for i in SILENT}
    assert {v for v, b in fbanks.items() if not isinstance(b, bytes)} == silent  # missing: null
    shapes = {np.load(io.BytesIO(b), allow_pickle=False).shape for v, b in fbanks.items() if v not in silent}
    assert shapes == {(198, 128)}
