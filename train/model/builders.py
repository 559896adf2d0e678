"""The models from the `model:` config section (a plain dict: the section's keys, and the samples' geometry
`num_mel_bins, image_size`, which `train.stage.model_settings` adds from the shards' audio and video sections).

One section serves both stages, so each builder names every setting it passes its constructor (grep a setting,
e.g. `mask_ratio_a`, to follow it from pipeline.yaml to the model): a new model option is a constructor keyword,
its field in `train/settings.py` (tests/test_model_defaults.py checks the two defaults agree) and its keyword here.
A key that is no `model:` setting is a typo and is refused; a setting the dict lacks has its default. `variant`
picks the pretraining model: cavmae (CAVMAE) or sync (CAVMAESync); the settings of the other variant are ignored.
"""

import dataclasses

from cavmae.train.model.finetuning import CAVMAEFT, CAVMAEFTAudio
from cavmae.train.model.pretraining import CAVMAE
from cavmae.train.model.sync import CAVMAESync
from cavmae.train.model.sync_finetuning import CAVMAESyncFT
from cavmae.train.settings import Model

PRETRAIN_MODELS = {"cavmae": CAVMAE, "sync": CAVMAESync}
GEOMETRY = ("num_mel_bins", "image_size")  # the samples' own, not `model:` settings


def _settings(cfg: dict) -> Model:
    """The `model:` settings of `cfg` over their defaults; ValueError on a key that is no model setting, on a
    missing geometry key (`target_length` included: its default follows the clip, which a plain dict has not) and
    on an unknown variant."""
    fields = {field.name for field in dataclasses.fields(Model)}
    unknown = set(cfg) - fields - set(GEOMETRY)
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    missing = [key for key in (*GEOMETRY, "target_length") if cfg.get(key) is None]
    if missing:
        raise ValueError(f"model config lacks the samples' geometry: {missing}")
    m = Model(**{k: v for k, v in cfg.items() if k in fields})
    if m.variant not in PRETRAIN_MODELS:
        raise ValueError(f"model variant must be one of {sorted(PRETRAIN_MODELS)}, not {m.variant!r}")
    return m


def build_pretrain_model(cfg: dict) -> "CAVMAE | CAVMAESync":
    """The pretraining model of the config's variant (CAVMAE or CAVMAESync; finetuning-only keys are ignored)."""
    m = _settings(cfg)
    losses = dict(mask_ratio_a=m.mask_ratio_a, mask_ratio_v=m.mask_ratio_v, mask_mode=m.mask_mode,
                  norm_pix_loss=m.norm_pix_loss, mae_loss_weight=m.mae_loss_weight,
                  contrast_loss_weight=m.contrast_loss_weight, bidirectional=m.bidirectional,
                  contrast_chunks=m.contrast_chunks)
    if m.variant == "sync":
        return CAVMAESync(size=m.size, audio_length=m.audio_length, num_mel_bins=cfg["num_mel_bins"],
                          image_size=cfg["image_size"], **losses, num_register_tokens=m.num_register_tokens,
                          cls_token=m.cls_token, global_local_losses=m.global_local_losses,
                          contrastive_heads=m.contrastive_heads, keep_register_tokens=m.keep_register_tokens)
    return CAVMAE(size=m.size, target_length=m.target_length, num_mel_bins=cfg["num_mel_bins"],
                  image_size=cfg["image_size"], **losses)


def build_finetune_model(cfg: dict, label_dim: int,
                         audio_only: bool = False) -> "CAVMAEFT | CAVMAEFTAudio | CAVMAESyncFT":
    """CAVMAEFT (or CAVMAEFTAudio, which has no image_size) from the model config (pretraining-only keys are
    ignored); CAVMAESyncFT for the sync variant (which has no audio-only model: ValueError)."""
    m = _settings(cfg)
    if m.variant == "sync":
        if audio_only:
            raise ValueError("model.variant sync has no audio-only model (mode audioonly-lean): use audioonly")
        return CAVMAESyncFT(label_dim, size=m.size, audio_length=m.audio_length, num_mel_bins=cfg["num_mel_bins"],
                            image_size=cfg["image_size"], tr_pos=m.tr_pos, num_register_tokens=m.num_register_tokens,
                            cls_token=m.cls_token, keep_register_tokens=m.keep_register_tokens,
                            sync_pool=m.sync_pool)
    if audio_only:
        return CAVMAEFTAudio(label_dim, size=m.size, target_length=m.target_length, num_mel_bins=cfg["num_mel_bins"],
                             tr_pos=m.tr_pos)
    return CAVMAEFT(label_dim, size=m.size, target_length=m.target_length, num_mel_bins=cfg["num_mel_bins"],
                    image_size=cfg["image_size"], tr_pos=m.tr_pos)
