"""CAV-MAE (Gong et al., ICLR 2023): contrastive audio-visual masked autoencoder, and its finetuning models.

Three models share one encoder whose parameter names are those of the official checkpoints, so official weights load
strictly (after stripping the DataParallel `module.` prefix) and our checkpoints load into the official code:

  CAVMAE          pretraining: masked audio and image tokens -> modality-specific encoders -> one joint block ->
                  (a) joint decoder reconstructing both modalities (MAE loss), (b) pooled per-modality vectors
                  (contrastive InfoNCE loss).
  CAVMAEFT        finetuning/inference classifier on all tokens, no decoder; the input modes of train/modes.py.
  CAVMAEFTAudio   audio-only finetuning model without any visual parameter (mode audioonly-lean).
  CAVMAESync      CAV-MAE Sync pretraining (Araujo et al., CVPR 2025): CAVMAE on (frame, aligned audio segment)
                  pairs, with global (cls) tokens, register tokens and optional contrastive heads.
  CAVMAESyncFT    a classifier on the Sync encoder (patch tokens and/or global tokens).

Files, in reading order:
  blocks.py       sizes (ModelSize, MODEL_SIZES), the transformer Block, PatchEmbed, patchify/unpatchify, masking,
                  weight initialisation
  encoder.py      Encoder, shared by all three models (and the input conventions: fbank and image layouts)
  pretraining.py  CAVMAE: masking, decoder, MAE and contrastive losses
  finetuning.py   CAVMAEFT, CAVMAEFTAudio (FT_MODES: the mode table, train/modes.py)
  sync.py         CAVMAESync (the released class's keywords; its checkpoint layout)
  sync_finetuning.py  CAVMAESyncFT (our reading: no released recipe)
  builders.py     build_pretrain_model / build_finetune_model from the `model:` config section
  unused.py       which trainable parameters get no gradient in a pass (frozen before DDP wrapping)
"""

from cavmae.train.model.blocks import (
    MASK_MODES,
    MODEL_SIZES,
    PATCH_SIZE,
    Block,
    ModelSize,
    PatchEmbed,
    audio_as_image,
    patchify,
    random_masking,
    resolve_size,
    structured_audio_noise,
    unpatchify,
)
from cavmae.train.model.builders import build_finetune_model, build_pretrain_model
from cavmae.train.model.encoder import Encoder
from cavmae.train.model.finetuning import CAVMAEFT, CAVMAEFTAudio
from cavmae.train.model.pretraining import CAVMAE, CONTRAST_TEMPERATURE
from cavmae.train.model.sync import CAVMAESync
from cavmae.train.model.sync_finetuning import CAVMAESyncFT
from cavmae.train.modes import MODES as FT_MODES

__all__ = [
    "CAVMAE",
    "CAVMAEFT",
    "CAVMAEFTAudio",
    "CAVMAESync",
    "CAVMAESyncFT",
    "CONTRAST_TEMPERATURE",
    "Encoder",
    "FT_MODES",
    "MASK_MODES",
    "MODEL_SIZES",
    "PATCH_SIZE",
    "Block",
    "ModelSize",
    "PatchEmbed",
    "audio_as_image",
    "build_finetune_model",
    "build_pretrain_model",
    "patchify",
    "random_masking",
    "resolve_size",
    "structured_audio_noise",
    "unpatchify",
]
