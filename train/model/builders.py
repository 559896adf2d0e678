"""The models from the `model:` config section (a plain dict: geometry `size, target_length, num_mel_bins,
image_size` and the keys of both stages).

One section serves both stages, so each builder passes its constructor exactly the keys that constructor accepts
(read from its signature): a new model option is a constructor keyword plus its field in `train/settings.py`
(tests/test_model_defaults.py checks the two defaults agree), nothing here.
A key that no model accepts is a typo and is refused. `variant` picks the pretraining model: cavmae (CAVMAE) or sync
(CAVMAESync); the keys of the other variant are ignored.
"""

import inspect

from cavmae.train.model.finetuning import CAVMAEFT, CAVMAEFTAudio
from cavmae.train.model.pretraining import CAVMAE
from cavmae.train.model.sync import CAVMAESync
from cavmae.train.model.sync_finetuning import CAVMAESyncFT

PRETRAIN_MODELS = {"cavmae": CAVMAE, "sync": CAVMAESync}


def _keywords(model_class: type) -> "set[str]":
    """The config keys `model_class` takes: its constructor's parameters except the label count, which comes from
    the labels, not the config."""
    return set(inspect.signature(model_class).parameters) - {"label_dim"}


def _kwargs_for(model_class: type, cfg: dict) -> dict:
    """The keys of `cfg` that `model_class` accepts; ValueError on a key that neither stage's model accepts."""
    unknown = set(cfg) - {"variant"}
    for known in (CAVMAE, CAVMAESync, CAVMAEFT, CAVMAESyncFT):
        unknown -= _keywords(known)
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    accepted = _keywords(model_class)
    return {k: v for k, v in cfg.items() if k in accepted}


def _variant(cfg: dict) -> str:
    variant = cfg.get("variant", "cavmae")
    if variant not in PRETRAIN_MODELS:
        raise ValueError(f"model variant must be one of {sorted(PRETRAIN_MODELS)}, not {variant!r}")
    return variant


def build_pretrain_model(cfg: dict) -> "CAVMAE | CAVMAESync":
    """The pretraining model of the config's variant (CAVMAE or CAVMAESync; finetuning-only keys are ignored)."""
    model_class = PRETRAIN_MODELS[_variant(cfg)]
    return model_class(**_kwargs_for(model_class, cfg))


def build_finetune_model(cfg: dict, label_dim: int,
                         audio_only: bool = False) -> "CAVMAEFT | CAVMAEFTAudio | CAVMAESyncFT":
    """CAVMAEFT (or CAVMAEFTAudio, which has no image_size) from the model config (pretraining-only keys are
    ignored); CAVMAESyncFT for the sync variant (which has no audio-only model: ValueError)."""
    if _variant(cfg) == "sync":
        if audio_only:
            raise ValueError("model.variant sync has no audio-only model (mode audioonly-lean): use audioonly")
        return CAVMAESyncFT(label_dim, **_kwargs_for(CAVMAESyncFT, cfg))
    model_class = CAVMAEFTAudio if audio_only else CAVMAEFT
    return model_class(label_dim, **_kwargs_for(model_class, cfg))
