"""Other clip lengths: a model pretrained at the official 1024 rows finetunes and evaluates on 5 s audio at
target_length 512 (ESC-50's length, cav-mae #27), the position tables rebuilt for the shorter grid."""

import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY, label_index_csv, write_synthetic_shards  # noqa: E402

from cavmae.train.cli import main  # noqa: E402
from cavmae.train.pos_embed import get_2d_sincos_pos_embed  # noqa: E402


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def test_pretrained_at_1024_rows_finetunes_and_evaluates_at_512(tmp_path, caplog):
    shards, labels = tmp_path / "shards", label_index_csv(tmp_path / "labels.csv")
    write_synthetic_shards(shards, 16, 8, seconds=5.0)  # 5 s of audio: 498 fbank rows
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path / "pt"),
                 *sets("model.target_length=1024", "pretrain.batch_size=8", "pretrain.epoch_samples=16",
                       "pretrain.epochs=1")]) == 0
    pretrained = torch.load(tmp_path / "pt" / "model.pth", weights_only=True)
    assert pretrained["module.pos_embed_a"].shape == (1, 8 * 64, 64)

    ft = tmp_path / "ft"
    at_512 = sets("model.target_length=512", "finetune.batch_size=8", "finetune.epoch_samples=16",
                  "finetune.epochs=2", "finetune.lr=1.0e-3", "finetune.wa_start=1", "finetune.wa_end=2",
                  "finetune.mixup=0.0")
    assert main(["finetune", "--shards", str(shards), "--labels", str(labels), "--init",
                 str(tmp_path / "pt" / "model.pth"), "--mode", "audioonly", "--out", str(ft), *at_512]) == 0
    rows = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    out = torch.load(ft / "model.pth", weights_only=True)
    assert out["module.pos_embed_a"].shape == (1, 8 * 32, 64)
    assert torch.equal(out["module.patch_embed_v.proj.weight"], pretrained["module.patch_embed_v.proj.weight"])
    # trainable in finetuning (tr_pos), so trained from the rebuilt sin-cos table, not from a cut of the old one
    fixed = get_2d_sincos_pos_embed(64, 8, 32)
    assert (out["module.pos_embed_a"][0] - fixed).abs().max() < 0.1

    assert main(["eval", "--shards", str(shards), "--labels", str(labels), "--checkpoint", str(ft / "model.pth"),
                 "--mode", "audioonly", "--out", str(tmp_path / "eval.json"),
                 *sets("model.target_length=512")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == 16
    # back at 1024: a trained table is stretched
    with caplog.at_level(logging.WARNING, logger="cavmae.train.checkpoint"):
        assert main(["eval", "--shards", str(shards), "--labels", str(labels), "--checkpoint",
                     str(ft / "model.pth"), "--mode", "audioonly", *sets("model.target_length=1024")]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "cavmae.train.checkpoint"] == [
        "pos_embed_a: trained position table fitted from grid 8x32 to 8x64 (centre cut / bilinear, as AST)"]


def test_esc50_list_to_finetuned_model_at_512_rows(local_ray, tmp_path):
    """ESC-50 from its own list (5 s audio-only .wav, folds as splits) to a model finetuned with the esc50-audioonly
    preset (target_length 512, 50 classes from the samples' targets) from a 1024-row checkpoint in the official
    layout, then evaluated on the held-out fold: no glue beyond the commands."""
    from cavmae.preprocess.datasets import ListOptions
    from cavmae.preprocess.ingest import ingest
    from cavmae.shards.config import load_config
    from cavmae.train.checkpoint import official_state_dict
    from cavmae.train.model import CAVMAE
    from tests.clips import make_clip

    root = tmp_path / "ESC-50-master"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for i in range(10):
        target = 3 * (i % 2)  # two classes, by pitch
        make_clip(root / "audio", f"{i % 2 + 1}-{i}-A-{target}", seconds=5.0, video=False, container="wav",
                  acodec="pcm_s16le", channels=1, sample_rate=44100, tone_hz=400.0 + 1200.0 * (i % 2) + 7 * i)
        rows.append(f"{i % 2 + 1}-{i}-A-{target}.wav,{1 if i < 8 else 2},{target},class{target},False,{i},A")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(sets=["video.allow_missing=true", "video.num_frames=4", "video.image_size=64"])
    for folds, out in ((("1",), "train"), (("2",), "fold2")):
        summary = ingest([str(root / "meta" / "esc50.csv")], tmp_path / out, cfg, lists=ListOptions(split=folds))
        assert summary.ok == (8 if out == "train" else 2) and not summary.problems
    torch.save(official_state_dict(CAVMAE(size="tiny", target_length=1024, image_size=64)), tmp_path / "pt.pth")

    esc = ["--preset", "esc50-audioonly", *sets("finetune.batch_size=4", "finetune.epochs=2", "finetune.lr=1.0e-3"),
           "--set", "model.target_length=512"]
    assert main(["finetune", "--shards", str(tmp_path / "train"), "--val-shards", str(tmp_path / "fold2"),
                 "--init", str(tmp_path / "pt.pth"), "--out", str(tmp_path / "ft"), *esc]) == 0
    out = torch.load(tmp_path / "ft" / "model.pth", weights_only=True)
    assert out["module.mlp_head.1.weight"].shape == (50, 64) and out["module.pos_embed_a"].shape == (1, 8 * 32, 64)
    epochs = [r for r in map(json.loads, (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["skipped"] == 0 and "val_acc" in epochs[-1]
    assert main(["eval", "--shards", str(tmp_path / "fold2"), "--checkpoint", str(tmp_path / "ft" / "model.pth"),
                 "--out", str(tmp_path / "eval.json"), *esc]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["samples"] == 2


def frozen(folder: Path, *settings: str) -> None:
    """The pipeline.yaml ingest would freeze beside `folder`'s shards, made with `settings`."""
    from cavmae.shards.config import load_config
    from cavmae.shards.frozen import FROZEN_CONFIG, SAMPLE_SECTIONS

    cfg = load_config(sets=["video.num_frames=4", "video.image_size=64", *settings])
    (folder / FROZEN_CONFIG).write_text(cfg.to_yaml(*SAMPLE_SECTIONS))


UNSET = [s for s in TINY if not s.startswith("model.target_length")]  # the model's audio length left to follow


def test_the_model_follows_the_shards_clip(tmp_path):
    """3 s shards (clip.length_s 3 in their pipeline.yaml): the model is 320 rows long (3 s in whole patches), not
    the default clip's 1024 (70 % padding), and config.yaml records the shards' clip."""
    import yaml

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 8, 8, seconds=3.0)
    frozen(shards, "clip.length_s=3")
    args = [a for s in UNSET + ["pretrain.batch_size=8", "pretrain.epochs=1"] for a in ("--set", s)]
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path / "pt"), *args]) == 0
    used = yaml.safe_load((tmp_path / "pt" / "config.yaml").read_text())
    assert used["clip"]["length_s"] == 3.0 and used["model"]["target_length"] == 320
    assert torch.load(tmp_path / "pt" / "model.pth", weights_only=True)["module.pos_embed_a"].shape == (1, 8 * 20, 64)


def test_short_inputs_set_the_clip_and_the_cut_warning_counts_their_rows(tmp_path, caplog):
    """ESC-50's 5 s files ingested at the default 10 s clip are 498-row samples: the esc50 preset's 512 rows cut
    nothing (no warning), the unset length follows them (512), and a set length that cuts them says how much of
    the 5 s."""
    from cavmae.shards.config import load_config
    from cavmae.train import stage as st

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 4, 4, seconds=5.0)  # manifest duration_s 5.0
    frozen(shards)                                      # clip.length_s 10 (the default)
    esc = load_config(sets=UNSET, presets=["esc50-audioonly"])
    with caplog.at_level(logging.WARNING, logger="cavmae.train.stage"):
        cfg, _, _ = st.shard_sets(esc, str(shards))
        st.warn_audio_cut(cfg)
        assert cfg.clip.length_s == 5.0 and cfg.model.target_length == 512
        assert "are cut" not in caplog.text
        assert st.shard_sets(load_config(sets=UNSET), str(shards))[0].model.target_length == 512
        st.warn_audio_cut(st.shard_sets(load_config(sets=TINY + ["model.target_length=256"]), str(shards))[0])
    cut = [r.getMessage() for r in caplog.records if "are cut" in r.getMessage()]
    assert len(cut) == 1 and "keeps the first 2.56 s of every 5 s clip" in cut[0] and "2.42 s (242 rows)" in cut[0]
