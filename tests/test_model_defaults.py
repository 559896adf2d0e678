"""The models' constructor defaults and the `model:` section of pipeline.yaml cannot drift apart."""

import inspect

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
    """`train/settings.py` does not import the model (torch), so its choices for model options are checked here."""
    from cavmae.shards.settings import spec
    from cavmae.train.model import MASK_MODES, MODEL_SIZES
    from cavmae.train.modes import NAMES

    assert set(spec("model.size").metadata["choices"]) == set(MODEL_SIZES)
    assert set(spec("model.mask_mode").metadata["choices"]) == set(MASK_MODES)
    assert spec("finetune.mode").metadata["choices"] == NAMES
