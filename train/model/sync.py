"""CAVMAESync, the pretraining model of CAV-MAE Sync (Araujo, Rouditchenko, Gong et al., CVPR 2025, arXiv 2505.01237).

CAV-MAE sees one 10 s spectrogram beside one random frame. Sync pairs every frame with the short audio segment
centred on it (train/segments.py) and changes the encoder in three ways, each an option of the released class
(github edsonroteia/cav-mae-sync, src/models/cav_mae_sync.py), whose keyword names this constructor takes:

  cls_token            a learned global token per modality, prepended before the modality-specific blocks. The
                       contrastive loss takes it (after norm_a / norm_v) instead of the mean of the patch tokens, and
                       the joint stream feeding the decoder drops it: contrast and reconstruction get separate outputs.
  global_local_losses  with cls tokens: the contrastive loss is the mean of the global (cls) loss and the local one
                       (mean of the patch tokens), as the released code computes it.
  num_register_tokens  n learned register tokens per modality (one [2n, D] parameter: audio's first), appended after
                       the patches for the modality-specific blocks and dropped before the joint block, unless
                       keep_register_tokens keeps them through it (then they are dropped after it).
  contrastive_heads    two more blocks per modality on the contrastive path, after the joint block (names as
                       released: `constrative_head_audio`, `constrative_head_visual`).
  total_frame          frames per clip; the model itself runs on single (frame, segment) pairs.
  audio_length         fbank rows of one segment (released: 416 for 4 s), the model's target_length.

Three departures from the released code, none visible in the configuration of its checkpoint (one joint block,
registers not kept): the contrastive passes chain the joint blocks (released: each block applied to the
modality-specific output, so only the last one counts), as CAVMAE does; with keep_register_tokens, the registers
are dropped from the joint stream after it (released: cut at offsets counted in all audio patches while the stream
holds the visible ones only, which drops visual tokens and keeps the audio registers); and `sync_features` drops
kept registers from the local tokens too (released `forward_feat` returns them among them).
"""

import dataclasses
import re

import torch
import torch.nn as nn

from cavmae.train.model.blocks import (
    Block,
    ModelSize,
    audio_as_image,
    init_linear_and_norm,
    patchify,
    random_masking,
    resolve_size,
)
from cavmae.train.model.pretraining import CAVMAE


class CAVMAESync(CAVMAE):
    """CAV-MAE Sync pretraining model: CAVMAE's decoder and losses, with global tokens, registers and contrastive
    heads. A state dict of the released class loads strictly (after stripping `module.`)."""

    def __init__(
        self,
        size: "str | dict | ModelSize" = "base",
        audio_length: int = 416,
        num_mel_bins: int = 128,
        image_size: int = 224,
        mask_ratio_a: float = 0.75,
        mask_ratio_v: float = 0.75,
        mask_mode: str = "unstructured",
        norm_pix_loss: bool = True,
        mae_loss_weight: float = 1.0,
        contrast_loss_weight: float = 0.01,
        bidirectional: bool = False,
        contrast_chunks: int = 1,
        modality_specific_depth: "int | None" = None,
        num_register_tokens: int = 8,
        cls_token: bool = True,
        global_local_losses: bool = False,
        contrastive_heads: bool = False,
        keep_register_tokens: bool = False,
        total_frame: int = 16,
    ):
        s = resolve_size(size)
        if modality_specific_depth is not None:
            s = dataclasses.replace(s, modality_specific_depth=modality_specific_depth)
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if global_local_losses and not cls_token:
            raise ValueError("global_local_losses needs cls_token (the global loss is on the cls tokens)")
        if total_frame < 1:
            raise ValueError(f"total_frame must be >= 1, got {total_frame}")
        super().__init__(s, audio_length, num_mel_bins, image_size, mask_ratio_a, mask_ratio_v, mask_mode,
                         norm_pix_loss, mae_loss_weight, contrast_loss_weight, bidirectional, contrast_chunks)
        add_sync_tokens(self, num_register_tokens, cls_token, keep_register_tokens)
        self.global_local_losses = global_local_losses
        self.contrastive_heads = contrastive_heads
        self.total_frame = total_frame
        D = s.embed_dim
        if contrastive_heads:
            self.constrative_head_audio = nn.ModuleList(Block(D, s.num_heads, s.mlp_ratio) for _ in range(2))
            self.constrative_head_visual = nn.ModuleList(Block(D, s.num_heads, s.mlp_ratio) for _ in range(2))
            self.constrative_head_audio.apply(init_linear_and_norm)
            self.constrative_head_visual.apply(init_linear_and_norm)
        _reorder(self._parameters, _RELEASED_PARAMETER_ORDER)
        _reorder(self._modules, _RELEASED_MODULE_ORDER)

    # ---- token bookkeeping ----

    def _encode(self, a: torch.Tensor, v: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """Modality-specific blocks on [cls] + tokens + [registers]; the registers leave here unless kept."""
        return encode_with_sync_tokens(self, a, "a"), encode_with_sync_tokens(self, v, "v")

    def _contrastive_tokens(self, x: torch.Tensor, modality: str) -> "tuple[torch.Tensor | None, torch.Tensor]":
        """(global token [B, D] or None, local patch tokens [B, N, D]), both after norm_a / norm_v: the joint
        block(s) with the modality's norms, the contrastive heads if any, registers dropped."""
        for blk in self.blocks_u:
            x = blk(x, modality)
        if self.contrastive_heads:
            for blk in self.constrative_head_audio if modality == "a" else self.constrative_head_visual:
                x = blk(x)
        if self.keep_register_tokens:
            x = drop_registers(self, x)
        x = self.norm_a(x) if modality == "a" else self.norm_v(x)  # per token: norming cls alone is the same
        return (x[:, 0], x[:, 1:]) if self.cls_token else (None, x)

    def _joint_stream(self, a: torch.Tensor, v: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        """The visible patch tokens of each modality after the joint block(s) and `norm`, for the decoder: the cls
        tokens stay out of the joint stream; kept registers go through it and are dropped after it."""
        if self.cls_token:
            a, v = a[:, 1:], v[:, 1:]
        x = self._joint(torch.cat([a, v], dim=1), None)
        x_a, x_v = x.split([a.shape[1], v.shape[1]], dim=1)
        if self.keep_register_tokens:
            x_a, x_v = drop_registers(self, x_a), drop_registers(self, x_v)
        return x_a, x_v

    # ---- forward ----

    def forward(
        self, audio: torch.Tensor, image: torch.Tensor,
        noise: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    ) -> "dict[str, torch.Tensor]":
        """One pretraining step's losses on [B, audio_length, F] segments and their [B, 3, H, W] frames.

        The keys are CAVMAE.forward's; c_a / c_v are the vectors the contrastive loss compares (the global tokens
        with cls_token, else the mean of the local tokens), and with global_local_losses loss_c_global and
        loss_c_local (weighted) are added. `noise` ([B, Na], [B, Nv]) fixes the masking (tests; default random).
        """
        noise_a, noise_v = noise if noise is not None else (None, None)
        if noise_a is None and self.mask_mode != "unstructured":
            a, mask_a, ids_restore_a = self.mask_audio(self.embed_audio(audio))
        else:
            a, mask_a, ids_restore_a = random_masking(self.embed_audio(audio), self.mask_ratio_a, noise_a)
        v, mask_v, ids_restore_v = random_masking(self.embed_image(image), self.mask_ratio_v, noise_v)
        a, v = self._encode(a, v)

        zero = audio.new_zeros((), dtype=torch.float32)
        out = {"mask_a": mask_a, "mask_v": mask_v}
        loss_mae_a = loss_mae_v = loss_c = c_acc = zero
        if self.mae_loss_weight != 0:
            pred_a, pred_v = self.forward_decoder(*self._joint_stream(a, v), ids_restore_a, ids_restore_v)
            loss_mae_a = self.mae_loss(patchify(audio_as_image(audio)), pred_a, mask_a, self.contrast_chunks)
            loss_mae_v = self.mae_loss(patchify(image), pred_v, mask_v, self.contrast_chunks)
            out.update(pred_a=pred_a, pred_v=pred_v)
        if self.contrast_loss_weight != 0:
            g_a, l_a = self._contrastive_tokens(a, "a")
            g_v, l_v = self._contrastive_tokens(v, "v")
            local = (l_a.mean(dim=1), l_v.mean(dim=1))
            c_a, c_v = (g_a, g_v) if self.cls_token else local
            nce, c_acc = self.contrastive_loss(c_a, c_v)
            if self.global_local_losses:
                nce_local, acc_local = self.contrastive_loss(*local)
                out.update(loss_c_global=self.contrast_loss_weight * nce, loss_c_local=self.contrast_loss_weight
                           * nce_local)
                nce, c_acc = (nce + nce_local) / 2, (c_acc + acc_local) / 2
            loss_c = self.contrast_loss_weight * nce
            out.update(c_a=c_a, c_v=c_v)
        loss_mae = self.mae_loss_weight * (loss_mae_a + loss_mae_v)
        out.update(
            loss=loss_mae + loss_c, loss_mae=loss_mae, loss_mae_a=loss_mae_a, loss_mae_v=loss_mae_v,
            loss_c=loss_c, c_acc=c_acc,
        )
        return out

    def sync_features(self, audio: torch.Tensor, image: torch.Tensor) -> "dict[str, torch.Tensor]":
        """Unmasked features of (segment, frame) pairs, as the released `forward_feat`: local patch tokens
        `tokens_a` [B, Na, D] / `tokens_v` [B, Nv, D] and, with cls_token, the global tokens `global_a` / `global_v`
        [B, D], all after norm_a / norm_v."""
        a, v = self._encode(self.embed_audio(audio), self.embed_image(image))
        g_a, l_a = self._contrastive_tokens(a, "a")
        g_v, l_v = self._contrastive_tokens(v, "v")
        out = {"tokens_a": l_a, "tokens_v": l_v}
        if self.cls_token:
            out.update(global_a=g_a, global_v=g_v)
        return out

    def unused_parameter_names(self) -> "set[str]":
        """CAVMAE's, plus the modality norms of the contrastive heads (they run with the shared norms), and the
        heads themselves without a contrastive loss."""
        heads = {n for n, p in self.named_parameters() if p.requires_grad and n.startswith("constrative_head_")}
        dead = {n for n in heads if re.search(r"\.norm[12]_[av]\.", n)}
        return super().unused_parameter_names() | dead | (heads if self.contrast_loss_weight == 0 else set())


# ---- the tokens Sync adds, shared with the finetuning model (train/model/sync_finetuning.py) ----


def add_sync_tokens(model: nn.Module, num_register_tokens: int, cls_token: bool, keep_register_tokens: bool) -> None:
    """Give `model` (an Encoder) the released parameters `register_tokens` [2n, D] (audio's first; N(0, 1) as
    released) and `cls_token_a` / `cls_token_v` [1, 1, D] (N(0, 0.02)), and the options that use them."""
    D = model.size.embed_dim
    model.num_register_tokens = num_register_tokens
    model.cls_token = cls_token
    model.keep_register_tokens = keep_register_tokens
    if num_register_tokens:
        model.register_tokens = nn.Parameter(torch.randn(2 * num_register_tokens, D))
    if cls_token:
        model.cls_token_a = nn.Parameter(torch.zeros(1, 1, D))
        model.cls_token_v = nn.Parameter(torch.zeros(1, 1, D))
        nn.init.normal_(model.cls_token_a, std=0.02)
        nn.init.normal_(model.cls_token_v, std=0.02)


def with_sync_tokens(model: nn.Module, x: torch.Tensor, modality: str) -> torch.Tensor:
    """[cls] + patch tokens + [registers] for one modality (audio's registers are the first n rows)."""
    B, n = x.shape[0], model.num_register_tokens
    parts = []
    if model.cls_token:
        parts.append((model.cls_token_a if modality == "a" else model.cls_token_v).expand(B, -1, -1))
    parts.append(x)
    if n:
        regs = model.register_tokens[:n] if modality == "a" else model.register_tokens[n:]
        parts.append(regs.unsqueeze(0).expand(B, -1, -1))
    return torch.cat(parts, dim=1)


def drop_registers(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` [B, N, D] without its last num_register_tokens tokens (the registers)."""
    n = model.num_register_tokens
    return x[:, : x.shape[1] - n] if n else x


def encode_with_sync_tokens(model: nn.Module, x: torch.Tensor, modality: str) -> torch.Tensor:
    """Embedded tokens of one modality -> its modality-specific blocks on [cls] + tokens + [registers]; the
    registers leave here unless kept through the joint block."""
    x = model._specific(with_sync_tokens(model, x, modality), model.blocks_a if modality == "a" else model.blocks_v)
    return x if model.keep_register_tokens else drop_registers(model, x)


# The released class's registration order, hence its state-dict order: our checkpoints list their keys as its do.
_RELEASED_PARAMETER_ORDER = ("modality_a", "modality_v", "pos_embed_a", "pos_embed_v", "register_tokens", "mask_token",
                             "decoder_modality_a", "decoder_modality_v", "decoder_pos_embed_a", "decoder_pos_embed_v",
                             "cls_token_a", "cls_token_v")
_RELEASED_MODULE_ORDER = ("patch_embed_a", "patch_embed_v", "blocks_a", "blocks_v", "blocks_u",
                          "constrative_head_audio", "constrative_head_visual", "norm_a", "norm_v", "norm",
                          "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred_a", "decoder_pred_v")


def _reorder(members: dict, order: "tuple[str, ...]") -> None:
    """Put a module's own parameters or submodules (nn.Module keeps them in plain dicts, in registration order) in
    `order`; members not named there keep their place after them."""
    items = [(k, members.pop(k)) for k in order if k in members] + list(members.items())
    members.clear()
    members.update(items)
