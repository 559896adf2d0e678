"""The finetuning-mode table (train/modes.py) is the one list: the settings' choices, every --mode, the model's
forward and unused parameters, and eval's frame aggregation follow it; `audioonly-lean` finetunes and evaluates the
audio-only model; the official names of the renamed modes still work, with a warning."""

import json
import logging

import torch

from cavmae.shards.settings import spec
from cavmae.train.checkpoint import load_state_dict_file
from cavmae.train.cli import build_parser, main
from cavmae.train.model import CAVMAEFT
from cavmae.train.modes import ALIASES, MODES, NAMES, mode_name
from tests.train_fixtures import TINY, label_index_csv, write_synthetic_shards


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def test_every_mode_list_is_the_table():
    assert spec("finetune.mode").metadata["choices"] == NAMES == tuple(MODES) + tuple(ALIASES)
    assert ALIASES == {"missingaudioonly": "multimodal-audioonly", "missingvideoonly": "multimodal-videoonly"}
    for command in ("finetune", "eval"):
        sub = build_parser()._subparsers._group_actions[0].choices[command]
        (mode,) = [a for a in sub._actions if a.dest == "mode"]
        assert tuple(mode.choices) == NAMES and all(name in mode.help for name in MODES)


def test_unused_parameters_follow_the_table():
    model = CAVMAEFT(3, size="tiny", target_length=128, image_size=64)
    for name, mode in MODES.items():
        unused = model.unused_parameter_names(name)
        assert any(n.startswith("patch_embed_v") for n in unused) == ("v" not in mode.inputs), name
        assert ("norm.weight" in unused) == (None not in mode.joint_paths), name


def test_an_official_name_warns_once_and_means_the_same(caplog):
    with caplog.at_level(logging.WARNING, logger="cavmae.train.modes"):
        assert mode_name("missingvideoonly") == mode_name("missingvideoonly") == "multimodal-videoonly"
    assert len([r for r in caplog.records if "missingvideoonly" in r.getMessage()]) <= 1


def test_audioonly_lean_finetunes_and_evaluates_the_audio_only_model(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "shards", 8, 4)
    labels = str(label_index_csv(tmp_path / "labels.csv"))
    run = tmp_path / "ft"
    common = ["--shards", str(tmp_path / "shards"), "--labels", labels]
    assert main(["finetune", *common, "--out", str(run), "--mode", "audioonly-lean",
                 *sets("finetune.batch_size=4", "finetune.epochs=1", "finetune.wa=false")]) == 0
    weights = load_state_dict_file(str(run / "model.pth"))
    assert weights and not any("_v" in k.split(".")[0] or k.startswith("patch_embed_v") for k in weights)
    capsys.readouterr()
    assert main(["eval", *common, "--checkpoint", str(run / "model.pth"), "--mode", "audioonly-lean", *sets()]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "audioonly-lean" and len(result["mAP_per_frame"]) == 1  # no video: scored once
    assert main(["eval", *common, "--checkpoint", str(run / "model.pth"), "--mode", "multimodal", *sets()]) == 2
    assert "audio-only model" in capsys.readouterr().err
    assert torch.isfinite(torch.tensor(result["mAP"]))
