"""The models' constructor defaults and the `model:` section of pipeline.yaml cannot drift apart."""

import inspect
import re

import pytest

from cavmae.shards.config import load_config
from cavmae.train.model import CAVMAE, CAVMAEFT, CAVMAEFTAudio, CAVMAESync, CAVMAESyncFT


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
    """The builders refuse a key no model takes, so the shipped defaults must hold none (`variant` picks the
    pretraining model)."""
    accepted = set().union(*(keyword_defaults(m) for m in (CAVMAE, CAVMAEFT, CAVMAESync, CAVMAESyncFT)))
    accepted.add("variant")
    assert set(load_config(None).model.to_dict()) <= accepted
    assert {"mask_ratio_a", "contrast_chunks", "tr_pos"} <= accepted


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
