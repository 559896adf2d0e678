"""The encoder every CAV-MAE model shares: embeddings, modality-specific blocks, the joint block(s), final norms.

Its parameter names are those of the official checkpoints, so official weights load strictly (after stripping the
DataParallel `module.` prefix) and our checkpoints load into the official code.

Input conventions: `audio` is the normalised log-mel fbank [B, T, F] (T = target_length frames, F = mel bins);
`image` is an ImageNet-normalised [B, 3, H, W] frame; both are cast to the dtype of the weights (bf16 working
weights take fp32 inputs). The audio is viewed as a one-channel image [B, 1, F, T]:
frequency is the conv "height", time the "width", so audio token k = f * (T/16) + t.
"""

import torch
import torch.nn as nn

from cavmae.train.model.blocks import PATCH_SIZE, Block, ModelSize, PatchEmbed, audio_as_image, resolve_size
from cavmae.train.pos_embed import get_2d_sincos_pos_embed


class Encoder(nn.Module):
    """Embeddings, modality-specific blocks, the joint block(s) and the three final norms, under official names.

    `image_size=None` leaves out every visual parameter (CAVMAEFTAudio).
    """

    def __init__(
        self,
        size: "str | dict | ModelSize",
        target_length: int,
        num_mel_bins: int,
        image_size: "int | None",
        tr_pos: bool,
    ):
        super().__init__()
        geometry = {"target_length": target_length, "num_mel_bins": num_mel_bins, "image_size": image_size}
        for name, value in geometry.items():
            if value is not None and (value <= 0 or value % PATCH_SIZE):
                raise ValueError(f"{name}={value} must be a positive multiple of {PATCH_SIZE}")
        s = resolve_size(size)
        if not 0 <= s.modality_specific_depth <= s.depth:
            raise ValueError(f"modality_specific_depth {s.modality_specific_depth} not in [0, depth={s.depth}]")
        self.size = s
        self.audio_grid = (num_mel_bins // PATCH_SIZE, target_length // PATCH_SIZE)  # (freq rows, time columns)
        with_visual = image_size is not None
        self.image_grid = (image_size // PATCH_SIZE, image_size // PATCH_SIZE) if with_visual else None
        D = s.embed_dim
        n_a = self.audio_grid[0] * self.audio_grid[1]
        n_v = self.image_grid[0] * self.image_grid[1] if with_visual else 0

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(D, s.num_heads, s.mlp_ratio) for _ in range(n))

        # Audio and visual members interleave to reproduce the official state-dict order.
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        if with_visual:
            self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, n_a, D), requires_grad=tr_pos)
        if with_visual:
            self.pos_embed_v = nn.Parameter(torch.zeros(1, n_v, D), requires_grad=tr_pos)
        self.patch_embed_a = PatchEmbed(1, D)
        if with_visual:
            self.patch_embed_v = PatchEmbed(3, D)
        self.blocks_a = blocks(s.modality_specific_depth)
        if with_visual:
            self.blocks_v = blocks(s.modality_specific_depth)
        self.blocks_u = blocks(s.depth - s.modality_specific_depth)
        self.norm_a = nn.LayerNorm(D)
        if with_visual:
            self.norm_v = nn.LayerNorm(D)
        self.norm = nn.LayerNorm(D)

    def _init_encoder_weights(self) -> None:
        """Sin-cos position tables, xavier patch convs (as a flat Linear), N(0, 0.02) modality tokens."""
        D = self.size.embed_dim
        self.pos_embed_a.data.copy_(get_2d_sincos_pos_embed(D, *self.audio_grid).unsqueeze(0))
        patch_embeds, modality_tokens = [self.patch_embed_a], [self.modality_a]
        if self.image_grid is not None:
            self.pos_embed_v.data.copy_(get_2d_sincos_pos_embed(D, *self.image_grid).unsqueeze(0))
            patch_embeds.append(self.patch_embed_v)
            modality_tokens.append(self.modality_v)
        for pe in patch_embeds:
            w = pe.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for token in modality_tokens:
            nn.init.normal_(token, std=0.02)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, F] fbank -> [B, (F/16)(T/16), D] tokens with position and modality embeddings."""
        expected = (self.audio_grid[1] * PATCH_SIZE, self.audio_grid[0] * PATCH_SIZE)
        if tuple(audio.shape[1:]) != expected:
            raise ValueError(f"audio must be [B, target_length, num_mel_bins] = [B, {expected[0]}, {expected[1]}], "
                             f"got {list(audio.shape)}")
        audio = audio.to(self.patch_embed_a.proj.weight.dtype)  # a no-op, but for bf16 weights (train/precision.py)
        return self.patch_embed_a(audio_as_image(audio)) + self.pos_embed_a + self.modality_a

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H/16)(W/16), D] tokens with position and modality embeddings."""
        side = self.image_grid[0] * PATCH_SIZE
        if tuple(image.shape[1:]) != (3, side, side):
            raise ValueError(f"image must be [B, 3, {side}, {side}], got {list(image.shape)}")
        image = image.to(self.patch_embed_v.proj.weight.dtype)
        return self.patch_embed_v(image) + self.pos_embed_v + self.modality_v

    @staticmethod
    def _specific(x: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        for blk in blocks:
            x = blk(x)
        return x

    def _joint(self, x: torch.Tensor, modality: "str | None") -> torch.Tensor:
        """The joint block(s) with the norms of `modality` (None: the shared ones), then the matching final norm.

        The official code runs `for blk in blocks_u: ca = blk(a, 'a')` for the single-modality passes, which only
        equals chaining when there is one joint block (always the case in practice); we chain.
        """
        for blk in self.blocks_u:
            x = blk(x, modality)
        if modality is None:
            return self.norm(x)
        return self.norm_a(x) if modality == "a" else self.norm_v(x)

    def forward_feat(self, audio: torch.Tensor, image: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """Unmasked, un-pooled audio [B, Na, D] and visual [B, Nv, D] streams after norm_a / norm_v (retrieval)."""
        return self.audio_feat(audio), self.visual_feat(image)

    def audio_feat(self, audio: torch.Tensor) -> torch.Tensor:
        """The audio stream of `forward_feat` alone (the two streams do not interact there)."""
        return self._joint(self._specific(self.embed_audio(audio), self.blocks_a), "a")

    def visual_feat(self, image: torch.Tensor) -> torch.Tensor:
        """The visual stream of `forward_feat` alone: several frames of one clip cost no audio pass each."""
        return self._joint(self._specific(self.embed_image(image), self.blocks_v), "v")
