"""Training takes the sample-side settings from the shards' frozen pipeline.yaml (`shards.frozen`): the model's
geometry and waveform mixup follow the data; a run's contrary setting, or shard sets made differently, stop with one
line naming both values."""

import logging
import shutil

import pytest
import yaml

from cavmae.shards.config import load_config
from cavmae.shards.frozen import FROZEN_CONFIG, SAMPLE_FACTS, adopt_shard_settings
from cavmae.shards.manifest import manifest_rows
from cavmae.shards.reader import list_shards
from cavmae.train import stage as st
from cavmae.train.cli import main
from tests.train_fixtures import write_synthetic_shards

# the run's explicit settings: the tiny model and loop, and nothing about the samples
RUN = ["model.size=tiny", "model.target_length=128", "data.num_workers=0", "pretrain.batch_size=8",
       "pretrain.epochs=1"]
OTHER = {"audio.sample_rate": 8000, "audio.num_mel_bins": 64, "audio.frame_shift_ms": 12.5,
         "audio.frame_length_ms": 20.0, "audio.window_type": "hamming", "video.num_frames": 3,
         "video.image_size": 96, "clip.length_s": 5.0}


def sets(*items):
    return [a for s in RUN + list(items) for a in ("--set", s)]


def frozen_value(folder, dotted):
    section, key = dotted.split(".")
    return yaml.safe_load((folder / FROZEN_CONFIG).read_text())[section][key]


def copy_with(src, dst, dotted, value):
    """A copy of the shard folder `src` whose frozen pipeline.yaml says `dotted: value`."""
    shutil.copytree(src, dst)
    data = yaml.safe_load((dst / FROZEN_CONFIG).read_text())
    section, key = dotted.split(".")
    data[section][key] = value
    (dst / FROZEN_CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))
    return dst


def test_every_fact_has_a_contrary_value():
    assert set(OTHER) == set(SAMPLE_FACTS)


def test_a_run_takes_the_shards_settings(train_shards, tmp_path):
    shards = train_shards / "train"
    assert (frozen_value(shards, "video.image_size"), frozen_value(shards, "video.num_frames")) == (64, 4)
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path), "--stop-after-steps", "1",
                 *sets()]) == 0
    used = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for dotted in SAMPLE_FACTS:
        section, key = dotted.split(".")
        if dotted != "clip.length_s":
            assert used[section][key] == frozen_value(shards, dotted), dotted
    # the 1.3 s inputs were cut at their end, not at the frozen 10 s: the clip is what the samples hold
    longest = max(r["duration_s"] for r in manifest_rows(list_shards(str(shards))))
    assert frozen_value(shards, "clip.length_s") == 10.0 and used["clip"]["length_s"] == longest < 2


@pytest.mark.parametrize("dotted", SAMPLE_FACTS)
def test_a_contrary_setting_is_refused_naming_both_values(train_shards, tmp_path, capsys, dotted):
    shards = train_shards / "train"
    assert main(["pretrain", "--shards", str(shards), "--out", str(tmp_path / "run"),
                 *sets(f"{dotted}={OTHER[dotted]}")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"'{dotted}' is {OTHER[dotted]!r} in this run but {frozen_value(shards, dotted)!r}" in err
    assert str(shards / FROZEN_CONFIG) in err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_the_same_value_set_explicitly_is_fine(train_shards):
    urls = list_shards(str(train_shards / "train"))
    cfg = adopt_shard_settings(load_config(None, ["video.image_size=64"]), urls)
    assert cfg.video.image_size == 64


@pytest.mark.parametrize("dotted", ["audio.frame_shift_ms", "video.image_size"])
def test_mixed_shard_sets_are_refused(train_shards, tmp_path, capsys, dotted):
    a = train_shards / "val"
    b = copy_with(a, tmp_path / "other", dotted, OTHER[dotted])
    assert main(["eval", "--shards", f"{a}::{b}", "--checkpoint", str(tmp_path / "absent.pth"), *sets()]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes shard sets made with different settings" in err and f"'{dotted}'" in err
    assert str(a / FROZEN_CONFIG) in err and str(b / FROZEN_CONFIG) in err
    assert repr(frozen_value(a, dotted)) in err and repr(OTHER[dotted]) in err


def test_validation_shards_made_differently_are_refused(train_shards, tmp_path, capsys):
    other = copy_with(train_shards / "val", tmp_path / "val64", "audio.num_mel_bins", 64)
    assert main(["pretrain", "--shards", str(train_shards / "train"), "--val-shards", str(other),
                 "--out", str(tmp_path / "run"), *sets()]) == 2
    err = capsys.readouterr().err
    assert "--shards and --val-shards mixes" in err and "'audio.num_mel_bins' is 128" in err and "64" in err


def test_waveform_mixup_uses_the_shards_fbank_settings(train_shards, tmp_path):
    """The transform recomputes mixed fbanks with the audio settings the shards were made with, not the run's."""
    folder = copy_with(train_shards / "val", tmp_path / "shift", "audio.frame_shift_ms", 12.5)
    cfg = adopt_shard_settings(load_config(None, RUN), list_shards(str(folder)))
    tf = st.transform(cfg, {"freqm": 0, "timem": 0, "mixup": 1.0, "noise": False, "label_smooth": 0.0},
                      frame="middle")
    assert load_config(None).audio.frame_shift_ms == 10.0 and tf.audio["frame_shift_ms"] == 12.5


def test_shards_without_a_frozen_config_keep_the_runs_settings(tmp_path, caplog):
    urls = [str(p) for p in write_synthetic_shards(tmp_path / "bare", 4, 4)]
    cfg = load_config(None, ["video.image_size=64"])
    with caplog.at_level(logging.WARNING):
        assert adopt_shard_settings(cfg, urls).video.image_size == 64
    assert f"no {FROZEN_CONFIG} beside the shards" in caplog.text
