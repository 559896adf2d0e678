"""The models' constructor defaults and the `model:` section of pipeline.yaml cannot drift apart."""

import inspect
import re

import pytest
import torch

from cavmae.shards.config import load_config
from cavmae.train.model import (CAVMAE, CAVMAEFT, CAVMAEFTAudio, CAVMAESync, CAVMAESyncFT, build_finetune_model,
                                build_pretrain_model)


def keyword_defaults(model_class: type) -> dict:
    return {name: p.default for name, p in inspect.signature(model_class).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("model_class", [CAVMAE, CAVMAEFT, CAVMAEFTAudio, CAVMAESync, CAVMAESyncFT])
def test_constructor_defaults_equal_pipeline_yaml(model_class):
    yaml_model = load_config(None).model.to_dict()
    defaults = keyword_defaults(model_class)
    shared = sorted(set(defaults) & set(yaml_model))
    # Geometry keys may move to the shards' own config; the model's own keys stay in `model:`.
    assert "size" in shared and ({"mask_ratio_a", "tr_pos"} & set(shared))
    assert [(k, defaults[k]) for k in shared] == [(k, yaml_model[k]) for k in shared]


def test_every_pipeline_yaml_model_key_is_a_model_keyword():
    """Every `model:` setting is some model's keyword (`variant` picks the pretraining model)."""
    accepted = set().union(*(keyword_defaults(m) for m in (CAVMAE, CAVMAEFT, CAVMAESync, CAVMAESyncFT)))
    accepted.add("variant")
    assert set(load_config(None).model.to_dict()) <= accepted
    assert {"mask_ratio_a", "contrast_chunks", "tr_pos"} <= accepted


# Every `model:` setting off its default (two sync sets: cls_token false rules out the global losses and pools).
OFF_DEFAULT = dict(size="tiny", target_length=64, num_mel_bins=32, image_size=32, mask_ratio_a=0.5,
                   mask_ratio_v=0.6, mask_mode="time", norm_pix_loss=False, mae_loss_weight=2.0,
                   contrast_loss_weight=0.1, bidirectional=True, contrast_chunks=2, tr_pos=False, audio_length=32,
                   num_register_tokens=3, keep_register_tokens=True, contrastive_heads=True)
SYNC_SETS = [dict(OFF_DEFAULT, variant="sync", global_local_losses=True, sync_pool="global"),
             dict(OFF_DEFAULT, variant="sync", cls_token=False)]


@pytest.mark.parametrize("cfg, build, model_class", [
    (OFF_DEFAULT, build_pretrain_model, CAVMAE),
    (OFF_DEFAULT, lambda cfg: build_finetune_model(cfg, 3), CAVMAEFT),
    (OFF_DEFAULT, lambda cfg: build_finetune_model(cfg, 3, audio_only=True), CAVMAEFTAudio),
    *[(cfg, build_pretrain_model, CAVMAESync) for cfg in SYNC_SETS],
    *[(cfg, lambda cfg: build_finetune_model(cfg, 3), CAVMAESyncFT) for cfg in SYNC_SETS],
])
def test_the_builders_pass_every_setting_their_model_takes(cfg, build, model_class):
    """The builders name each keyword they pass: none forgotten (it would keep the constructor's default). The
    built model equals the one constructed with every keyword of `cfg` its constructor takes: same attributes,
    same parameters (values at one seed, shapes, trainability)."""
    direct_kwargs = {k: v for k, v in cfg.items() if k in inspect.signature(model_class).parameters}
    torch.manual_seed(0)
    built = build(cfg)
    torch.manual_seed(0)
    direct = model_class(3, **direct_kwargs) if "label_dim" in inspect.signature(model_class).parameters \
        else model_class(**direct_kwargs)
    assert type(built) is model_class
    public = lambda m: {k: v for k, v in vars(m).items() if not k.startswith("_")}  # noqa: E731
    assert public(built) == public(direct)
    assert [(k, p.shape, p.requires_grad) for k, p in built.named_parameters()] == \
        [(k, p.shape, p.requires_grad) for k, p in direct.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values()))


def test_the_settings_choices_are_the_models():
    """`train/settings.py` does not import the model (torch), so its choices for the model sizes are checked here
    (mask modes and finetuning modes are the models' own tables: `settings.MASK_MODES`, `modes.NAMES`)."""
    from cavmae.shards.settings import spec
    from cavmae.train.model import MODEL_SIZES

    assert set(spec("model.size").metadata["choices"]) == set(MODEL_SIZES)


@pytest.mark.parametrize("setting, value, message", [
    ("mask_ratio_a", 1.0, "'model.mask_ratio_a' must be < 1.0; got 1.0"),
    ("mask_mode", "random", "'model.mask_mode' must be one of unstructured, time, freq, tf; got 'random'"),
    ("contrast_chunks", 0, "'model.contrast_chunks' must be >= 1; got 0"),
    ("mae_loss_weight", -1.0, "'model.mae_loss_weight' must be >= 0.0; got -1.0"),
])
def test_the_pretraining_model_refuses_what_the_settings_refuse(setting, value, message):
    """The constructor checks its options with the `model:` settings' own choices and ranges, not a copy of them."""
    with pytest.raises(ValueError, match=re.escape(f"CAVMAE: {message}")):
        CAVMAE(size="tiny", target_length=128, image_size=64, **{setting: value})


def test_the_model_checks_its_options_in_a_process_that_registered_no_settings():
    """A library user's own script builds the model without registering train's sections: the constructor's checks
    read the `Model` class itself, not this process's registry."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from cavmae.train.model import CAVMAE\n"
            "CAVMAE(size='tiny', target_length=128, image_size=64)\n"
            "try:\n    CAVMAE(size='tiny', target_length=128, image_size=64, mask_ratio_a=1.0)\n"
            "except ValueError as exc:\n    print(exc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                         timeout=120)
    assert res.stdout == "CAVMAE: 'model.mask_ratio_a' must be < 1.0; got 1.0\n", res.stderr[-2000:]
