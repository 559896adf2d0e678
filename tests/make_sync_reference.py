"""Make the CAV-MAE Sync parity data from the released code (run once; the tests read only what it wrote):

    git -C <mirror of github.com/edsonroteia/cav-mae-sync> archive HEAD src | tar x -C /tmp/sync_ref
    python -m tests.make_sync_reference /tmp/sync_ref/src tests/data

It writes two files of facts about the released class (src/models/cav_mae_sync.py `CAVMAE`), none of its code:
  cavmae_sync_keys.txt  every state-dict key and shape of the released checkpoint's configuration (retrieval.py's
                        `sync_pretrain_registers_cls_4s`: audio_length 416, modality_specific_depth 11, 8 register
                        tokens, cls tokens, no contrastive heads), `module.`-prefixed as its DataParallel saves them.
  cavmae_sync_ref.npz   segments: the released loader's `map_frame_to_spectrogram` (start, end) for every frame of a
                        few (frames T, spectrogram rows S, segment rows L);
                        retrieval: per-frame features [N, T, D] and, for each strategy and direction, the released
                        src/retrieval.py similarity matrix (`get_agg_sim_mat`) and metrics (`compute_metrics`);
                        model: inputs (int8 sixteenths) and masking noise, and for each of three small configurations
                        (CONFIGS) a seeded state dict of the released class (rounded to fp16, stored as fp16) and its
                        `forward` losses, masks and audio reconstruction and `forward_feat` features in fp32 (the
                        224x224 visual reconstructions left out: they would be most of the file).

The released Block passes `qk_scale=None` to timm's Attention, which current timm no longer accepts; None meant the
default 1/sqrt(head_dim) scale, so the Attention it imports is given a subclass that drops the argument. Its
retrieval.py imports `tabulate` (not a dependency here) only to print tables: an empty stand-in is registered.
"""

import importlib
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import timm.models.vision_transformer as vit
import torch

# Each configuration: the released constructor's keywords; the other sizes are in SIZE.
CONFIGS = {
    "cls_registers": dict(num_register_tokens=2, cls_token=True, contrastive_heads=False, norm_pix_loss=True),
    "cls_kept_heads_global_local": dict(num_register_tokens=2, cls_token=True, keep_register_tokens=True,
                                        contrastive_heads=True, global_local_losses=True, norm_pix_loss=False),
    "plain": dict(num_register_tokens=0, cls_token=False, contrastive_heads=False, norm_pix_loss=True),
}
# The released class fixes 12 blocks in all (modality-specific + joint) and decodes 224x224 frames and 128 mel bins.
SIZE = dict(audio_length=64, embed_dim=16, num_heads=2, modality_specific_depth=11, decoder_embed_dim=16,
            decoder_depth=1, decoder_num_heads=2)
BATCH, IMAGE, MEL = 3, 224, 128
RETRIEVAL_CLIPS = 40
RELEASED_CHECKPOINT = dict(audio_length=416, modality_specific_depth=11, num_register_tokens=8, cls_token=True,
                           total_frame=16, contrastive_heads=False)


class _Attention(vit.Attention):
    def __init__(self, *args, qk_scale=None, **kwargs):
        assert qk_scale is None
        super().__init__(*args, **kwargs)


def released_modules(src: Path):
    """(the released pretraining class, the released retrieval module)."""
    vit.Attention = _Attention
    tabulate = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("tabulate", None))
    tabulate.tabulate = lambda *args, **kwargs: ""
    sys.modules.setdefault("tabulate", tabulate)
    sys.path.insert(0, str(src))
    return importlib.import_module("models.cav_mae_sync").CAVMAE, importlib.import_module("retrieval")


def segment_reference(dataloader_sync) -> dict:
    """Rows (T, S, L, i, start, end) of the released frame -> spectrogram segment rule."""
    rule = dataloader_sync.AudiosetDataset.map_frame_to_spectrogram  # uses nothing of the dataset
    rows = [(t, s, n, i, *rule(None, i, t, s, n))
            for t, s, n in ((16, 1024, 416), (10, 1024, 96), (4, 128, 64), (16, 300, 416), (5, 1000, 304))
            for i in range(t)]
    return {"segments": np.array(rows, dtype=np.int64)}


def retrieval_reference(retrieval) -> dict:
    """Per-frame features as the released script holds them (L2-normalised float32 [N, T, D]) and its similarity
    matrices and metrics, the audio ones as rows for direction 'audio', the visual ones for 'video'."""
    g = torch.Generator().manual_seed(7)
    audio = torch.randn(RETRIEVAL_CLIPS, 4, 8, generator=g)
    visual = audio + 1.5 * torch.randn(RETRIEVAL_CLIPS, 4, 8, generator=g)  # paired, loosely: recalls in (0, 1)
    feats = {"a": torch.nn.functional.normalize(audio, dim=-1), "v": torch.nn.functional.normalize(visual, dim=-1)}
    arrays = {"retrieval/audio": feats["a"].numpy(), "retrieval/visual": feats["v"].numpy()}
    for strategy in ("mean", "max", "diagonal_mean", "diagonal_max"):
        for direction, (rows, cols) in (("audio", "av"), ("video", "va")):
            sim = retrieval.get_agg_sim_mat(feats[rows], feats[cols], strategy=strategy)
            metrics = retrieval.compute_metrics(sim)
            arrays[f"retrieval/{strategy}/{direction}/sim"] = sim
            arrays[f"retrieval/{strategy}/{direction}/metrics"] = np.array(
                [metrics["R1"], metrics["R5"], metrics["R10"], metrics["MR"]], dtype=np.float64)
    return arrays


def quantised(shape, g):
    """Inputs as int8 sixteenths (multiples of 1/16 in [-8, 8): exact in fp32, and small to store)."""
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


def main(src: Path, out: Path) -> None:
    cls, retrieval = released_modules(src)
    with torch.device("meta"):
        base = cls(**RELEASED_CHECKPOINT)
    (out / "cavmae_sync_keys.txt").write_text("".join(
        f"module.{k}\t[{', '.join(map(str, v.shape))}]\n" for k, v in base.state_dict().items()))

    g = torch.Generator().manual_seed(100)
    audio_x16 = quantised((BATCH, SIZE["audio_length"], MEL), g)
    image_x16 = quantised((BATCH, 3, IMAGE, IMAGE), g)
    audio, image = audio_x16.float() / 16, image_x16.float() / 16
    n_a, n_v = SIZE["audio_length"] // 16 * MEL // 16, (IMAGE // 16) ** 2
    torch.manual_seed(1000)  # the released masking draws torch.rand(B, N) for audio, then for video
    noise_a, noise_v = torch.rand(BATCH, n_a), torch.rand(BATCH, n_v)
    arrays = dict(audio_x16=audio_x16.numpy(), image_x16=image_x16.numpy(), noise_a=noise_a.numpy(),
                  noise_v=noise_v.numpy())
    for i, (name, options) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = cls(img_size=IMAGE, **SIZE, **options).eval()
        with torch.no_grad():  # weights exact in fp16, stored as fp16: half the file
            for p in model.state_dict().values():
                p.copy_(p.half().float())
        torch.manual_seed(1000)
        with torch.no_grad():
            outs = model(audio, image)
            feats = model.forward_feat(audio, image)
        loss, loss_mae, loss_mae_a, loss_mae_v, loss_c, mask_a, mask_v, c_acc = outs[:8]
        ref = dict(loss=loss, loss_mae=loss_mae, loss_mae_a=loss_mae_a, loss_mae_v=loss_mae_v, loss_c=loss_c,
                   c_acc=c_acc, mask_a=mask_a, mask_v=mask_v, recon_a=outs[8], tokens_a=feats[0], tokens_v=feats[1])
        if options["cls_token"]:
            ref.update(global_a=feats[2], global_v=feats[3])
        if options.get("keep_register_tokens"):  # released forward_feat keeps them among the local tokens
            ref.pop("tokens_a"), ref.pop("tokens_v")
        arrays[f"{name}/options"] = np.array(json.dumps({**SIZE, **options}))
        for k, v in model.state_dict().items():
            arrays[f"{name}/state/{k}"] = v.half().numpy()
        for k, v in ref.items():
            arrays[f"{name}/output/{k}"] = torch.as_tensor(v).numpy()
    arrays.update(retrieval_reference(retrieval))
    arrays.update(segment_reference(importlib.import_module("dataloader_sync")))
    np.savez_compressed(out / "cavmae_sync_ref.npz", **arrays)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
