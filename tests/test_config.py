"""The config loader and its schema (the settings.py of shards/, preprocess/ and train/): unknown keys, wrong types,
bad choices, values below their minimum and keys set to no effect are one-line errors; renamed keys warn;
pipeline.yaml is the generated text."""

import dataclasses
import logging
import os
import re
import subprocess
import sys
import typing

import pytest

from cavmae.shards.config import ConfigError, load_config
from cavmae.shards.settings import OWNERS, PIPELINE_YAML, PRESETS, SECTIONS, as_yaml, default_of, render


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


def test_read_only():
    with pytest.raises(AttributeError):
        load_config().audio = {}


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


def test_pipeline_yaml_is_the_generated_text():
    assert PIPELINE_YAML.read_text() == render(), "run `python -m cavmae.settings --write` after editing settings"


def test_defaults_meet_their_own_constraints():
    every = load_config(PIPELINE_YAML)  # each key given, so each is type-, choice-, minimum- and effect-checked
    assert every.to_dict() == load_config().to_dict() and "finetune.wa_end" in every.explicit


@pytest.mark.pinned  # a hash of the settings' text only: no media, no float arithmetic, the same on every machine
def test_sample_settings_digest_is_unchanged():
    assert load_config(None).digest("audio", "video", "clip") == "94542efbd75aafcc"  # recorded in every sample


@pytest.mark.parametrize("sets, message", [
    (["audio.channel_policy=left"], "--set: 'audio.channel_policy' must be one of first, mix; got 'left'"),
    (["pretrain.schedule=linear"], "'pretrain.schedule' must be one of step, cosine"),
    (["finetune.metric=auc"], "'finetune.metric' must be one of mAP, acc"),
    (["video.num_frames=0"], "--set: 'video.num_frames' must be >= 1; got 0"),
    (["ray.workers=-1"], "'ray.workers' must be >= 0"),
    (["finetune.head_lr_scale=-1"], "'finetune.head_lr_scale' must be >= 0.0"),
    (["shards.pattern=../x-%06d.tar"], "shards.pattern '../x-%06d.tar' must be a plain file name"),
    (["pretrain.epoch_samples=ten"], "'pretrain.epoch_samples' must be int or null"),
    (["data.betas=1"], "unknown config key 'data.betas'"),
    (["pretrain.betas=[0.9, true]"], "'pretrain.betas' must be list of numbers"),
])
def test_choices_minimums_and_checks_refused_at_load(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_choice_in_a_file_names_the_file(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("video:\n  resize: bicubic\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: 'video.resize' must be one of scaler, pil; got 'bicubic'"):
        load_config(user)


@pytest.mark.parametrize("sets, message", [
    (["pretrain.warmup_steps=100"], "'pretrain.warmup_steps' has no effect with pretrain.schedule=step "
                                    "(it applies to cosine)"),
    (["finetune.min_lr_ratio=0.1"], "'finetune.min_lr_ratio' has no effect with finetune.schedule=step"),
    (["pretrain.schedule=cosine", "pretrain.lr_start_epoch=3"], "'pretrain.lr_start_epoch' has no effect with "
                                                                "pretrain.schedule=cosine (it applies to step)"),
    (["finetune.schedule=cosine", "finetune.lr_step=2"], "'finetune.lr_step' has no effect"),
    (["finetune.schedule=cosine", "finetune.lr_decay=0.1"], "'finetune.lr_decay' has no effect"),
    (["finetune.wa=false", "finetune.wa_start=1"], "'finetune.wa_start' has no effect with finetune.wa=false "
                                                   "(it applies to true)"),
    (["finetune.wa_end=5", "finetune.wa=false"], "'finetune.wa_end' has no effect"),
    (["clip.hop_s=5.0"], "--set: 'clip.hop_s' has no effect with clip.mode=first (it applies to windows)"),
    (["clip.min_window_s=2.0"], "'clip.min_window_s' has no effect"),
])
def test_a_key_set_to_no_effect_is_an_error(sets, message):
    with pytest.raises(ConfigError) as err:
        load_config(sets=sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_no_effect_rule_spares_defaults_and_applies_to_overrides(tmp_path):
    same = load_config(sets=["pretrain.warmup_steps=0", "clip.hop_s=10.0", "finetune.wa=false",
                             "finetune.wa_end=15"])  # explicit, but the default value: harmless
    assert "pretrain.warmup_steps" in same.explicit
    cosine = load_config(sets=["pretrain.schedule=cosine", "pretrain.warmup_steps=100"])
    assert cosine.pretrain.warmup_steps == 100
    with pytest.raises(ConfigError, match="--set: 'pretrain.min_lr_ratio' has no effect with pretrain.schedule=step"):
        load_config(sets=["pretrain.schedule=cosine"]).with_overrides(["pretrain.min_lr_ratio=0.1",
                                                                       "pretrain.schedule=step"])
    # what a base config holds was checked when it loaded: reprocess may switch a shard folder's clip.mode back
    windows = load_config(sets=["clip.mode=windows", "clip.hop_s=5.0"])
    assert windows.with_overrides(["clip.mode=first"]).clip.hop_s == 5.0
    user = tmp_path / "mine.yaml"
    user.write_text("clip:\n  hop_s: 5.0\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: 'clip.hop_s' has no effect"):
        load_config(user)
    assert load_config(user, ["clip.mode=windows"]).clip.hop_s == 5.0


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name):
    cfg = load_config(presets=[name])
    assert {f"{k}" for k in PRESETS[name]} <= cfg.explicit


@pytest.mark.parametrize("old, new, value", [
    ("finetune.head_lr", "finetune.head_lr_scale", 10.0),
    ("model.num_mel_bins", "audio.num_mel_bins", 64),
    ("model.image_size", "video.image_size", 96),
])
def test_renamed_keys_apply_and_warn_once(old, new, value, tmp_path, caplog):
    section, key = new.split(".")
    old_section, old_key = old.split(".")
    user = tmp_path / "old.yaml"
    user.write_text(f"{old_section}:\n  {old_key}: {value}\n")
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(f"presets:\n  mine: {{{old}: {value}}}\n")
    for cfg in (load_config(sets=[f"{old}={value}", f"{old}={value}"]), load_config(user),
                load_config(recipes, presets=["mine"]), load_config().with_overrides([f"{old}={value}"])):
        assert cfg[section][key] == value and new in cfg.explicit and old not in cfg.explicit
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4 and all(f"'{old}' is renamed '{new}'" in w for w in warnings)
    assert "num_mel_bins" not in load_config().model.to_dict() and "head_lr" not in load_config().finetune


def test_retired_label_smooth_of_pretraining():
    with pytest.raises(ConfigError, match="'pretrain.label_smooth' was removed: pretraining has no labels"):
        load_config(sets=["pretrain.label_smooth=0.1"])
    assert load_config().finetune.label_smooth == 0.1


def test_sections_reads_only_those_of_the_file(tmp_path):
    frozen = tmp_path / "pipeline.yaml"  # a record of the settings used: a key without effect there is no error
    frozen.write_text("audio:\n  num_mel_bins: 64\nclip:\n  hop_s: 5.0\nmodel:\n  nosuch: 1\npretrain:\n  lr: 1.0\n")
    cfg = load_config(frozen, sections=("audio", "video", "clip"))
    assert cfg.audio.num_mel_bins == 64 and cfg.clip.hop_s == 5.0 and cfg.pretrain.lr == 5.0e-5
    assert cfg.explicit == {"audio.num_mel_bins", "clip.hop_s"}
    with pytest.raises(ConfigError, match="unknown config key 'model.nosuch'"):
        load_config(frozen)


def test_explicit_holds_the_keys_given_by_file_presets_and_sets(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text("video:\n  num_frames: 4\n")
    cfg = load_config(user, ["eval.frames=3"], presets=["scale+"])
    assert cfg.explicit == {"video.num_frames", "pretrain.lr", "pretrain.batch_size", "eval.frames"}
    assert cfg.eval.frames == "3"  # an int accepted as text
    assert cfg.with_overrides(["data.seed=1"]).explicit == cfg.explicit | {"data.seed"}
    assert load_config().explicit == frozenset()


def test_finetuning_recipes_are_the_official_values_with_their_sources():
    """as20k-ft spells out the defaults (the official AS-20K script); every recipe value has its source written
    beside it in pipeline.yaml; ESC-50 trains 5 s audio at 512 rows."""
    default, as20k = load_config(), load_config(presets=["as20k-ft"])
    for section in ("finetune", "model", "eval"):
        assert as20k[section].to_dict() == default[section].to_dict()
    text = PIPELINE_YAML.read_text()
    assert "    finetune.head_lr_scale: 50.0     # run_cavmae_ft_full.sh --head_lr" in text
    assert "    finetune.loss: ce                # vggsound/run_cavmae_ft.sh --loss" in text
    esc = load_config(presets=["esc50-audioonly"])
    assert (esc.model.target_length, esc.finetune.mode, esc.finetune.loss, esc.finetune.wa) == (
        512, "audioonly", "ce", False)
    assert (esc.data.mean, esc.data.std) == (default.data.mean, default.data.std)
def numeric_settings():
    """(dotted key, field) of every setting that holds numbers (int, float, a list of floats; or null)."""
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = set(typing.get_args(hints[f.name])) - {type(None)} or {hints[f.name]}
            if kinds & {int, float} or typing.get_origin(hints[f.name]) is list:
                yield f"{section}.{f.name}", f


def counts(dotted, field):
    return typing.get_type_hints(SECTIONS[dotted.split(".")[0]])[field.name] in (int, int | None)


def out_of_range(dotted, field):
    """Values of `field` just outside its range (and, for a float, the non-finite ones)."""
    meta, is_int = field.metadata, counts(dotted, field)
    step = 1 if is_int else 1e-3
    values = []
    if meta["min"] is not None:
        values.append(meta["min"] - step)
    if meta["max"] is not None:
        values.append(meta["max"] + step)
    values += [meta[bound] for bound in ("above", "below") if meta[bound] is not None]
    if not is_int:
        values += [float("nan"), float("inf")]
    return [[v] + default_of(field)[1:] if isinstance(default_of(field), list) else v for v in values]


NUMERIC = sorted(numeric_settings())
CASES = [(dotted, value) for dotted, field in NUMERIC for value in out_of_range(dotted, field)]


def test_every_number_has_a_range():
    bounds = ("min", "max", "above", "below")
    assert [dotted for dotted, f in NUMERIC if all(f.metadata[b] is None for b in bounds)] == ["data.mean"]
    assert [dotted for dotted, f in NUMERIC if counts(dotted, f) and f.metadata["max"] is None] == []


@pytest.mark.parametrize("dotted, value", CASES, ids=[f"{d}={v}" for d, v in CASES])
def test_every_numeric_key_out_of_range_is_one_line_at_load(dotted, value, tmp_path):
    text = "[" + ", ".join(as_yaml(v) for v in value) + "]" if isinstance(value, list) else as_yaml(value)
    section, key = dotted.split(".")
    user = tmp_path / "mine.yaml"
    user.write_text(f"{section}:\n  {key}: {text}\n")
    for load in (lambda: load_config(sets=[f"{dotted}={text}"]), lambda: load_config(user)):
        with pytest.raises(ConfigError) as err:
            load()
        assert f"'{dotted}' must" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dotted, value", [("video.num_frames", 10 ** 30), ("audio.num_mel_bins", 10 ** 8),
                                           ("video.image_size", 10 ** 6), ("audio.frame_shift_ms", 0),
                                           ("clip.length_s", 10 ** 9)])
def test_a_shard_folders_frozen_config_out_of_range_is_refused(tmp_path, dotted, value):
    from cavmae.shards.frozen import frozen_config
    from cavmae.shards.store import Store

    section, key = dotted.split(".")
    (tmp_path / "pipeline.yaml").write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError) as err:
        frozen_config(Store.of(tmp_path))
    assert str(tmp_path / "pipeline.yaml") in str(err.value) and f"'{dotted}' must be" in str(err.value)


@pytest.mark.parametrize("sets, message", [
    (["pretrain.epoch_samples=100000000000000"], "'pretrain.epoch_samples' must be <= 100000000"),
    (["data.std=0"], "'data.std' must be > 0.0"),
    (["finetune.label_smooth=3"], "'finetune.label_smooth' must be < 1.0"),
    (["model.mask_ratio_a=1.0"], "'model.mask_ratio_a' must be < 1.0"),
    (["data.image_std=[0.2, 0.2]"], "'data.image_std' must hold 3 numbers; got 2"),
    (["data.mean=.nan"], "'data.mean' must be a finite number"),
])
def test_named_bounds(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(sets=sets)


@pytest.mark.parametrize("registers, checked, kept, value", [
    ("cavmae.preprocess.settings", "ray.workers=-1", "finetune.lr=abc", "abc"),
    ("cavmae.train.settings", "finetune.lr=abc", "ray.workers=-1", -1),
    (None, "audio.num_mel_bins=0", "model.size=huge", "huge"),
])
def test_a_process_checks_the_sections_it_registered_whatever_it_imported(registers, checked, kept, value):
    """Settings by owner: a process checks shards' sections and those it registered (`register_sections()`, each
    entry's first call), not those of the packages it imported (here every owner's settings and both CLIs); another
    owner's keys are kept as given, for that owner to check, and reading that section is one line naming the call."""
    section, key = kept.split("=")[0].split(".")
    code = ("import cavmae.train, cavmae.settings, cavmae.preprocess.cli, cavmae.train.cli\n"
            + (f"from {registers} import register_sections; register_sections()\n" if registers else "")
            + "from cavmae.shards.config import ConfigError, load_config\n"
            f"cfg = load_config({str(PIPELINE_YAML)!r}, [{kept!r}])\n"
            f"print(repr(cfg.to_dict()[{section!r}][{key!r}]))\n"
            f"try:\n    cfg.{section}\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n"
            f"try:\n    load_config(sets=[{checked!r}])\n    print('accepted')\n"
            "except ConfigError:\n    print('refused')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PIPELINE_YAML.parent).stdout.splitlines()
    assert out == [repr(value), f"Unregistered config section '{section}' is not registered in this process: call "
                                f"{OWNERS[section]}.register_sections() first", "refused"]


@pytest.mark.parametrize("entry, checks", [
    (["cavmae.preprocess.cli", "stats", "nowhere", "--out", "stats"], {"ray"}),  # cavmae-prep
    (["cavmae.train", "order", "--shards", "nowhere", "--epoch", "1"], {"model"}),  # cavmae-train, torchrun
    (["cavmae", "predict", "a.mp4", "--checkpoint", "none.pth", "--labels", "none.csv"], {"ray", "model"}),
])
@pytest.mark.parametrize("bad", ["ray.workers=-1", "model.mask_ratio_a=2"])
def test_each_entry_registers_the_sections_it_checks(entry, checks, bad, tmp_path):
    """Each command, in a fresh process, refuses a bad value of the sections it registers and keeps another
    owner's as given (then fails on what it was given: no shards there)."""
    res = subprocess.run([sys.executable, "-m", *entry, "--set", bad], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(PIPELINE_YAML.parent)}, timeout=120)
    refused = f"--set: '{bad.split('=')[0]}' must be" in res.stderr
    assert res.returncode == 2 and refused == (bad.split(".")[0] in checks), res.stderr
    assert refused or "nowhere: no shards found" in res.stderr, res.stderr


def test_python_m_cavmae_settings_registers_every_owner():
    """`python -m cavmae.settings` prints pipeline.yaml, every owner's sections, in a process of its own."""
    res = subprocess.run([sys.executable, "-m", "cavmae.settings"], capture_output=True, text=True, check=True,
                         cwd=PIPELINE_YAML.parent, timeout=120)
    assert res.stdout == PIPELINE_YAML.read_text()
