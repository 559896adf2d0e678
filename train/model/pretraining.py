"""CAVMAE, the pretraining model (Gong et al., ICLR 2023): masked audio and image tokens -> modality-specific encoders
-> one joint block -> (a) a joint decoder reconstructing both modalities (MAE loss), (b) pooled per-modality vectors
(contrastive InfoNCE loss).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from cavmae.shards.config import check_setting
from cavmae.train.model import unused
from cavmae.train.model.blocks import (
    PATCH_SIZE,
    Block,
    ModelSize,
    audio_as_image,
    init_linear_and_norm,
    patchify,
    random_masking,
    structured_audio_noise,
)
from cavmae.train.model.encoder import Encoder
from cavmae.train.pos_embed import get_2d_sincos_pos_embed
from cavmae.train.settings import Model, loss_problem

CONTRAST_TEMPERATURE = 0.05  # fixed, not learned (official)


def _check_chunks(batch: int, chunks: int) -> None:
    if chunks < 1 or batch % chunks:
        raise ValueError(f"batch {batch} is not divisible into {chunks} equal chunks")


class CAVMAE(Encoder):
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
        for name, value in (("mask_mode", mask_mode), ("mask_ratio_a", mask_ratio_a), ("mask_ratio_v", mask_ratio_v),
                            ("mae_loss_weight", mae_loss_weight), ("contrast_loss_weight", contrast_loss_weight),
                            ("contrast_chunks", contrast_chunks)):
            check_setting(Model, f"model.{name}", value, "CAVMAE")  # the `model:` settings' choices and ranges
        problem = loss_problem(mask_ratio_a, mask_ratio_v, mae_loss_weight, contrast_loss_weight)
        if problem:
            raise ValueError(problem)
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
        self.apply(init_linear_and_norm)

    # ---- masking ----

    def mask_audio(self, x: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
        noise = None
        if self.mask_mode != "unstructured":
            noise = structured_audio_noise(x.shape[0], self.audio_grid, self.mask_ratio_a, self.mask_mode, x.device)
        return random_masking(x, self.mask_ratio_a, noise)

    # ---- decoder ----

    def forward_decoder(
        self, x_a: torch.Tensor, x_v: torch.Tensor, ids_restore_a: torch.Tensor, ids_restore_v: torch.Tensor
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Visible joint-stream tokens of each modality -> pixel predictions for every audio and visual patch.

        One mask token stands for every removed patch. A single gather puts [audio visible, audio masks, visual
        visible, visual masks] into the original order of each modality, audio then visual (the sequence in which
        they attend to each other), where a cat and a gather per modality and a cat of the two made three copies;
        position and modality embeddings are added in one pass each. In fp32 the outputs are those of the
        per-modality form (the official code's) bit for bit, and so are the gradients, but those of the two decoder
        modality tokens, which are summed over the batch and the tokens in another order (a difference of ~1e-7)."""
        B, n_a = ids_restore_a.shape
        n_v = ids_restore_v.shape[1]
        a, v = self.decoder_embed(x_a), self.decoder_embed(x_v)
        x = torch.cat([a, self.mask_token.expand(B, n_a - a.shape[1], -1),
                       v, self.mask_token.expand(B, n_v - v.shape[1], -1)], dim=1)
        index = torch.cat([ids_restore_a, ids_restore_v + n_a], dim=1)
        x = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        pos = torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)  # [1, n_a + n_v, Dd]: small
        modality = torch.cat([self.decoder_modality_a.expand(-1, n_a, -1),
                              self.decoder_modality_v.expand(-1, n_v, -1)], dim=1)
        x = x + pos + modality
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
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
        return unused.unused_parameter_names(self, "av", joint_paths, decoder_runs=self.mae_loss_weight != 0)
