"""End-to-end training runs on CPU with the tiny model: pretraining, resume, official-layout init, finetuning,
evaluation, retrieval and the CLI's one-line errors."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY, write_synthetic_shards  # noqa: E402

import cavmae.train.loop  # noqa: E402
import cavmae.train.pretrain  # noqa: E402
from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.model import build_pretrain_model  # noqa: E402
from cavmae.train.stage import model_settings  # noqa: E402


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def records(run, kind="train"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture
def data(train_shards):
    return train_shards, train_shards / "labels.csv"


PT = ("pretrain.batch_size=8", "pretrain.epoch_samples=64", "pretrain.lr=1.0e-3")


def test_pretraining_loss_falls(data, tmp_path):
    root, _ = data
    rc = main(["pretrain", "--shards", str(root / "train"), "--val-shards", str(root / "val"), "--out",
               str(tmp_path), *sets(*PT, "pretrain.epochs=3")])
    assert rc == 0
    train_rows = records(tmp_path)
    assert len(train_rows) == 24 and train_rows[-1]["step"] == 24
    assert train_rows[-1]["loss"] < 0.85 * train_rows[0]["loss"]  # epoch-3 mean vs the first batch
    val = records(tmp_path, "epoch")
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    events = EventAccumulator(str(tmp_path)).Reload()  # TensorBoard scalars beside metrics.jsonl, same values
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train_rows])
    assert [e.step for e in events.Scalars("epoch/val_loss")] == [8, 16, 24]
    sd = torch.load(tmp_path / "model.pth", weights_only=True)
    assert all(k.startswith("module.") for k in sd)


def test_resume_mid_epoch_keeps_step_count_and_optimizer_state(data, tmp_path, monkeypatch):
    root, _ = data
    args = ["pretrain", "--shards", str(root / "train"), "--out", str(tmp_path),
            *sets(*PT, "pretrain.epochs=2", "pretrain.save_every=3")]
    real_save = cavmae.train.loop.save_state

    def save_then_crash(path, state, order):
        real_save(path, state, order)
        if state.step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(cavmae.train.loop, "save_state", save_then_crash)
    assert main(args) == 130
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batches_done"]) == (6, 0, 6)
    monkeypatch.setattr(cavmae.train.loop, "save_state", real_save)

    loaded = {}
    real_train = cavmae.train.loop.train

    def spy(**kw):
        out = real_train(**kw)
        loaded["optimizer"] = kw["optimizer"].state_dict()
        return out

    monkeypatch.setattr("cavmae.train.pretrain.train", spy)
    assert main(args + ["--resume"]) == 0
    steps = [r["step"] for r in records(tmp_path)]
    assert steps == list(range(1, 17))  # 1..6 before the crash, 7..16 after: nothing repeated or lost
    final = torch.load(tmp_path / "last.pt", weights_only=True)
    assert final["step"] == 16 and final["scheduler"]["last_epoch"] == 16
    adam_steps = {float(s["step"]) for s in final["optimizer"]["state"].values()}
    assert adam_steps == {16.0}  # the Adam moments carried on from step 6, not restarted
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {6.0}


def test_nonfinite_loss_skips_the_step_and_a_persistent_one_stops(tmp_path, monkeypatch, capsys):
    write_synthetic_shards(tmp_path / "shards", 32, 16)
    real_step_fn, calls, poisoned = cavmae.train.pretrain.step_fn, [], set()

    def step_fn(contrast):
        inner = real_step_fn(contrast)

        def step(model, batch):
            loss, metrics = inner(model, batch)
            calls.append(len(calls) + 1)
            return (loss * float("nan"), metrics) if calls[-1] in poisoned else (loss, metrics)
        return step

    monkeypatch.setattr(cavmae.train.pretrain, "step_fn", step_fn)
    args = ["pretrain", "--shards", str(tmp_path / "shards"), *sets("pretrain.batch_size=4", "pretrain.epochs=1")]
    poisoned.update({3})
    assert main([*args, "--out", str(tmp_path / "once")]) == 0
    rows = records(tmp_path / "once")
    assert [r["nonfinite"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert len(calls) == 8 and all(r["loss"] == r["loss"] for r in rows[:2])
    weights = torch.load(tmp_path / "once" / "model.pth", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())  # the NaN step was skipped, not applied

    calls.clear()
    poisoned.clear()
    poisoned.update(range(2, 100))
    monkeypatch.setattr(cavmae.train.loop, "NONFINITE_PATIENCE", 3)
    assert main([*args, "--out", str(tmp_path / "always")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert errors == ["cavmae-train: error: the loss was not finite for 3 optimizer steps in a row "
                   "(by step 4, epoch 1); 3 steps skipped in all"]
    assert len(calls) == 4  # stopped at the first record after the third NaN step, not at the end of the epoch


def test_a_run_shorter_than_log_every_logs_its_last_step(tmp_path):
    """2 steps at log_every 20 (the default): each epoch's last step is a record with its loss, as is a stop."""
    write_synthetic_shards(tmp_path / "shards", 16, 16)
    args = ["pretrain", "--shards", str(tmp_path / "shards"), *sets("pretrain.batch_size=8", "pretrain.epochs=2",
                                                                    "pretrain.log_every=20")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    assert [(r["step"], r["epoch"]) for r in records(tmp_path / "run")] == [(2, 1), (4, 2)]
    assert all(r["loss"] > 0 for r in records(tmp_path / "run"))
    assert main([*args, "--out", str(tmp_path / "stop"), "--stop-after-steps", "1"]) == 0
    assert [r["step"] for r in records(tmp_path / "stop")] == [1]


def test_cpu_threads_leave_room_for_the_loader_workers(tmp_path, monkeypatch):
    """On a CPU, torch's threads are the process's share of the cores beside its loader workers (one per core
    beside them made a tiny step 10-40x slower); OMP_NUM_THREADS, when set, is left alone."""
    import os

    cores, before = len(os.sched_getaffinity(0)), torch.get_num_threads()
    write_synthetic_shards(tmp_path / "shards", 8, 8)
    args = ["pretrain", "--shards", str(tmp_path / "shards"), *sets("data.num_workers=1", "pretrain.batch_size=8",
                                                                    "pretrain.epochs=1")]
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", str(cores))
        torch.set_num_threads(cores)
        assert main([*args, "--out", str(tmp_path / "set")]) == 0 and torch.get_num_threads() == cores
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert main([*args, "--out", str(tmp_path / "run")]) == 0
        assert torch.get_num_threads() == max(1, cores // 2)
    finally:
        torch.set_num_threads(before)


def test_finetune_from_official_layout_checkpoint(data, tmp_path):
    root, labels = data
    cfg = load_config(None, TINY)
    model = build_pretrain_model(model_settings(cfg))
    official = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(official, tmp_path / "official.pth")
    rc = main(["finetune", "--shards", str(root / "train"), "--labels", str(labels), "--init",
               str(tmp_path / "official.pth"), "--out", str(tmp_path / "ft"),
               *sets("finetune.batch_size=8", "finetune.epoch_samples=16", "finetune.epochs=1", "finetune.lr=0.0",
                     "finetune.wa_start=1", "finetune.wa_end=1")])
    assert rc == 0
    out = torch.load(tmp_path / "ft" / "model.pth", weights_only=True)
    for key in ("module.blocks_a.0.attn.qkv.weight", "module.patch_embed_v.proj.weight", "module.norm_a.weight"):
        assert torch.equal(out[key], official[key])
    assert "module.mlp_head.1.weight" in out and "module.decoder_embed.weight" not in out


def test_finetune_beats_chance_then_eval_and_errors(data, tmp_path, capsys):
    root, labels = data
    ft = tmp_path / "ft"
    rc = main(["finetune", "--shards", str(root / "train"), "--val-shards", str(root / "val"), "--labels",
               str(labels), "--out", str(ft),
               *sets("finetune.batch_size=8", "finetune.epochs=4", "finetune.lr=1.0e-3", "finetune.head_lr_scale=10.0",
                     "finetune.loss=ce", "finetune.metric=acc", "finetune.wa_start=3", "finetune.wa_end=4",
                     "finetune.lr_start_epoch=3", "finetune.freqm=24", "finetune.timem=24")])
    assert rc == 0
    last = records(ft)[-1]
    assert last["mixup_waveform"] > 0 and "mixup_fbank" not in last  # exact mixup: ingest kept the .flac
    capsys.readouterr()
    rc = main(["eval", "--shards", str(root / "val"), "--labels", str(labels), "--checkpoint",
               str(ft / "model.pth"), "--frames", "all", "--out", str(tmp_path / "eval.json"),
               *sets("finetune.metric=acc")])
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == 32 and len(result["acc_per_frame"]) == 4
    assert result["acc"] >= 0.75  # chance is 0.25: the class needs both the pitch and the colour
    eval_args = ["eval", "--shards", str(root / "val"), "--checkpoint", str(ft / "model.pth"), *sets()]
    capsys.readouterr()
    assert main(eval_args + ["--set", "eval.frames=2"]) == 0  # an index through the config, not only --frames
    assert json.loads(capsys.readouterr().out)["frames"] == 2
    assert main(eval_args + ["--set", "eval.frames=last"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert "eval.frames must be all, middle or a frame index" in err and len(err.splitlines()) == 1

    bad = tmp_path / "bad_labels.csv"
    bad.write_text("index,mid,display_name\n0,/m/class0,a\n1,/m/class1,b\n")
    capsys.readouterr()
    assert main(["finetune", "--shards", str(root / "train"), "--labels", str(bad), "--out", str(tmp_path / "x"),
                 *sets()]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert len(err.splitlines()) == 1 and "/m/class" in err and str(bad) in err
    assert main(["pretrain", "--shards", str(tmp_path / "missing"), "--out", str(tmp_path / "y"), *sets()]) == 2
    assert "no shards found" in capsys.readouterr().err


def test_retrieval_after_contrastive_pretraining(train_shards, tmp_path):
    rc = main(["pretrain", "--shards", str(train_shards / "pairs"), "--out", str(tmp_path / "pt"),
               *sets("pretrain.batch_size=8", "pretrain.epochs=5", "pretrain.lr=2.0e-3", "model.mae_loss_weight=0.0",
                     "model.contrast_loss_weight=1.0", "model.bidirectional=true", "pretrain.noise=false")])
    assert rc == 0
    assert main(["retrieve", "--shards", str(train_shards / "query"), "--checkpoint",
                 str(tmp_path / "pt" / "model.pth"), "--out", str(tmp_path / "r.json"), *sets()]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["samples"] == 8
    for direction in ("video_to_audio", "audio_to_video"):
        assert result[direction]["R@1"] >= 0.5  # chance is 1/8
