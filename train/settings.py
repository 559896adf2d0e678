"""The settings `train/` owns: the model and the recipes (the `model`, `data`, `pretrain`, `finetune` and `eval`
sections of pipeline.yaml, and its presets), with the rules between them and the retired and renamed keys.
Registered with `shards.settings` by `register_sections()`, which `cavmae-train` (and `cavmae`) call first thing,
never by importing this module (the model imports it for its tables): a process checks what its entry registered.
The sample-side settings they depend on (mel bins, frame size, clip length, frame shift) are the shards' own
(`shards/settings.py`, adopted from a shard folder by `shards.frozen`).

Each list of choices is written once: `finetune.mode`'s is `train/modes.py`'s table, `model.mask_mode`'s is
`MASK_MODES` below, which the model imports (this module stays free of torch), and the pretraining model checks its
options against these settings (`shards.config.check_setting`); tests/test_model_defaults.py checks that the models'
constructor defaults and size names agree with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cavmae.shards.settings import (PATCH_ROWS, PRESET_NOTES, PRESET_SOURCES, PRESETS, RENAMED, RETIRED, clip_rows,
                                    register, setting)
from cavmae.train.modes import MODES, NAMES

# How pretraining masks the audio patches (train/model/blocks.py); here, not there, so that these settings stay free
# of torch and the model and `model.mask_mode` share the one table.
MASK_MODES = ("unstructured", "time", "freq", "tf")


def whole_patches(dotted: str, rows: int | None) -> None:
    """The model's audio length must be whole patches (the patch embedding would drop the rest)."""
    if rows is not None and rows % PATCH_ROWS:
        raise ValueError(f"'{dotted}' must be a multiple of {PATCH_ROWS} (one patch); got {rows}")


TRAINING = ("---- training (train/, cavmae-train). Batch sizes are GLOBAL: samples per optimizer step over all ranks, "
            "as the official scripts count them (4 GPUs under DataParallel); each rank takes batch_size / (world x "
            "accum_steps).")


@dataclass
class Model:
    """CAV-MAE size and pretraining loss (the train/model/builders.py builders take this section; mel bins and image
    size come from the audio/video sections of the shards)."""
    size: str = setting("base", "base (official ViT-B) | tiny (tests)", choices=("base", "tiny"))
    target_length: int | None = setting(None, "fbank rows padded/cut to this, whole 16-row patches; null: follows "
                                        "clip.length_s and audio.frame_shift_ms at the official 1024 rows per 10 s "
                                        "of 10 ms rows (10 s, 10 ms: 1024)", min=16, max=16_384,
                                        check=lambda rows: whole_patches("model.target_length", rows),
                                        follows=clip_rows)
    mask_ratio_a: float = setting(0.75, min=0.0, below=1.0)
    mask_ratio_v: float = setting(0.75, min=0.0, below=1.0)
    mask_mode: str = setting("unstructured", "unstructured (official) | time | freq | tf (audio ablations)",
                             choices=MASK_MODES)
    norm_pix_loss: bool = setting(True)
    mae_loss_weight: float = setting(1.0, min=0.0)
    contrast_loss_weight: float = setting(0.01, min=0.0)
    bidirectional: bool = setting(False, "official: single direction (visual picks its audio); true = the \"Symc\" "
                                  "model")
    contrast_chunks: int = setting(1, "emulate official DataParallel over k chunks of each rank's batch: InfoNCE "
                                   "and masked-MAE mean per chunk, both summed (official base: 4 GPUs x 12)", min=1,
                                   max=1024)
    tr_pos: bool = setting(True, "finetuning: trainable position embeddings (official CAVMAEFT default)")
    variant: str = setting("cavmae", "cavmae | sync (CAV-MAE Sync, Araujo et al. CVPR 2025: each frame paired with "
                           "the audio segment centred on it; train/model/sync.py, preset sync)",
                           choices=("cavmae", "sync"))
    audio_length: int = setting(416, "sync: fbank rows of the segment paired with each frame, cut at load time "
                                "from the target_length rows (released 4 s: 416)", min=16, max=16_384,
                                check=lambda rows: whole_patches("model.audio_length", rows))
    cls_token: bool = setting(True, "sync: a global token per modality for the contrastive loss")
    global_local_losses: bool = setting(False, "sync: contrastive loss = mean of the global-token and the "
                                        "mean-patch-token losses")
    num_register_tokens: int = setting(8, "sync: learned register tokens per modality", min=0, max=1024)
    keep_register_tokens: bool = setting(False, "sync: registers go through the joint block too")
    contrastive_heads: bool = setting(False, "sync: two more blocks per modality on the contrastive path")
    sync_pool: str = setting("tokens", "sync finetuning (our reading, train/model/sync_finetuning.py): the head "
                             "sees the mean patch token after the joint block (tokens), the global tokens "
                             "(global), or the mean of both (both)", choices=("tokens", "global", "both"))


@dataclass
class Data:
    """How samples become model inputs, and the seed of every random draw."""
    mean: float = setting(-5.081, "official fbank normalisation (AudioSet and VGGSound alike): (x - mean) / std")
    std: float = setting(4.4849, above=0.0)
    image_mean: list[float] = setting([0.485, 0.456, 0.406], min=0.0, max=1.0, length=3)
    image_std: list[float] = setting([0.229, 0.224, 0.225], above=0.0, length=3)
    num_workers: int = setting(4, "loader processes per rank", min=0, max=256)
    manifest: str | None = setting(None, "manifest.parquet: sample offsets, labels, balance weights (null: beside "
                                   "the shards)")
    seed: int = setting(0, "with the epoch, fixes every epoch's order and every random draw (docs/train.md)", min=0,
                        max=2 ** 63 - 1)
    missing_modality: str = setting("skip", "a sample without the audio or the frames a mode needs (pretraining, "
                                    "multimodal): skip (counted) | fill (official: the loader's 0.01-filled fbank "
                                    "or image in its place)", choices=("skip", "fill"))
    segment_centre: str = setting("index", "model.variant sync: where frame i of T centres its audio segment: index "
                                  "(released loader: row round(i * target_length / T)) | time (the frame's "
                                  "frame_times_s)", choices=("index", "time"))


@dataclass
class Stage:
    """What pretraining and finetuning share: optimiser, lr schedule, precision, augmentation, logging (the
    defaults are the official pretraining's; `Finetune` redeclares those it changes)."""
    epochs: int = setting(25, min=1, max=10_000)
    batch_size: int = setting(48, "official base 48 (scale+ 120, scale++ 256)", min=1, max=65_536)
    accum_steps: int = setting(1, min=1, max=65_536)
    epoch_samples: int | None = setting(None, "samples per epoch (null: every sample of the shards once; more: "
                                        "further permutations; at most 1e8: an epoch's order is held in memory)", min=1,
                                        max=100_000_000)
    optimizer: str = setting("adam", "adam (official, L2 weight decay) | adamw", choices=("adam", "adamw"))
    lr: float = setting(5.0e-5, min=0.0, max=1.0)
    weight_decay: float = setting(5.0e-7, min=0.0, max=1.0)
    betas: list[float] = setting([0.95, 0.999], min=0.0, below=1.0, length=2)
    schedule: str = setting("step", "step (official MultiStepLR per epoch) | cosine (per step, linear warmup)",
                            choices=("step", "cosine"))
    lr_start_epoch: int = setting(10, "step: epochs 1..lr_start_epoch at lr, then x lr_decay every lr_step epochs",
                                  min=0, max=10_000, when=("schedule", "step"))
    lr_step: int = setting(5, min=1, max=10_000, when=("schedule", "step"))
    lr_decay: float = setting(0.5, min=0.0, max=1.0, when=("schedule", "step"))
    warmup_steps: int = setting(0, "cosine: linear warmup over this many optimizer steps", min=0, max=10**9,
                                when=("schedule", "cosine"))
    min_lr_ratio: float = setting(0.0, "cosine: final lr / lr", min=0.0, max=1.0, when=("schedule", "cosine"))
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (bf16 working weights kept "
                             "between steps, fp32 master weights in the optimizer, no autocast) | fp16 (official AMP + "
                             "GradScaler) | fp32", choices=("auto", "bf16", "fp16", "fp32"))
    compile: str = setting("eager", "eager (not compiled) | default | max-autotune (torch.compile modes; max-autotune: "
                           "longer compile, faster kernels) | aot_eager (graphs captured, no code generated: "
                           "debugging, CPU tests); the compile time is logged once and left out of samples/s",
                           choices=("eager", "default", "max-autotune", "aot_eager"))
    freqm: int = setting(0, "SpecAugment: widest frequency mask, in mel bins (official pretraining: no SpecAugment, "
                         "no mixup, noise + roll on)", min=0, max=1024)
    timem: int = setting(0, "SpecAugment: widest time mask, in 10 ms rows (scaled to audio.frame_shift_ms)", min=0,
                         max=16_384)
    mixup: float = setting(0.0, "probability that a sample is mixed with a random partner", min=0.0, max=1.0)
    noise: bool = setting(True, "uniform noise + circular time roll of the fbank by up to +-model.target_length rows "
                                "(official: +-1024)")
    log_every: int = setting(20, "optimizer steps between metrics.jsonl records (and each epoch's last step)", min=1,
                             max=10**9)
    save_every: int = setting(0, "optimizer steps between mid-epoch last.pt saves (0: at epoch ends only)", min=0,
                             max=10**9)


@dataclass
class Pretrain(Stage):
    """CAV-MAE pretraining (train/pretrain.py); the defaults are the official base recipe."""
    contrast: str = setting("local", "local (each rank's batch, official per-GPU negatives) | global (all-gathered)",
                            choices=("local", "global"))


@dataclass
class Finetune(Stage):
    """Finetuning and linear probing (train/finetune.py); the defaults are AS-20K multimodal
    (run_cavmae_ft_bal.sh)."""
    epochs: int = setting(15, min=1, max=10_000)
    batch_size: int = setting(36, min=1, max=65_536)
    lr_start_epoch: int = setting(5, min=0, max=10_000, when=("schedule", "step"))
    lr_step: int = setting(1, min=1, max=10_000, when=("schedule", "step"))
    freqm: int = setting(48, "SpecAugment: widest frequency mask, in mel bins (at most 3/8 of them, the official "
                         "48 of 128)", min=0, max=1024)
    timem: int = setting(192, "SpecAugment: widest time mask, in 10 ms rows (official 192 = 1.92 s; scaled to "
                         "audio.frame_shift_ms; at most 3/16 of model.target_length, the official 192 of 1024)",
                         min=0, max=16_384)
    mixup: float = setting(0.5, "probability that a sample is mixed with a random partner (labels mixed alike)",
                           min=0.0, max=1.0)
    num_classes: int = setting(0, "0: from the --labels CSV", min=0, max=1_000_000)
    mode: str = setting("multimodal", " | ".join(f"{name} (official {entry.official})" if entry.official else name
                                                for name, entry in MODES.items()) + ": see train/modes.py",
                        choices=NAMES)
    loss: str = setting("bce", "bce (multi-label) | ce (single-label, probability targets)", choices=("bce", "ce"))
    metric: str = setting("mAP", "mAP | acc", choices=("mAP", "acc"))
    head_lr_scale: float = setting(100.0, "mlp_head lr = lr x head_lr_scale", min=0.0, max=10_000.0)
    label_smooth: float = setting(0.1, "label smoothing: every class starts at label_smooth / classes", min=0.0,
                                  below=1.0)
    balanced: bool = setting(False, "class-balanced sampling with the official weights from the manifest")
    freeze_base: bool = setting(False, "true: train the head only (linear probe)")
    wa: bool = setting(True, "final model = average of the weights of epochs wa_start..wa_end")
    wa_start: int = setting(3, min=1, max=10_000, when=("wa", True))
    wa_end: int = setting(15, min=1, max=10_000, when=("wa", True))


@dataclass
class Eval:
    """Evaluation, prediction and embedding."""
    batch_size: int = setting(48, min=1, max=65_536)
    frames: str = setting("all", "all (official: average the probabilities of every frame) | middle | a frame index "
                          "(3)")
    feature_frames: str = setting("middle", "retrieve and embed (one setting: their vectors agree): middle (official "
                                  "retrieval) | all (the visual vector is the mean over the frames) | a frame index")


def loss_problem(mask_ratio_a: float, mask_ratio_v: float, mae_loss_weight: float,
                 contrast_loss_weight: float) -> str | None:
    """What leaves the pretraining loss undefined, or None: a settings rule (a one-line error before a run writes
    anything) and the pretraining model's own check, one text for both."""
    if mae_loss_weight == 0 and contrast_loss_weight == 0:
        return "model.mae_loss_weight and model.contrast_loss_weight are both 0: there is no loss to train"
    for name, ratio in (("mask_ratio_a", mask_ratio_a), ("mask_ratio_v", mask_ratio_v)):
        if ratio == 0 and mae_loss_weight != 0:
            return (f"model.{name}=0 leaves nothing to reconstruct while model.mae_loss_weight={mae_loss_weight:g} "
                    "(a ratio above 0, or weight 0 for the contrastive-only model)")
    return None


def _loss_rule(data: dict[str, Any]) -> str | None:
    m = data["model"]
    return loss_problem(m["mask_ratio_a"], m["mask_ratio_v"], m["mae_loss_weight"], m["contrast_loss_weight"])


def _batch_rule(data: dict[str, Any]) -> str | None:
    """A stage's batch is cut into accum_steps micro-batches, and pretraining's each into model.contrast_chunks
    InfoNCE chunks: both cuts must be whole (the world size, known at launch, is checked then)."""
    for section, chunks in (("pretrain", data["model"]["contrast_chunks"]), ("finetune", 1)):
        stage = data[section]
        parts = stage["accum_steps"] * chunks
        if stage["batch_size"] % parts:
            by = f"{section}.accum_steps" + (" x model.contrast_chunks" if chunks > 1 else "")
            return f"{section}.batch_size={stage['batch_size']} is not divisible by {by} = {parts}"
    return None


# The finetuning recipes, every value with where it comes from (written beside it in pipeline.yaml). The CAV-MAE
# ones are the official scripts' values (reference 4.2; all three share the augmentation of every finetuning script).
_CAVMAE_FT = "every official finetuning script"
_AS20K, _AS2M, _VGG = "run_cavmae_ft_bal.sh", "run_cavmae_ft_full.sh", "vggsound/run_cavmae_ft.sh"
_AST = "AST egs/esc50/run_esc.sh"
_SYNC = "cav-mae-sync src/retrieval.py"


def _official_ft(script: str, lr: float, head: float, batch: int, epochs: int, start: int, wa: tuple[int, int],
                 balanced: bool, single_label: bool) -> dict[str, tuple[Any, str]]:
    """One official CAV-MAE finetuning script's settings, each with its source."""
    return {
        "finetune.mode": ("multimodal", f"{script} --ftmode"),
        "finetune.lr": (lr, f"{script} --lr"),
        "finetune.head_lr_scale": (head, f"{script} --head_lr"),
        "finetune.batch_size": (batch, f"{script} --batch-size"),
        "finetune.epochs": (epochs, f"{script} --n-epochs"),
        "finetune.lr_start_epoch": (start, f"{script} --lrscheduler_start"),
        "finetune.lr_decay": (0.5, f"{script} --lrscheduler_decay"),
        "finetune.lr_step": (1, f"{script} --lrscheduler_step"),
        "finetune.wa": (True, f"{script} --wa"),
        "finetune.wa_start": (wa[0], f"{script} --wa_start"),
        "finetune.wa_end": (wa[1], f"{script} --wa_end"),
        "finetune.balanced": (balanced, f"{script} --bal"),
        "finetune.loss": ("ce" if single_label else "bce", f"{script} --loss"),
        "finetune.metric": ("acc" if single_label else "mAP", f"{script} --metrics"),
        "finetune.freqm": (48, _CAVMAE_FT), "finetune.timem": (192, _CAVMAE_FT),
        "finetune.mixup": (0.5, _CAVMAE_FT), "finetune.label_smooth": (0.1, _CAVMAE_FT),
        "finetune.noise": (True, _CAVMAE_FT), "model.target_length": (1024, _CAVMAE_FT),
        "eval.frames": ("all", f"{script}: the 10-frame average (frame aggregation)"),
    }


FINETUNE_RECIPES: dict[str, dict[str, tuple[Any, str]]] = {
    "as20k-ft": _official_ft(_AS20K, 5.0e-5, 100.0, 36, 15, 5, (3, 15), False, False),
    "as20k-audioonly": {"finetune.mode": ("audioonly", "run_cavmae_ft_bal_audioonly.sh --ftmode"),
                        "eval.frames": ("middle", "run_cavmae_ft_bal_audioonly.sh --skip_frame_agg True")},
    "as20k-videoonly": {"finetune.mode": ("videoonly", "run_cavmae_ft_bal_videoonly.sh --ftmode (cav-mae #2: not "
                                                       "missingvideoonly)"),
                        "eval.frames": ("all", "run_cavmae_ft_bal_videoonly.sh: frame aggregation on (+3 mAP)")},
    "as2m-ft": _official_ft(_AS2M, 1.0e-5, 50.0, 48, 10, 2, (1, 10), True, False),
    "vggsound-ft": _official_ft(_VGG, 1.0e-4, 10.0, 48, 10, 2, (3, 10), True, True),
    # ESC-50: no official CAV-MAE recipe; AST's (the same author's training code) on 5 s clips. The normalisation
    # stays CAV-MAE's (data.mean/std: the pretrained model saw it; the author in cav-mae #24), not AST's ESC-50
    # stats, which go with AST's (x - mean) / (2 std). 5-fold cross-validation: one fold's shards as --val-shards.
    "esc50-audioonly": {
        "finetune.mode": ("audioonly", "ESC-50 is audio only"),
        "finetune.num_classes": (50, f"{_AST} --n_class (the samples' .labels.txt targets; no --labels needed)"),
        "model.target_length": (512, f"{_AST} audio_length (5 s = 498 rows)"),
        "finetune.lr": (1.0e-5, f"{_AST} lr (from an AudioSet-pretrained model)"),
        "finetune.head_lr_scale": (1.0, f"{_AST}: one lr for every parameter"),
        "finetune.batch_size": (48, f"{_AST} batch_size"),
        "finetune.epochs": (25, f"{_AST} epoch"),
        "finetune.lr_start_epoch": (5, f"{_AST} lrscheduler_start"),
        "finetune.lr_decay": (0.85, f"{_AST} lrscheduler_decay"),
        "finetune.lr_step": (1, f"{_AST} lrscheduler_step"),
        "finetune.wa": (False, f"{_AST}: no weight averaging"),
        "finetune.balanced": (False, f"{_AST} bal=none"),
        "finetune.loss": ("ce", f"{_AST} loss (single label)"),
        "finetune.metric": ("acc", f"{_AST} metrics"),
        "finetune.freqm": (24, f"{_AST} freqm"),
        "finetune.timem": (96, f"{_AST} timem"),
        "finetune.mixup": (0.0, f"{_AST} mixup"),
        "finetune.noise": (False, f"{_AST} noise"),
        "finetune.label_smooth": (0.0, "AST: one-hot targets"),
        "eval.frames": ("middle", "audio only: no frames to aggregate"),
    },
}
# CAV-MAE Sync pretraining: the released checkpoint's configuration (the optimisation values are not released;
# they stay the CAV-MAE defaults of the pretrain section).
SYNC_RECIPE: dict[str, tuple[Any, str]] = {
    "model.variant": ("sync", "CAV-MAE Sync (arXiv 2505.01237)"),
    "model.audio_length": (416, f"{_SYNC}: '4s' models, target_length 416"),
    "model.cls_token": (True, f"{_SYNC}: the released model type sync_pretrain_registers_cls_4s"),
    "model.num_register_tokens": (8, f"{_SYNC}: num_register_tokens 8 for the released model"),
    "model.global_local_losses": (False, f"{_SYNC}: not set for the released model type"),
    "model.contrastive_heads": (False, f"{_SYNC}: no '_ch' in the released model type"),
    "model.keep_register_tokens": (False, "cav-mae-sync CAVMAE default"),
    "pretrain.noise": (False, "cav-mae-sync src/dataloader_sync.py applies no noise or roll"),
    "data.segment_centre": ("index", "cav-mae-sync src/dataloader_sync.py map_frame_to_spectrogram"),
}
# What `register_sections` adds to the tables of the same names in shards/settings.py: every preset (`--preset NAME`),
# in pipeline.yaml's order, the sources of those that have them, and the comments above and after some.
_PRESETS: dict[str, dict[str, Any]] = {
    "scale+": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "scale++": {"pretrain.lr": 2.0e-4, "pretrain.batch_size": 256},
    "vggsound-pt": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "fast": {"pretrain.batch_size": 256, "pretrain.lr": 2.0e-4, "pretrain.precision": "bf16",
             "pretrain.compile": "default"},
    **{name: {k: v for k, (v, _) in table.items()} for name, table in FINETUNE_RECIPES.items()},
    "linear-probe": {"finetune.freeze_base": True, "finetune.mixup": 0.0},
    "sync": {k: v for k, (v, _) in SYNC_RECIPE.items()},
}
_PRESET_SOURCES = {name: {k: src for k, (_, src) in table.items()}
                   for name, table in {**FINETUNE_RECIPES, "sync": SYNC_RECIPE}.items()}
_PRESET_NOTES = {  # (comment line above the preset, comment after it) in pipeline.yaml
    "scale+": ("Pretraining (reference 4.1; the default pretrain section is the base recipe: lr 5e-5, batch 48)",
               "official script (the released model used 108)"),
    "fast": ("One GPU at a fast batch (BENCHMARKS.md: 256-384 run fastest on an H100; the default stays the paper's "
             "48), compiled, bf16 working weights. Its batch and lr are scale++'s: the official batch/lr pairs (48: "
             "5e-5, 120: 1e-4, 256: 2e-4) follow lr = 5e-5 x (batch / 48)^0.8, not linear scaling; set another "
             "batch's lr by that rule. Contrastive negatives: the rank's batch (model.contrast_chunks=4 gives "
             "scale++'s 4 x 64 on one GPU)", ""),
    "as20k-ft": ("Finetuning (reference 4.2; the default finetune section is AS-20K multimodal, as-is in as20k-ft)",
                 ""),
    "sync": ("CAV-MAE Sync pretraining (`cavmae-train pretrain --preset sync`): the released VGGSound checkpoint's "
             "model; lr, batch and epochs stay the pretrain section's (not released)", ""),
    "esc50-audioonly": ("ESC-50 audio only, from AST's ESC-50 recipe (the same author's code); CAV-MAE's fbank "
                        "normalisation kept (its author in issue #24). 5-fold CV: hold one fold out as --val-shards",
                        ""),
}
# Keys that existed once, and keys renamed in this release (see shards/settings.py).
_RETIRED = {
    "data.shuffle_buffer": "every training epoch is a full permutation now, with no shuffle buffer",
    "pretrain.label_smooth": "pretraining has no labels; label smoothing is finetune.label_smooth",
}
_RENAMED = {
    "finetune.head_lr": "finetune.head_lr_scale",  # a multiplier of finetune.lr, not a rate
    "model.num_mel_bins": "audio.num_mel_bins",    # the model's geometry follows the samples
    "model.image_size": "video.image_size",
}


def register_sections() -> None:
    """Register the training sections, their rules, the presets and the retired and renamed keys with
    `shards.settings` (again: a no-op)."""
    register({"model": Model, "data": Data, "pretrain": Pretrain, "finetune": Finetune, "eval": Eval}, TRAINING,
             rules=(_loss_rule, _batch_rule))
    PRESETS.update(_PRESETS)
    PRESET_SOURCES.update(_PRESET_SOURCES)
    PRESET_NOTES.update(_PRESET_NOTES)
    RETIRED.update(_RETIRED)
    RENAMED.update(_RENAMED)
