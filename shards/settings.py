"""Every setting of every stage: one dataclass per section of `pipeline.yaml`, read top to bottom.

A setting is a field with its default, its type (the annotation), its one-line comment and its constraints
(`setting(...)`): the values it may take (`choices`), the least value (`min`), a check of its own (`check`), and
the option under which it has any effect (`when=(key, value)`: a sibling key of the same section). The loader
(`shards/config.py`) enforces all of them when a config loads; `pipeline.yaml` is generated from this module:

    python -m shards.settings --write      # rewrites pipeline.yaml (tests/test_config.py checks it is current)

A new key is one field here. A key that goes away moves to `RETIRED`, a renamed one to `RENAMED` (one release).
Values marked "official" reproduce the official CAV-MAE code (see README.md); the others are ours.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .names import check_pattern

PIPELINE_YAML = Path(__file__).resolve().parent.parent / "pipeline.yaml"


def setting(default: Any, doc: str = "", *, choices: tuple = (), min: float | None = None,
            when: tuple[str, Any] | None = None, check: Callable[[Any], Any] | None = None) -> Any:
    """A field: `default`, its `doc` (the yaml comment) and its constraints (see the module docstring)."""
    meta = {"doc": doc, "choices": choices, "min": min, "when": when, "check": check}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


PREPROCESSING = ("---- preprocessing (preprocess/, cavmae-prep): audio, video and clip fix a sample's bytes (their "
                 "digest is recorded in every sample); ingest freezes these sections into the shard folder's "
                 "pipeline.yaml.")


@dataclass
class Audio:
    """The audio track: resampled mono, stored as a Kaldi log-mel fbank (and optionally as FLAC)."""
    sample_rate: int = setting(16000, "official: resample to 16 kHz", min=1)
    channel_policy: str = setting("first", "first (official: sox remix 1) | mix (ffmpeg -ac 1, down-mix of all "
                                  "channels)", choices=("first", "mix"))
    num_mel_bins: int = setting(128, "official kaldi fbank parameters below; the model's frequency size", min=1)
    frame_shift_ms: float = setting(10.0)
    frame_length_ms: float = setting(25.0)
    window_type: str = setting("hanning", choices=("hanning", "hamming", "povey", "rectangular", "blackman"))
    keep_waveform: bool = setting(False, "also store {key}.flac (16 kHz mono) for waveform mixup / re-featurising")
    allow_missing: bool = setting(False, "keep video-only clips with has_audio=false (default: a failure; the "
                                  "model needs both)")


@dataclass
class Video:
    """The frames: `num_frames` square JPEGs per clip."""
    num_frames: int = setting(10, "official: 10 frames over the first clip.length_s seconds", min=1)
    image_size: int = setting(224, "short side resized to this, then centre crop (official: 224); the model's "
                              "image size", min=1)
    official_frame_offset: bool = setting(True, "official reads frame index int(i*N/10)-1 (an OpenCV seek quirk); "
                                          "false: int(i*N/10)")
    resize: str = setting("scaler", "scaler: resize while converting to RGB (fast; mean pixel diff ~1-2.5 levels)\n"
                          "pil: full-size RGB then PIL bilinear, as the official torchvision Resize (exact)",
                          choices=("scaler", "pil"))
    jpeg_quality: int = setting(75, "official: torchvision save_image uses PIL default quality 75", min=1)
    skip_nonref: bool = setting(False, "ask the decoder to drop non-reference frames (faster; picks may move by a "
                                "frame)")
    allow_missing: bool = setting(False, "keep audio-only clips with has_video=false")


@dataclass
class Clip:
    """Which seconds of a video make a sample."""
    mode: str = setting("first", "first (official: the first length_s seconds) | windows (consecutive windows)",
                        choices=("first", "windows"))
    length_s: float = setting(10.0)
    hop_s: float = setting(10.0, "windows mode: start of window k is k*hop_s", when=("mode", "windows"))
    min_window_s: float = setting(1.0, "windows mode: a trailing window shorter than this is dropped",
                                  when=("mode", "windows"))


@dataclass
class Shards:
    """The tar files ingest writes."""
    samples_per_shard: int = setting(128, min=1)
    pattern: str = setting("shard-%06d.tar", "a plain .tar file name with exactly one %d-style field (%d, %6d, "
                           "%06d); no '/' or '..'", check=check_pattern)


@dataclass
class Ray:
    """Where and how ingest runs."""
    address: str | None = setting(None, "null: start a local Ray; or host:6379 of a `ray start --head` / auto / "
                                  "ray://host:10001 (RAY_ADDRESS and --address also work; token auth: see README "
                                  "\"Ingest on a cluster\")")
    workers: int = setting(0, "local Ray CPUs; 0 = all cores", min=0)
    num_cpus_per_task: int = setting(1, min=1)
    max_retries: int = setting(3, min=0)
    videos_per_task: int = setting(4, "work unit of ingest and reprocess: a few videos of one shard (shards stay "
                                   "the same bytes whatever this is); small units keep every core busy and make the "
                                   "job's tail short", min=1)
    video_timeout_s: int = setting(30, "an input that takes longer than this (wall time) becomes a failed row "
                                   "\"timed out after N s\" and its worker is replaced (a 10 s clip takes 0.1-0.3 s; "
                                   "raise it for long videos in clip.mode: windows, 0.1-0.3 s per window)", min=1)


TRAINING = ("---- training (train/, cavmae-train). Batch sizes are GLOBAL: samples per optimizer step over all ranks, "
            "as the official scripts count them (4 GPUs under DataParallel); each rank takes batch_size / (world x "
            "accum_steps).")


@dataclass
class Model:
    """CAV-MAE size and pretraining loss (the train/model/builders.py builders take this section; mel bins and image size
    come from the audio/video sections of the shards)."""
    size: str = setting("base", "base (official ViT-B) | tiny (tests)", choices=("base", "tiny"))
    target_length: int = setting(1024, "official: fbank rows padded/cut to this (64 time patches)", min=1)
    mask_ratio_a: float = setting(0.75, min=0.0)
    mask_ratio_v: float = setting(0.75, min=0.0)
    mask_mode: str = setting("unstructured", "unstructured (official) | time | freq | tf (audio ablations)",
                             choices=("unstructured", "time", "freq", "tf"))
    norm_pix_loss: bool = setting(True)
    mae_loss_weight: float = setting(1.0)
    contrast_loss_weight: float = setting(0.01)
    bidirectional: bool = setting(False, "official: single direction (visual picks its audio); true = the \"Symc\" "
                                  "model")
    contrast_chunks: int = setting(1, "emulate official DataParallel over k chunks of each rank's batch: InfoNCE "
                                   "and masked-MAE mean per chunk, both summed (official base: 4 GPUs x 12)", min=1)
    tr_pos: bool = setting(True, "finetuning: trainable position embeddings (official CAVMAEFT default)")


@dataclass
class Data:
    """How samples become model inputs, and the seed of every random draw."""
    mean: float = setting(-5.081, "official fbank normalisation (AudioSet and VGGSound alike): (x - mean) / std")
    std: float = setting(4.4849)
    image_mean: list[float] = setting([0.485, 0.456, 0.406])
    image_std: list[float] = setting([0.229, 0.224, 0.225])
    num_workers: int = setting(4, "loader processes per rank", min=0)
    manifest: str | None = setting(None, "manifest.parquet: sample offsets, labels, balance weights (null: beside "
                                   "the shards)")
    seed: int = setting(0, "with the epoch, fixes every epoch's order and every random draw (see README)")
    missing_modality: str = setting("skip", "a sample without the audio or the frames a mode needs (pretraining, "
                                    "multimodal): skip (counted) | fill (official: the loader's 0.01-filled fbank "
                                    "or image in its place)", choices=("skip", "fill"))


@dataclass
class Stage:
    """What pretraining and finetuning share: optimiser, lr schedule, precision, augmentation, logging (the
    defaults are the official pretraining's; `Finetune` redeclares those it changes)."""
    epochs: int = setting(25, min=1)
    batch_size: int = setting(48, "official base 48 (scale+ 120, scale++ 256)", min=1)
    accum_steps: int = setting(1, min=1)
    epoch_samples: int | None = setting(None, "samples per epoch (null: every sample of the shards once; more: "
                                        "further permutations)")
    optimizer: str = setting("adam", "adam (official, L2 weight decay) | adamw", choices=("adam", "adamw"))
    lr: float = setting(5.0e-5, min=0.0)
    weight_decay: float = setting(5.0e-7, min=0.0)
    betas: list[float] = setting([0.95, 0.999])
    schedule: str = setting("step", "step (official MultiStepLR per epoch) | cosine (per step, linear warmup)",
                            choices=("step", "cosine"))
    lr_start_epoch: int = setting(10, "step: epochs 1..lr_start_epoch at lr, then x lr_decay every lr_step epochs",
                                  min=0, when=("schedule", "step"))
    lr_step: int = setting(5, min=1, when=("schedule", "step"))
    lr_decay: float = setting(0.5, min=0.0, when=("schedule", "step"))
    warmup_steps: int = setting(0, "cosine: linear warmup over this many optimizer steps", min=0,
                                when=("schedule", "cosine"))
    min_lr_ratio: float = setting(0.0, "cosine: final lr / lr", min=0.0, when=("schedule", "cosine"))
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (bf16 working weights kept "
                             "between steps, fp32 master weights in the optimizer, no autocast) | fp16 (official AMP + "
                             "GradScaler) | fp32", choices=("auto", "bf16", "fp16", "fp32"))
    compile: str = setting("eager", "eager (not compiled) | default | max-autotune (torch.compile modes; max-autotune: "
                           "longer compile, faster kernels) | aot_eager (graphs captured, no code generated: debugging, "
                           "CPU tests); the compile time is logged once and left out of samples/s",
                           choices=("eager", "default", "max-autotune", "aot_eager"))
    freqm: int = setting(0, "SpecAugment: widest frequency mask (official pretraining: no SpecAugment, no mixup, "
                         "noise + roll on)", min=0)
    timem: int = setting(0, "SpecAugment: widest time mask", min=0)
    mixup: float = setting(0.0, "probability that a sample is mixed with a random partner", min=0.0)
    noise: bool = setting(True, "uniform noise + circular time roll of the fbank")
    log_every: int = setting(20, "optimizer steps between metrics.jsonl records", min=1)
    save_every: int = setting(0, "optimizer steps between mid-epoch last.pt saves (0: at epoch ends only)", min=0)


@dataclass
class Pretrain(Stage):
    """CAV-MAE pretraining (train/pretrain.py); the defaults are the official base recipe."""
    contrast: str = setting("local", "local (each rank's batch, official per-GPU negatives) | global (all-gathered)",
                            choices=("local", "global"))


@dataclass
class Finetune(Stage):
    """Finetuning and linear probing (train/finetune.py); the defaults are AS-20K multimodal
    (run_cavmae_ft_bal.sh)."""
    epochs: int = setting(15, min=1)
    batch_size: int = setting(36, min=1)
    lr_start_epoch: int = setting(5, min=0, when=("schedule", "step"))
    lr_step: int = setting(1, min=1, when=("schedule", "step"))
    freqm: int = setting(48, "SpecAugment: widest frequency mask", min=0)
    timem: int = setting(192, "SpecAugment: widest time mask", min=0)
    mixup: float = setting(0.5, "probability that a sample is mixed with a random partner (labels mixed alike)",
                           min=0.0)
    num_classes: int = setting(0, "0: from the --labels CSV", min=0)
    mode: str = setting("multimodal", "multimodal | audioonly | videoonly | missingaudioonly | missingvideoonly",
                        choices=("multimodal", "audioonly", "videoonly", "missingaudioonly", "missingvideoonly"))
    loss: str = setting("bce", "bce (multi-label) | ce (single-label, probability targets)", choices=("bce", "ce"))
    metric: str = setting("mAP", "mAP | acc", choices=("mAP", "acc"))
    head_lr_scale: float = setting(100.0, "mlp_head lr = lr x head_lr_scale", min=0.0)
    label_smooth: float = setting(0.1, "label smoothing: every class starts at label_smooth / classes", min=0.0)
    balanced: bool = setting(False, "class-balanced sampling with the official weights from the manifest")
    freeze_base: bool = setting(False, "true: train the head only (linear probe)")
    wa: bool = setting(True, "final model = average of the weights of epochs wa_start..wa_end")
    wa_start: int = setting(3, when=("wa", True))
    wa_end: int = setting(15, when=("wa", True))


@dataclass
class Eval:
    """Evaluation, prediction and embedding."""
    batch_size: int = setting(48, min=1)
    frames: str = setting("all", "all (official: average the probabilities of every frame) | middle | a frame index "
                          "(3)")


SECTIONS: dict[str, type] = {"audio": Audio, "video": Video, "clip": Clip, "shards": Shards, "ray": Ray,
                             "model": Model, "data": Data, "pretrain": Pretrain, "finetune": Finetune, "eval": Eval}

# Named recipes: `--preset NAME` applies these dotted settings after the config file and before --set.
PRESETS: dict[str, dict[str, Any]] = {
    "scale+": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "scale++": {"pretrain.lr": 2.0e-4, "pretrain.batch_size": 256},
    "vggsound-pt": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "fast": {"pretrain.batch_size": 256, "pretrain.lr": 2.0e-4, "pretrain.precision": "bf16",
             "pretrain.compile": "default"},
}

# The finetuning recipes, every value with where it comes from (written beside it in pipeline.yaml). The CAV-MAE
# ones are the official scripts' values (reference 4.2; all three share the augmentation of every finetuning script).
_CAVMAE_FT = "every official finetuning script"
_AS20K, _AS2M, _VGG = "run_cavmae_ft_bal.sh", "run_cavmae_ft_full.sh", "vggsound/run_cavmae_ft.sh"
_AST = "AST egs/esc50/run_esc.sh"


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
PRESETS.update({name: {k: v for k, (v, _) in table.items()} for name, table in FINETUNE_RECIPES.items()})
PRESETS["linear-probe"] = {"finetune.freeze_base": True, "finetune.mixup": 0.0}
PRESET_SOURCES = {name: {k: src for k, (_, src) in table.items()} for name, table in FINETUNE_RECIPES.items()}
PRESET_NOTES = {  # (comment line above the preset, comment after it) in pipeline.yaml
    "scale+": ("Pretraining (reference 4.1; the default pretrain section is the base recipe: lr 5e-5, batch 48)",
               "official script (the released model used 108)"),
    "as20k-ft": ("Finetuning (reference 4.2; the default finetune section is AS-20K multimodal, as-is in as20k-ft)",
                 ""),
    "esc50-audioonly": ("ESC-50 audio only, from AST's ESC-50 recipe (the same author's code); CAV-MAE's fbank "
                        "normalisation kept (its author in issue #24). 5-fold CV: hold one fold out as --val-shards",
                        ""),
    "fast": ("One GPU at a fast batch (BENCHMARKS.md: 256-384 run fastest on an H100; the default stays the paper's "
             "48), compiled, bf16 working weights. Its batch and lr are scale++'s: the official batch/lr pairs (48: "
             "5e-5, 120: 1e-4, 256: 2e-4) follow lr = 5e-5 x (batch / 48)^0.8, not linear scaling; set another "
             "batch's lr by that rule. Contrastive negatives: the rank's batch (model.contrast_chunks=4 gives "
             "scale++'s 4 x 64 on one GPU)", ""),
}

# Keys that existed once: a file that has them (a shard folder's frozen pipeline.yaml, an old run's config.yaml)
# still loads, ignoring them; `--set` or a preset of one is an error that says why it went.
RETIRED = {
    "data.shuffle_buffer": "every training epoch is a full permutation now, with no shuffle buffer",
    "pretrain.label_smooth": "pretraining has no labels; label smoothing is finetune.label_smooth",
}

# Keys renamed in this release: the old name still works everywhere (file, preset, --set) with a warning.
RENAMED = {
    "finetune.head_lr": "finetune.head_lr_scale",  # a multiplier of finetune.lr, not a rate
    "model.num_mel_bins": "audio.num_mel_bins",    # the model's geometry follows the samples
    "model.image_size": "video.image_size",
}

HEADER = """\
GENERATED from shards/settings.py by `python -m shards.settings --write`: edit the settings there, not here.
cavmae: every default of every stage. Each CLI takes --config FILE (a partial file is fine: it is laid over
this one) and --set dotted.key=value. An unknown key, a value of the wrong type or out of range, and a key set
to no effect under the chosen options (e.g. warmup_steps with schedule: step) are one-line errors.
Values marked "official" reproduce the official CAV-MAE code (see docs in README.md); the others are ours."""

BANNERS = {"audio": PREPROCESSING, "model": TRAINING}  # comment blocks above a section


def defaults() -> dict[str, Any]:
    """Every section's defaults as plain data, then the presets: what `pipeline.yaml` holds."""
    data: dict[str, Any] = {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}
    data["presets"] = copy.deepcopy(PRESETS)
    return data


def default_of(f: dataclasses.Field) -> Any:
    """The default of a setting (a fresh list for a list)."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def spec(dotted: str) -> dataclasses.Field | None:
    """The field of a dotted `section.key`, or None when there is no such setting."""
    section, _, key = dotted.partition(".")
    cls = SECTIONS.get(section)
    found = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    return found.get(key)


# ---- pipeline.yaml, generated

WIDTH, COLUMN = 118, 28  # line width; values are padded to COLUMN before their `# comment`


def as_yaml(value: Any) -> str:
    """`value` as YAML flow text (a list in brackets, null, true, 5.0e-05)."""
    return yaml.safe_dump([value], default_flow_style=True, width=1 << 20).strip()[1:-1]


def _comment(text: str, indent: int = 0) -> list[str]:
    return [line for part in text.split("\n")
            for line in textwrap.wrap(part, WIDTH - indent - 2, initial_indent=" " * indent + "# ",
                                      subsequent_indent=" " * indent + "# ")]


def _entry(head: str, doc: str, column: int = COLUMN) -> list[str]:
    """`head` with `doc` as an aligned trailing comment, continued on aligned comment lines when long."""
    if not doc:
        return [head]
    pad = max(column, len(head))
    lines = [line for part in doc.split("\n") for line in textwrap.wrap(part, WIDTH - pad - 3)]
    return [f"{head:<{pad}} # {lines[0]}"] + [f"{'':<{pad}} # {line}" for line in lines[1:]]


def _preset(name: str, table: dict[str, Any], note: str) -> list[str]:
    """One preset: one line per setting with its source as a comment when it has sources, else a flow mapping."""
    sources = PRESET_SOURCES.get(name)
    if sources is not None:
        return _entry(f"  {name}:", note) + [line for key, value in table.items()
                                             for line in _entry(f"    {key}: {as_yaml(value)}", sources[key], 36)]
    head = f"  {name}: {{"
    items = [f"{key}: {as_yaml(value)}" for key, value in table.items()]
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("}" if i == len(items) - 1 else ",")
        if line != head and len(line) + 1 + len(piece) > WIDTH:
            lines.append(line)
            line = " " * len(head) + piece
        else:
            line += ("" if line == head else " ") + piece
    lines.append(line)
    if note:
        lines[-1] = f"{lines[-1]}  # {note}"
    return lines


def render() -> str:
    """The text of `pipeline.yaml`."""
    out = _comment(HEADER)
    for name, cls in SECTIONS.items():
        out.append("")
        if name in BANNERS:
            out += _comment(BANNERS[name]) + [""]
        out += _comment(" ".join(cls.__doc__.split()))
        out.append(f"{name}:")
        for f in dataclasses.fields(cls):
            out += _entry(f"  {f.name}: {as_yaml(default_of(f))}", f.metadata["doc"])
    out += [""] + _comment("Named recipes: `--preset NAME` applies these dotted settings after the config file and "
                           "before --set.") + ["presets:"]
    for name, table in PRESETS.items():
        above, after = PRESET_NOTES.get(name, ("", ""))
        out += _comment(above, indent=2) if above else []
        out += _preset(name, table, after)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards.settings",
                                     description="print pipeline.yaml, generated from shards/settings.py")
    parser.add_argument("--write", action="store_true", help=f"write it to {PIPELINE_YAML.name} instead")
    args = parser.parse_args(argv)
    if args.write:
        PIPELINE_YAML.write_text(render())
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
