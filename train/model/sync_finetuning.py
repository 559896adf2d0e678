"""CAVMAESyncFT: a classifier on the CAV-MAE Sync encoder. The released code has no finetuning recipe (its README:
"classification codes coming soon"), so this is our reading of the paper, stated here.

A sample is a (frame, audio segment) pair, as in Sync pretraining: finetuning draws one frame and its segment per
sample; eval, predict and embed score every frame's pair and average the frames' probabilities, as CAV-MAE eval
averages its frames'. The encoder is CAVMAESync's (cls and register tokens, same parameter names, so a Sync
checkpoint loads with only `mlp_head.*` missing and the decoder and contrastive heads unexpected). `sync_pool`
picks what the LayerNorm + Linear head sees:

  tokens  the patch tokens after the joint block, mean-pooled, per the mode's joint passes (train/modes.py) as
          CAVMAEFT does: the reconstruction side of Sync, cls tokens and registers left out;
  global  the global (cls) token of each modality the mode reads, after the joint block with that modality's norms
          and norm_a / norm_v (the vectors Sync's contrastive loss aligns), averaged over the modalities;
  both    the mean of the two.
"""

import dataclasses

import torch

from cavmae.train.model import unused
from cavmae.train.model.blocks import ModelSize, resolve_size
from cavmae.train.model.finetuning import CAVMAEFT
from cavmae.train.model.sync import add_sync_tokens, drop_registers, encode_with_sync_tokens
from cavmae.train.modes import mode_of

SYNC_POOLS = ("tokens", "global", "both")


class CAVMAESyncFT(CAVMAEFT):
    """Classifier on (segment, frame) pairs with the CAV-MAE Sync encoder (see the module docstring)."""

    def __init__(
        self,
        label_dim: int,
        size: "str | dict | ModelSize" = "base",
        audio_length: int = 416,
        num_mel_bins: int = 128,
        image_size: int = 224,
        tr_pos: bool = True,
        modality_specific_depth: "int | None" = None,
        num_register_tokens: int = 8,
        cls_token: bool = True,
        keep_register_tokens: bool = False,
        sync_pool: str = "tokens",
    ):
        if sync_pool not in SYNC_POOLS:
            raise ValueError(f"sync_pool must be one of {SYNC_POOLS}, not {sync_pool!r}")
        if sync_pool != "tokens" and not cls_token:
            raise ValueError(f"sync_pool {sync_pool} needs cls_token (the global tokens)")
        s = resolve_size(size)
        if modality_specific_depth is not None:
            s = dataclasses.replace(s, modality_specific_depth=modality_specific_depth)
        super().__init__(label_dim, s, audio_length, num_mel_bins, image_size, tr_pos)
        add_sync_tokens(self, num_register_tokens, cls_token, keep_register_tokens)
        self.sync_pool = sync_pool

    def forward(
        self, audio: "torch.Tensor | None", image: "torch.Tensor | None", mode: str = "multimodal"
    ) -> torch.Tensor:
        """Logits [B, label_dim] of [B, audio_length, F] segments and their [B, 3, H, W] frames (the input a mode
        does not read may be None)."""
        spec = mode_of(mode, "mode")
        streams = {}
        if "a" in spec.inputs:
            streams["a"] = encode_with_sync_tokens(self, self.embed_audio(audio), "a")
        if "v" in spec.inputs:
            streams["v"] = encode_with_sync_tokens(self, self.embed_image(image), "v")
        pooled = []
        if self.sync_pool in ("tokens", "both"):
            first = 1 if self.cls_token else 0
            parts = [x[:, first:] for x in streams.values()]
            x = torch.cat(parts, dim=1)
            passes = []
            for path in spec.joint_paths:
                y = self._joint(x, path).split([p.shape[1] for p in parts], dim=1)
                if self.keep_register_tokens:
                    y = [drop_registers(self, t) for t in y]
                passes.append(torch.cat(y, dim=1).mean(dim=1))
            pooled.append(sum(passes) / len(passes))
        if self.sync_pool in ("global", "both"):
            pooled.append(sum(self._joint(x, m)[:, 0] for m, x in streams.items()) / len(streams))
        return self.mlp_head(sum(pooled) / len(pooled))

    def unused_parameter_names(self, mode: str = "multimodal") -> "set[str]":
        """Trainable parameters that get no gradient in `mode` with this pooling (see CAVMAE's): the joint passes
        are the mode's for `tokens` and the modality passes for `global`; the cls token of a modality not read."""
        spec = mode_of(mode, "mode")
        paths = set()
        if self.sync_pool in ("tokens", "both"):
            paths |= set(spec.joint_paths)
        if self.sync_pool in ("global", "both"):
            paths |= set(spec.inputs)
        names = unused.unused_parameter_names(self, spec.inputs, paths)
        if self.cls_token:
            names |= {f"cls_token_{m}" for m in "av" if m not in spec.inputs}
        return names
