"""CAV-MAE (Gong et al., ICLR 2023): contrastive audio-visual masked autoencoder, and its finetuning models.

Three models share one encoder whose parameter names are those of the official checkpoints, so official weights load
strictly (after stripping the DataParallel `module.` prefix) and our checkpoints load into the official code:

  CAVMAE          pretraining: masked audio and image tokens -> modality-specific encoders -> one joint block ->
                  (a) joint decoder reconstructing both modalities (MAE loss), (b) pooled per-modality vectors
                  (contrastive InfoNCE loss).
  CAVMAEFT        finetuning/inference classifier on all tokens, no decoder; five input modes.
  CAVMAEFTAudio   audio-only finetuning model without any visual parameter.

Input conventions: `audio` is the normalised log-mel fbank [B, T, F] (T = target_length frames, F = mel bins);
`image` is an ImageNet-normalised [B, 3, H, W] frame. The audio is viewed as a one-channel image [B, 1, F, T]:
frequency is the conv "height", time the "width", so audio token k = f * (T/16) + t.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp

from train.pos_embed import get_2d_sincos_pos_embed

PATCH_SIZE = 16
CONTRAST_TEMPERATURE = 0.05  # fixed, not learned (official)
MASK_MODES = ("unstructured", "time", "freq", "tf")


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


def _init_linear_and_norm(m: nn.Module) -> None:
    # xavier_uniform as in the JAX ViT / MAE (qkv initialised as one [3D, D] matrix).
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _check_chunks(batch: int, chunks: int) -> None:
    if chunks < 1 or batch % chunks:
        raise ValueError(f"batch {batch} is not divisible into {chunks} equal chunks")


# --------------------------------------------------------------------------------------------------------------------
# Shared encoder


class _Encoder(nn.Module):
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
        return self.patch_embed_a(audio_as_image(audio)) + self.pos_embed_a + self.modality_a

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, (H/16)(W/16), D] tokens with position and modality embeddings."""
        side = self.image_grid[0] * PATCH_SIZE
        if tuple(image.shape[1:]) != (3, side, side):
            raise ValueError(f"image must be [B, 3, {side}, {side}], got {list(image.shape)}")
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


# Parameters no forward pass ever uses: the `_a`/`_v` norms of modality-specific and decoder blocks.
_DEAD_NORM = re.compile(r"^(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.")


def _joint_param_used(name: str, joint_paths: "set[str | None]") -> bool:
    """Whether a blocks_u / final-norm parameter is touched when the joint block runs with these modality paths."""
    suffix = {None: "", "a": "_a", "v": "_v"}
    if name.startswith("blocks_u."):
        m = re.match(r"^blocks_u\.\d+\.norm[12](_[av])?\.", name)
        return m is None or any((m.group(1) or "") == suffix[p] for p in joint_paths)
    m = re.match(r"^norm(_[av])?\.", name)
    if m:
        return any((m.group(1) or "") == suffix[p] for p in joint_paths)
    return True


# --------------------------------------------------------------------------------------------------------------------
# Pretraining model


class CAVMAE(_Encoder):
    """CAV-MAE pretraining model. Variants by loss weights: AV-MAE (contrast_loss_weight=0) and CAV
    (mae_loss_weight=0, the decoder is kept for the checkpoint layout but never run).

    contrast_chunks=k emulates the official loss under nn.DataParallel over k GPUs: each GPU computed its losses on
    B/k samples and the k scalar losses were summed. So with k chunks every reported term is a sum over chunks: the
    InfoNCE of each chunk (negatives only within the chunk) and the masked-patch MAE mean of each chunk (= k times the
    batch mean). The ratio of the two terms, hence the optimisation under Adam, matches the official runs, and the
    logged numbers match the official logs (e.g. initial loss_c = k * 0.01 * ln(B/k)).
    """

    def __init__(
        self,
        size: "str | dict | ModelSize" = "base",
        target_length: int = 1024,
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
    ):
        super().__init__(size, target_length, num_mel_bins, image_size, tr_pos=False)
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, not {mask_mode!r}")
        for name, r in (("mask_ratio_a", mask_ratio_a), ("mask_ratio_v", mask_ratio_v)):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"{name}={r} must be in [0, 1)")
            if r == 0 and mae_loss_weight != 0:
                raise ValueError(f"{name}=0 leaves nothing to reconstruct; the MAE loss needs masked patches")
        if mae_loss_weight == 0 and contrast_loss_weight == 0:
            raise ValueError("mae_loss_weight and contrast_loss_weight cannot both be 0")
        if contrast_chunks < 1:
            raise ValueError(f"contrast_chunks must be >= 1, got {contrast_chunks}")
        self.mask_ratio_a = mask_ratio_a
        self.mask_ratio_v = mask_ratio_v
        self.mask_mode = mask_mode
        self.norm_pix_loss = norm_pix_loss
        self.mae_loss_weight = mae_loss_weight
        self.contrast_loss_weight = contrast_loss_weight
        self.bidirectional = bidirectional
        self.contrast_chunks = contrast_chunks

        s = self.size
        Dd = s.decoder_embed_dim
        n_a = self.pos_embed_a.shape[1]
        n_v = self.pos_embed_v.shape[1]
        # One mask token for both modalities; the decoder tells them apart by position and modality embeddings.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, n_a, Dd), requires_grad=False)
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, n_v, Dd), requires_grad=False)
        self.decoder_embed = nn.Linear(s.embed_dim, Dd)
        self.decoder_blocks = nn.ModuleList(Block(Dd, s.decoder_num_heads, s.mlp_ratio) for _ in range(s.decoder_depth))
        self.decoder_norm = nn.LayerNorm(Dd)
        self.decoder_pred_a = nn.Linear(Dd, PATCH_SIZE * PATCH_SIZE * 1)
        self.decoder_pred_v = nn.Linear(Dd, PATCH_SIZE * PATCH_SIZE * 3)

        self._init_encoder_weights()
        self.decoder_pos_embed_a.data.copy_(get_2d_sincos_pos_embed(Dd, *self.audio_grid).unsqueeze(0))
        self.decoder_pos_embed_v.data.copy_(get_2d_sincos_pos_embed(Dd, *self.image_grid).unsqueeze(0))
        for token in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(token, std=0.02)
        self.apply(_init_linear_and_norm)

    # ---- masking ----

    def mask_audio(self, x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        noise = None
        if self.mask_mode != "unstructured":
            noise = structured_audio_noise(x.shape[0], self.audio_grid, self.mask_ratio_a, self.mask_mode, x.device)
        return random_masking(x, self.mask_ratio_a, noise)

    # ---- decoder ----

    def _unshuffle(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens after the visible tokens and move every token back to its original position."""
        B, L = ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(B, L - x.shape[1], -1)], dim=1)
        return torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    def forward_decoder(
        self, x_a: torch.Tensor, x_v: torch.Tensor, ids_restore_a: torch.Tensor, ids_restore_v: torch.Tensor
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Visible joint-stream tokens of each modality -> pixel predictions for every audio and visual patch."""
        a = self._unshuffle(self.decoder_embed(x_a), ids_restore_a)
        v = self._unshuffle(self.decoder_embed(x_v), ids_restore_v)
        a = a + self.decoder_pos_embed_a + self.decoder_modality_a
        v = v + self.decoder_pos_embed_v + self.decoder_modality_v
        x = torch.cat([a, v], dim=1)  # audio and visual tokens attend to each other
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        n_a = ids_restore_a.shape[1]
        return self.decoder_pred_a(x[:, :n_a]), self.decoder_pred_v(x[:, n_a:])

    # ---- losses ----

    def mae_loss(self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """Per-patch MSE averaged over removed patches only; summed over `chunks` equal batch chunks.

        target/pred [B, L, P], mask [B, L] (1 = removed). With norm_pix_loss each target patch is standardised by its
        own mean and unbiased variance (the MAE recipe), so the model predicts local structure, not brightness.
        """
        _check_chunks(target.shape[0], chunks)
        target = target.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)
        return sum((lp * m).sum() / m.sum() for lp, m in zip(per_patch.chunk(chunks), mask.chunk(chunks)))

    def contrastive_loss(
        self,
        c_a: torch.Tensor,
        c_v: torch.Tensor,
        bidirectional: "bool | None" = None,
        chunks: "int | None" = None,
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """InfoNCE (tau 0.05) between pooled audio and visual vectors [B, D] -> (loss summed over chunks, accuracy).

        Similarity s[i, j] = <audio_i, visual_j> / tau. The official single-direction loss takes the softmax over
        dim 0: each visual j must pick its audio among the chunk's audios. `bidirectional` averages it with the
        audio->visual direction. Accuracy is the argmax hit rate of the same softmax, averaged over chunks.
        Runs in fp32 even under autocast: with tau = 0.05 the logits reach +-20, where bf16 steps are 0.125.
        Call it on all-gathered vectors (with chunks=1) for a global-negatives loss.
        """
        bidirectional = self.bidirectional if bidirectional is None else bidirectional
        chunks = self.contrast_chunks if chunks is None else chunks
        _check_chunks(c_a.shape[0], chunks)
        with torch.autocast(device_type=c_a.device.type, enabled=False):
            c_a = F.normalize(c_a.float(), dim=-1)
            c_v = F.normalize(c_v.float(), dim=-1)
            losses, accs = [], []
            for a, v in zip(c_a.chunk(chunks), c_v.chunk(chunks)):
                sim = a @ v.T / CONTRAST_TEMPERATURE
                target = torch.arange(sim.shape[0], device=sim.device)
                directions = [sim.T, sim] if bidirectional else [sim.T]  # rows of each: the softmax axis
                losses.append(sum(F.cross_entropy(logits, target) for logits in directions) / len(directions))
                accs.append(sum((logits.argmax(1) == target).float().mean() for logits in directions) / len(directions))
            return torch.stack(losses).sum(), torch.stack(accs).mean()

    # ---- forward ----

    def forward(self, audio: torch.Tensor, image: torch.Tensor) -> "dict[str, torch.Tensor]":
        """One pretraining step's losses.

        Returns loss (the total to backpropagate), loss_mae = mae_loss_weight * (loss_mae_a + loss_mae_v),
        loss_mae_a and loss_mae_v (unweighted), loss_c = contrast_loss_weight * InfoNCE and c_acc (as the official
        code returns and logs them), mask_a / mask_v (1 = removed), and, when computed, pred_a / pred_v (decoder
        outputs, patchified) and c_a / c_v (pooled, un-normalised contrastive vectors, for a global loss).
        """
        a, mask_a, ids_restore_a = self.mask_audio(self.embed_audio(audio))
        v, mask_v, ids_restore_v = random_masking(self.embed_image(image), self.mask_ratio_v)
        a = self._specific(a, self.blocks_a)
        v = self._specific(v, self.blocks_v)

        zero = audio.new_zeros((), dtype=torch.float32)
        out = {"mask_a": mask_a, "mask_v": mask_v}
        loss_mae_a = loss_mae_v = loss_c = c_acc = zero
        if self.mae_loss_weight != 0:
            x_a, x_v = self._joint(torch.cat([a, v], dim=1), None).split([a.shape[1], v.shape[1]], dim=1)
            pred_a, pred_v = self.forward_decoder(x_a, x_v, ids_restore_a, ids_restore_v)
            loss_mae_a = self.mae_loss(patchify(audio_as_image(audio)), pred_a, mask_a, self.contrast_chunks)
            loss_mae_v = self.mae_loss(patchify(image), pred_v, mask_v, self.contrast_chunks)
            out.update(pred_a=pred_a, pred_v=pred_v)
        if self.contrast_loss_weight != 0:
            c_a = self._joint(a, "a").mean(dim=1)
            c_v = self._joint(v, "v").mean(dim=1)
            nce, c_acc = self.contrastive_loss(c_a, c_v)
            loss_c = self.contrast_loss_weight * nce
            out.update(c_a=c_a, c_v=c_v)
        loss_mae = self.mae_loss_weight * (loss_mae_a + loss_mae_v)
        out.update(
            loss=loss_mae + loss_c, loss_mae=loss_mae, loss_mae_a=loss_mae_a, loss_mae_v=loss_mae_v,
            loss_c=loss_c, c_acc=c_acc,
        )
        return out

    def unused_parameter_names(self) -> "set[str]":
        """Trainable parameters that get no gradient with the current loss weights (freeze them before wrapping in
        DistributedDataParallel, or use find_unused_parameters=True). Always includes the dead block norms."""
        joint_paths = set()
        if self.mae_loss_weight != 0:
            joint_paths.add(None)
        if self.contrast_loss_weight != 0:
            joint_paths.update(("a", "v"))
        unused = set()
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            skipped_decoder = self.mae_loss_weight == 0 and (name.startswith("decoder") or name == "mask_token")
            if _DEAD_NORM.match(name) or skipped_decoder or not _joint_param_used(name, joint_paths):
                unused.add(name)
        return unused


# --------------------------------------------------------------------------------------------------------------------
# Finetuning models

# mode -> (modalities fed in, joint-block passes averaged after pooling). The "missing*" modes serve a model finetuned
# on both modalities when one is absent at test time; the official names read "missing<other>, <this>only":
# missingaudioonly takes ONLY AUDIO (the video is missing) and averages the shared-norm and audio-norm passes.
FT_MODES = {
    "multimodal": ("av", (None,)),
    "audioonly": ("a", ("a",)),
    "videoonly": ("v", ("v",)),
    "missingaudioonly": ("a", (None, "a")),
    "missingvideoonly": ("v", (None, "v")),
}


class CAVMAEFT(_Encoder):
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
        self.apply(_init_linear_and_norm)

    def forward(
        self, audio: "torch.Tensor | None", image: "torch.Tensor | None", mode: str = "multimodal"
    ) -> torch.Tensor:
        """Logits [B, label_dim]. The input a mode does not use may be None."""
        if mode not in FT_MODES:
            raise ValueError(f"mode must be one of {sorted(FT_MODES)}, not {mode!r}")
        inputs, joint_paths = FT_MODES[mode]
        streams = []
        if "a" in inputs:
            streams.append(self._specific(self.embed_audio(audio), self.blocks_a))
        if "v" in inputs:
            streams.append(self._specific(self.embed_image(image), self.blocks_v))
        x = torch.cat(streams, dim=1)
        pooled = [self._joint(x, path).mean(dim=1) for path in joint_paths]
        return self.mlp_head(sum(pooled) / len(pooled))

    def unused_parameter_names(self, mode: str = "multimodal") -> "set[str]":
        """Trainable parameters that get no gradient in `mode` (see CAVMAE.unused_parameter_names)."""
        return _unused_finetune_parameters(self, mode)


class CAVMAEFTAudio(_Encoder):
    """Audio-only finetuning model: CAVMAEFT's audio path ('audioonly' mode) without any visual parameter.

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
        self.apply(_init_linear_and_norm)

    def forward(
        self, audio: torch.Tensor, image: "torch.Tensor | None" = None, mode: str = "audioonly"
    ) -> torch.Tensor:
        """Logits [B, label_dim]; `image` and `mode` exist so the finetuning loop can treat it like CAVMAEFT."""
        if mode != "audioonly":
            raise ValueError(f"CAVMAEFTAudio only supports mode 'audioonly', not {mode!r}")
        return self.mlp_head(self.forward_feat(audio).mean(dim=1))

    def forward_feat(self, audio: torch.Tensor) -> torch.Tensor:
        """Unmasked, un-pooled audio stream [B, Na, D] after norm_a."""
        return self._joint(self._specific(self.embed_audio(audio), self.blocks_a), "a")

    def unused_parameter_names(self, mode: str = "audioonly") -> "set[str]":
        """Trainable parameters that never get a gradient (the shared-norm path and the dead norms)."""
        return _unused_finetune_parameters(self, mode)


def _unused_finetune_parameters(model: _Encoder, mode: str) -> "set[str]":
    inputs, joint_paths = FT_MODES[mode]
    unused = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = re.match(r"^(modality|pos_embed|patch_embed|blocks)_([av])\b", name)
        other_modality = m is not None and m.group(2) not in inputs
        if _DEAD_NORM.match(name) or other_modality or not _joint_param_used(name, set(joint_paths)):
            unused.add(name)
    return unused


# --------------------------------------------------------------------------------------------------------------------
# Builders from the `model:` config section (plain dicts)

_GEOMETRY_KEYS = {"size", "target_length", "num_mel_bins", "image_size"}
_PRETRAIN_KEYS = {
    "mask_ratio_a", "mask_ratio_v", "mask_mode", "norm_pix_loss", "mae_loss_weight", "contrast_loss_weight",
    "bidirectional", "contrast_chunks",
}
_FINETUNE_KEYS = {"tr_pos"}


def _split_cfg(cfg: dict) -> "tuple[dict, dict, dict]":
    """One `model:` section serves both stages: split it into geometry, pretraining and finetuning keywords."""
    unknown = set(cfg) - _GEOMETRY_KEYS - _PRETRAIN_KEYS - _FINETUNE_KEYS
    if unknown:
        raise ValueError(f"unknown model config keys: {sorted(unknown)}")
    groups = (_GEOMETRY_KEYS, _PRETRAIN_KEYS, _FINETUNE_KEYS)
    return tuple({k: v for k, v in cfg.items() if k in keys} for keys in groups)


def build_pretrain_model(cfg: dict) -> CAVMAE:
    """CAVMAE from the model config (finetuning-only keys are ignored)."""
    geometry, pretrain, _ = _split_cfg(cfg)
    return CAVMAE(**geometry, **pretrain)


def build_finetune_model(cfg: dict, label_dim: int, audio_only: bool = False) -> "CAVMAEFT | CAVMAEFTAudio":
    """CAVMAEFT (or CAVMAEFTAudio) from the model config (pretraining-only keys are ignored)."""
    geometry, _, finetune = _split_cfg(cfg)
    if audio_only:
        geometry.pop("image_size", None)
        return CAVMAEFTAudio(label_dim, **geometry, **finetune)
    return CAVMAEFT(label_dim, **geometry, **finetune)
