"""The config loader: defaults are the schema; unknown keys and wrong types are one-line errors."""

import pytest

from shards.config import ConfigError, check_choice, load_config


def test_defaults_are_the_official_values():
    cfg = load_config()
    assert cfg.audio.sample_rate == 16000
    assert cfg.audio.num_mel_bins == 128
    assert cfg.audio.channel_policy == "first"
    assert cfg.video.num_frames == 10 and cfg.video.image_size == 224
    assert cfg.clip.length_s == 10.0


def test_file_then_sets_override_in_order(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("audio:\n  num_mel_bins: 64\nvideo:\n  num_frames: 4\n")
    cfg = load_config(user, ["video.num_frames=6", "clip.length_s=5", "pretrain.lr=1e-4"])
    assert cfg.pretrain.lr == 1e-4  # YAML 1.1 would read 1e-4 as a string
    assert cfg.audio.num_mel_bins == 64
    assert cfg.video.num_frames == 6
    assert cfg.clip.length_s == 5.0 and isinstance(cfg.clip.length_s, float)


@pytest.mark.parametrize("sets, needle", [
    (["audio.num_mel_bin=64"], "audio.num_mel_bin"),
    (["nosuch.key=1"], "nosuch"),
    (["audio.num_mel_bins=lots"], "audio.num_mel_bins"),
    (["audio.keep_waveform=3"], "audio.keep_waveform"),
    (["audio=3"], "audio"),
    (["audio.num_mel_bins"], "audio.num_mel_bins"),
    (["data.shuffle_buffer=8"], "data.shuffle_buffer' was removed"),
])
def test_bad_sets_name_the_key(sets, needle):
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_unknown_key_in_file_is_named(tmp_path):
    user = tmp_path / "bad.yaml"
    user.write_text("video:\n  frames: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'video.frames'"):
        load_config(user)


def test_retired_key_in_a_file_written_before_is_ignored(tmp_path):
    old = tmp_path / "pipeline.yaml"  # e.g. the frozen config of a shard folder made before issue 9
    old.write_text("data:\n  shuffle_buffer: 1000\n  seed: 3\n")
    assert load_config(old).data.seed == 3 and "shuffle_buffer" not in load_config(old).data.to_dict()


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("audio: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_digest_follows_sample_settings_only():
    base = load_config()
    assert base.digest("audio", "video", "clip") == load_config(sets=["ray.workers=3"]).digest("audio", "video", "clip")
    assert base.digest("audio") != load_config(sets=["audio.num_mel_bins=64"]).digest("audio")


def test_choices_and_read_only():
    cfg = load_config(sets=["audio.channel_policy=left"])
    with pytest.raises(ConfigError, match="audio.channel_policy"):
        check_choice(cfg, "audio.channel_policy", ("first", "mix"))
    with pytest.raises(AttributeError):
        cfg.audio = {}


def test_round_trip_through_frozen_yaml(tmp_path):
    cfg = load_config(sets=["audio.num_mel_bins=64"])
    frozen = tmp_path / "pipeline.yaml"
    frozen.write_text(cfg.to_yaml())
    assert load_config(frozen).to_dict() == cfg.to_dict()


def test_presets_apply_before_sets(tmp_path):
    user = tmp_path / "recipes.yaml"
    user.write_text("presets:\n  small-audio:\n    audio.num_mel_bins: 32\n    video.num_frames: 2\n")
    cfg = load_config(user, ["video.num_frames=3"], presets=["small-audio"])
    assert cfg.audio.num_mel_bins == 32 and cfg.video.num_frames == 3
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config(presets=["nope"])
