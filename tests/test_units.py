"""Settings in the units people think in: the model's audio length follows clip.length_s and audio.frame_shift_ms
unless set (then a cut of more than one patch is one warning saying how much), SpecAugment's time mask and the
noise roll scale with the frame shift, and the defaults stay the official numbers."""

import logging

import numpy as np
import pytest

from cavmae.shards.config import ConfigError, load_config
from cavmae.train import stage as st


@pytest.mark.parametrize("sets, rows", [
    ([], 1024),                                                       # official: 10 s of 10 ms rows
    (["audio.frame_shift_ms=5"], 2048),                               # the whole 10 s at 5 ms (1996 rows)
    (["clip.length_s=5"], 512),                                       # official ESC-50 style 5 s clips
    (["audio.frame_shift_ms=12.5"], 832),                             # 819.2 rounded up to whole patches
    (["clip.length_s=0.05"], 16),                                     # at least one patch
    (["audio.frame_shift_ms=5", "model.target_length=512"], 512),     # set: kept
    (["audio.frame_shift_ms=5", "model.target_length=null"], 2048),  # null: follows
])
def test_target_length_follows_the_clip_unless_set(sets, rows):
    cfg = load_config(sets=sets)
    assert cfg.model.target_length == rows
    assert ("model.target_length" in cfg.explicit) == any("target_length=5" in s for s in sets)


def test_target_length_follows_a_later_override_of_the_frame_shift():
    """`shards.frozen` adopts the shards' frame shift with `with_overrides`: the length follows it there too."""
    assert load_config().with_overrides(["audio.frame_shift_ms=5"]).model.target_length == 2048
    assert load_config(sets=["model.target_length=128"]).with_overrides(["audio.frame_shift_ms=5"]) \
        .model.target_length == 128


@pytest.mark.parametrize("sets, message", [
    (["audio.frame_shift_ms=0"], "'audio.frame_shift_ms' must be >= 1.0; got 0.0"),
    (["model.target_length=1000"], "'model.target_length' must be a multiple of 16 (one patch); got 1000"),
    (["clip.length_s=3600", "audio.frame_shift_ms=1"], "unset, so following other settings: "
                                                       "'model.target_length' must be <= 16384"),
])
def test_impossible_audio_lengths_are_refused_at_load(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_set_length_that_cuts_the_clip_is_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="cavmae.train.stage"):
        st.warn_audio_cut(load_config(sets=["audio.frame_shift_ms=5", "model.target_length=1024"]))
    (line,) = [r.getMessage() for r in caplog.records]
    assert "keeps the first 5.12 s of every 10 s clip" in line and "4.86 s (972 rows) are cut" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cavmae.train.stage"):
        st.warn_audio_cut(load_config(sets=["audio.frame_shift_ms=5"]))          # follows: nothing cut
        st.warn_audio_cut(load_config(sets=["model.target_length=992"]))        # 998 rows: 6 cut, < a patch
    assert caplog.records == []


def test_specaugment_and_roll_scale_with_the_frame_shift():
    aug = {"freqm": 48, "timem": 192, "mixup": 0.0, "noise": True, "label_smooth": 0.0}
    official = st.transform(load_config(), aug, frame=0)
    fine = st.transform(load_config(sets=["audio.frame_shift_ms=5"]), aug, frame=0)
    assert official.aug["timem"] == 192 and fine.aug["timem"] == 384 and fine.aug["freqm"] == 48
    assert official.data["target_length"] == 1024 and fine.data["target_length"] == 2048
    from cavmae.train.augment import draw_augmentation
    rng = np.random.default_rng(0)
    shifts = [draw_augmentation(fine.aug, fine.data["target_length"], 128, rng)["shift"] for _ in range(2000)]
    assert max(map(abs, shifts)) > 1024 and max(map(abs, shifts)) <= 2048  # the roll spans the same 10.24 s


def test_specaugment_masks_are_capped_to_the_official_share_of_the_input(caplog):
    """linear-probe's (the finetune defaults') freqm 48 / timem 192 on 64 mel bins and 3 s (320 rows) would hide up
    to 75 % of the input: capped to 3/8 of the bins and 3/16 of the rows; the official sizes keep the official
    widths, as does the esc50 preset's 96 rows of 512."""
    small = load_config(sets=["audio.num_mel_bins=64", "clip.length_s=3"], presets=["linear-probe"])
    aug = st.augmentation(small.finetune)
    assert (aug["freqm"], aug["timem"], small.model.target_length) == (48, 192, 320)
    with caplog.at_level(logging.WARNING, logger="cavmae.train.stage"):
        tf = st.transform(small, aug, frame=0)
    assert (tf.aug["freqm"], tf.aug["timem"]) == (24, 60)
    assert len(caplog.records) == 2 and "SpecAugment freqm 48 capped to 24" in caplog.records[0].getMessage()
    caplog.clear()
    official = st.transform(load_config(), aug, frame=0)
    esc = load_config(presets=["esc50-audioonly"])
    assert (official.aug["freqm"], official.aug["timem"]) == (48, 192)
    assert st.transform(esc, st.augmentation(esc.finetune), frame=0).aug["timem"] == 96 and not caplog.records
