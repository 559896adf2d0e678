"""The pieces every CAV-MAE model is made of: sizes, the transformer block, patch embedding, patch (un)folding,
MAE masking and the weight initialisation.

PATCH_SIZE is the one patch side for audio and images: audio is viewed as a one-channel [F, T] image (see
train/model/encoder.py), so audio and image tokens are cut and restored by the same functions.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.layers import Attention, Mlp

from cavmae.train.settings import MASK_MODES  # noqa: F401  (the one table: `model.mask_mode`'s choices)

PATCH_SIZE = 16


# --------------------------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class ModelSize:
    """Architecture hyper-parameters. `depth` counts modality-specific plus joint blocks, as in the paper's ViT-B."""

    embed_dim: int
    num_heads: int
    depth: int
    modality_specific_depth: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0


MODEL_SIZES = {
    # The only size the paper and the official checkpoints use.
    "base": ModelSize(768, 12, 12, 11, 512, 8, 16),
    # For tests and smoke runs on CPU.
    "tiny": ModelSize(64, 4, 2, 1, 32, 1, 4),
}


def resolve_size(size: "str | dict | ModelSize") -> ModelSize:
    """A name from MODEL_SIZES, a dict with every ModelSize field, or a ModelSize."""
    if isinstance(size, ModelSize):
        return size
    if isinstance(size, str):
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; known: {sorted(MODEL_SIZES)}")
        return MODEL_SIZES[size]
    if isinstance(size, dict):
        return ModelSize(**size)
    raise TypeError(f"size must be a name, a dict or a ModelSize, not {type(size).__name__}")



# --------------------------------------------------------------------------------------------------------------------
# Building blocks


class Block(nn.Module):
    """Pre-norm transformer block whose attention and MLP are shared across modalities but whose LayerNorms are not.

    The joint block of CAV-MAE sees three kinds of input: the concatenated audio-visual sequence (norm1/norm2), audio
    alone (norm1_a/norm2_a) and images alone (norm1_v/norm2_v); separate norms let one set of weights serve
    differently distributed inputs. Every block owns all six norms because the official code builds every block
    alike, so the unused `_a`/`_v` norms of modality-specific and decoder blocks are dead weights kept for checkpoint
    compatibility.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        # Registration order fixes the state-dict order, which follows the official checkpoints.
        self.norm1 = nn.LayerNorm(dim)
        self.norm1_a = nn.LayerNorm(dim)
        self.norm1_v = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.norm2_a = nn.LayerNorm(dim)
        self.norm2_v = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, modality: "str | None" = None) -> torch.Tensor:
        if modality is None:
            norm1, norm2 = self.norm1, self.norm2
        elif modality == "a":
            norm1, norm2 = self.norm1_a, self.norm2_a
        elif modality == "v":
            norm1, norm2 = self.norm1_v, self.norm2_v
        else:
            raise ValueError(f"modality must be None, 'a' or 'v', not {modality!r}")
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping 16x16 patches -> tokens, row-major over the patch grid."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def audio_as_image(audio: torch.Tensor) -> torch.Tensor:
    """[B, T, F] fbank -> [B, 1, F, T]: frequency becomes the image height, time the width (official layout)."""
    return audio.unsqueeze(1).transpose(2, 3)


def patchify(imgs: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/16)(W/16), 16*16*C]; tokens in conv order, pixels inside a patch in (row, col, chan)."""
    B, C, H, W = imgs.shape
    h, w = H // PATCH_SIZE, W // PATCH_SIZE
    x = imgs.reshape(B, C, h, PATCH_SIZE, w, PATCH_SIZE)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, PATCH_SIZE * PATCH_SIZE * C)


def unpatchify(x: torch.Tensor, channels: int, grid: "tuple[int, int]") -> torch.Tensor:
    """Inverse of patchify: [B, h*w, 16*16*C] -> [B, C, 16h, 16w]."""
    h, w = grid
    B = x.shape[0]
    x = x.reshape(B, h, w, PATCH_SIZE, PATCH_SIZE, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * PATCH_SIZE, w * PATCH_SIZE)


# --------------------------------------------------------------------------------------------------------------------
# Masking


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: "torch.Tensor | None" = None
) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """MAE per-sample random masking: keep the int(L * (1 - mask_ratio)) tokens with the lowest noise.

    Returns the kept tokens [B, keep, D] (in shuffled order), the mask [B, L] (1 = removed, in original order) and
    ids_restore [B, L], the permutation that puts [kept, removed] tokens back in their original order.
    """
    B, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, L, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_kept, mask, ids_restore


def structured_audio_noise(
    batch: int, grid: "tuple[int, int]", mask_ratio: float, mode: str, device: "torch.device | None" = None
) -> torch.Tensor:
    """Masking noise [B, F*T] for the audio ablations: whole time columns and/or frequency rows forced out.

    Chosen columns/rows get noise 1.1 (> any uniform sample), so random_masking removes them first; the rest of the
    removal budget, if any, is random. 'time' picks int(T*r) columns, 'freq' int(F*r) rows, and 'tf' int(T*r*0.7)
    columns plus int(F*r*0.7) rows (the official recipe).
    """
    n_freq, n_time = grid
    noise = torch.rand(batch, n_freq, n_time, device=device)

    def pick(n: int, k: int) -> torch.Tensor:  # [B, n] bool, k distinct positions per sample
        order = torch.rand(batch, n, device=device).argsort(dim=1)
        return torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, order[:, :k], True)

    if mode == "time":
        cols, rows = pick(n_time, int(n_time * mask_ratio)), None
    elif mode == "freq":
        cols, rows = None, pick(n_freq, int(n_freq * mask_ratio))
    elif mode == "tf":
        cols, rows = pick(n_time, int(n_time * mask_ratio * 0.7)), pick(n_freq, int(n_freq * mask_ratio * 0.7))
    else:
        raise ValueError(f"structured mask mode must be time, freq or tf, not {mode!r}")
    if cols is not None:
        noise = noise.masked_fill(cols[:, None, :], 1.1)
    if rows is not None:
        noise = noise.masked_fill(rows[:, :, None], 1.1)
    return noise.reshape(batch, n_freq * n_time)


# --------------------------------------------------------------------------------------------------------------------
# Initialisation


def init_linear_and_norm(m: nn.Module) -> None:
    """xavier_uniform Linear with zero bias, unit LayerNorm (as in the JAX ViT / MAE: qkv initialised as one
    [3D, D] matrix). Applied with `model.apply` after every submodule exists."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)

