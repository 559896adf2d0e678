"""The finetuning models: CAVMAEFT, the classifier on all tokens (no decoder; the modes of `train.modes`), and
CAVMAEFTAudio, the audio-only classifier without any visual parameter (mode `audioonly-lean`). Both load pretrained
CAVMAE weights (train/checkpoint.py).
"""

import torch
import torch.nn as nn

from cavmae.train.model import unused
from cavmae.train.model.blocks import ModelSize, init_linear_and_norm
from cavmae.train.model.encoder import Encoder
from cavmae.train.modes import mode_of


class CAVMAEFT(Encoder):
    """Finetuning classifier: the CAV-MAE encoder on all tokens, mean pooling, LayerNorm + Linear head.

    Position embeddings start as sin-cos (then come from the checkpoint) and are trainable by default, as in the
    official finetuning.
    """

    def __init__(
        self,
        label_dim: int,
        size: "str | dict | ModelSize" = "base",
        target_length: int = 1024,
        num_mel_bins: int = 128,
        image_size: int = 224,
        tr_pos: bool = True,
    ):
        super().__init__(size, target_length, num_mel_bins, image_size, tr_pos)
        self.mlp_head = nn.Sequential(nn.LayerNorm(self.size.embed_dim), nn.Linear(self.size.embed_dim, label_dim))
        self._init_encoder_weights()
        self.apply(init_linear_and_norm)

    def forward(
        self, audio: "torch.Tensor | None", image: "torch.Tensor | None", mode: str = "multimodal"
    ) -> torch.Tensor:
        """Logits [B, label_dim]. The input a mode does not use may be None."""
        spec = mode_of(mode, "mode")
        streams = []
        if "a" in spec.inputs:
            streams.append(self._specific(self.embed_audio(audio), self.blocks_a))
        if "v" in spec.inputs:
            streams.append(self._specific(self.embed_image(image), self.blocks_v))
        x = torch.cat(streams, dim=1)
        pooled = [self._joint(x, path).mean(dim=1) for path in spec.joint_paths]
        return self.mlp_head(sum(pooled) / len(pooled))

    def unused_parameter_names(self, mode: str = "multimodal") -> "set[str]":
        """Trainable parameters that get no gradient in `mode` (see CAVMAE.unused_parameter_names)."""
        return _unused_finetune_parameters(self, mode)


class CAVMAEFTAudio(Encoder):
    """Audio-only finetuning model (mode `audioonly-lean`): CAVMAEFT's 'audioonly' path without any visual
    parameter.

    Keys: patch_embed_a, modality_a, pos_embed_a, blocks_a, blocks_u, norm_a, norm (unused, kept for the official
    layout), mlp_head.
    """

    def __init__(
        self,
        label_dim: int,
        size: "str | dict | ModelSize" = "base",
        target_length: int = 1024,
        num_mel_bins: int = 128,
        tr_pos: bool = True,
    ):
        super().__init__(size, target_length, num_mel_bins, image_size=None, tr_pos=tr_pos)
        self.mlp_head = nn.Sequential(nn.LayerNorm(self.size.embed_dim), nn.Linear(self.size.embed_dim, label_dim))
        self._init_encoder_weights()
        self.apply(init_linear_and_norm)

    def forward(
        self, audio: torch.Tensor, image: "torch.Tensor | None" = None, mode: str = "audioonly"
    ) -> torch.Tensor:
        """Logits [B, label_dim]; `image` and `mode` exist so the finetuning loop can treat it like CAVMAEFT."""
        if not mode_of(mode, "mode").audio_path_only:
            raise ValueError(f"an audio-only model runs mode audioonly or audioonly-lean, not {mode!r}")
        return self.mlp_head(self.forward_feat(audio).mean(dim=1))

    def forward_feat(self, audio: torch.Tensor) -> torch.Tensor:
        """Unmasked, un-pooled audio stream [B, Na, D] after norm_a."""
        return self._joint(self._specific(self.embed_audio(audio), self.blocks_a), "a")

    def unused_parameter_names(self, mode: str = "audioonly") -> "set[str]":
        """Trainable parameters that never get a gradient (the shared-norm path and the dead norms)."""
        return _unused_finetune_parameters(self, mode)


def _unused_finetune_parameters(model: Encoder, mode: str) -> "set[str]":
    spec = mode_of(mode, "mode")
    return unused.unused_parameter_names(model, spec.inputs, set(spec.joint_paths))
