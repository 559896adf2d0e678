"""Every setting of every stage: one dataclass per section of `pipeline.yaml`, read top to bottom.

A setting is a field with its default, its type (the annotation), its one-line comment and its constraints
(`setting(...)`): the values it may take (`choices`), its range (`min` / `max` inclusive, `above` / `below`
exclusive, for a list each element, and `length` its size), a check of its own (`check`), and the option under
which it has any effect (`when=(key, value)`: a sibling key of the same section); a setting that is null by
default may `follow` others (a function of the settings: its value unless set). Every number has a range, and a
float is finite: the upper bounds keep what a value sizes (frames, mel bins, an epoch's order in memory) inside one
machine, so a hostile frozen pipeline.yaml or a typo is a one-line error at load, never a failure later. The loader
(`shards/config.py`) enforces all of them when a config loads; `pipeline.yaml` is generated from this module:

    python -m shards.settings --write      # rewrites pipeline.yaml (tests/test_config.py checks it is current)

A new key is one field here. A key that goes away moves to `RETIRED`, a renamed one to `RENAMED` (one release).
Values marked "official" reproduce the official CAV-MAE code (see README.md); the others are ours.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .names import check_pattern

PIPELINE_YAML = Path(__file__).resolve().parent.parent / "pipeline.yaml"


def setting(default: Any, doc: str = "", *, choices: tuple = (), min: float | None = None, max: float | None = None,
            above: float | None = None, below: float | None = None, length: int | None = None,
            when: tuple[str, Any] | None = None, check: Callable[[Any], Any] | None = None,
            follows: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """A field: `default`, its `doc` (the yaml comment) and its constraints (see the module docstring)."""
    meta = {"doc": doc, "choices": choices, "min": min, "max": max, "above": above, "below": below, "length": length,
            "when": when, "check": check, "follows": follows}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


PATCH_ROWS = 16      # fbank rows of one audio patch of the model
OFFICIAL_ROWS = 1024  # the official model.target_length: 10 s of 10 ms rows, padded to whole patches
OFFICIAL_CLIP_S, OFFICIAL_SHIFT_MS = 10.0, 10.0


def clip_rows(data: dict[str, Any]) -> int:
    """`model.target_length` when null: the official 1024 rows per 10 s at a 10 ms shift, scaled to clip.length_s
    and audio.frame_shift_ms and rounded up to whole patches (5 s: 512; a 5 ms shift: 2048), so the model sees the
    whole clip whatever the units."""
    rows = OFFICIAL_ROWS * (data["clip"]["length_s"] / OFFICIAL_CLIP_S) * (OFFICIAL_SHIFT_MS /
                                                                          data["audio"]["frame_shift_ms"])
    return PATCH_ROWS * max(1, math.ceil(rows / PATCH_ROWS - 1e-9))


def whole_patches(dotted: str, rows: int | None) -> None:
    if rows is not None and rows % PATCH_ROWS:
        raise ValueError(f"'{dotted}' must be a multiple of {PATCH_ROWS} (one patch); got {rows}")


PREPROCESSING = ("---- preprocessing (preprocess/, cavmae-prep): audio, video and clip fix a sample's bytes (their "
                 "digest is recorded in every sample); ingest freezes these sections into the shard folder's "
                 "pipeline.yaml.")


@dataclass
class Audio:
    """The audio track: resampled mono, stored as a Kaldi log-mel fbank (and optionally as FLAC)."""
    sample_rate: int = setting(16000, "official: resample to 16 kHz", min=1000, max=192000)
    channel_policy: str = setting("first", "first (official: sox remix 1) | mix (ffmpeg -ac 1, down-mix of all "
                                  "channels)", choices=("first", "mix"))
    num_mel_bins: int = setting(128, "official kaldi fbank parameters below; the model's frequency size", min=1,
                                max=512)
    frame_shift_ms: float = setting(10.0, "official: one fbank row per 10 ms (model.target_length and "
                                    "SpecAugment's time mask follow it)", min=1.0, max=1000.0)
    frame_length_ms: float = setting(25.0, min=1.0, max=1000.0)
    window_type: str = setting("hanning", choices=("hanning", "hamming", "povey", "rectangular", "blackman"))
    keep_waveform: bool = setting(False, "also store {key}.flac (16 kHz mono) for waveform mixup / re-featurising")
    allow_missing: bool = setting(False, "keep video-only clips with has_audio=false (default: a failure; the "
                                  "model needs both)")


@dataclass
class Video:
    """The frames: `num_frames` square JPEGs per clip."""
    num_frames: int = setting(10, "official: 10 frames over the first clip.length_s seconds", min=1,
                              max=100)
    image_size: int = setting(224, "short side resized to this, then centre crop (official: 224); the model's "
                              "image size", min=16, max=1024)
    official_frame_offset: bool = setting(True, "official reads frame index int(i*N/10)-1 (an OpenCV seek quirk); "
                                          "false: int(i*N/10)")
    resize: str = setting("scaler", "scaler: resize while converting to RGB (fast; mean pixel diff ~1-2.5 levels)\n"
                          "pil: full-size RGB then PIL bilinear, as the official torchvision Resize (exact)",
                          choices=("scaler", "pil"))
    jpeg_quality: int = setting(75, "official: torchvision save_image uses PIL default quality 75", min=1,
                                max=100)
    skip_nonref: bool = setting(False, "ask the decoder to drop non-reference frames (faster; picks may move by a "
                                "frame)")
    allow_missing: bool = setting(False, "keep audio-only clips with has_video=false")


@dataclass
class Clip:
    """Which seconds of a video make a sample."""
    mode: str = setting("first", "first (official: the first length_s seconds) | windows (consecutive windows)",
                        choices=("first", "windows"))
    length_s: float = setting(10.0, "official: 10 s", above=0.0, max=3600.0)
    hop_s: float = setting(10.0, "windows mode: start of window k is k*hop_s", above=0.0, max=3600.0,
                         when=("mode", "windows"))
    min_window_s: float = setting(1.0, "windows mode: a trailing window shorter than this is dropped",
                                  min=0.0, max=3600.0, when=("mode", "windows"))


@dataclass
class Shards:
    """The tar files ingest writes."""
    samples_per_shard: int = setting(128, min=1, max=100_000)
    pattern: str = setting("shard-%06d.tar", "a plain .tar file name with exactly one %d-style field (%d, %6d, "
                           "%06d); no '/' or '..'", check=check_pattern)


@dataclass
class Ray:
    """Where and how ingest runs."""
    address: str | None = setting(None, "null: start a local Ray; or host:6379 of a `ray start --head` / auto / "
                                  "ray://host:10001 (RAY_ADDRESS and --address also work; token auth: see README "
                                  "\"Ingest on a cluster\")")
    workers: int = setting(0, "local Ray CPUs; 0 = all cores", min=0, max=100_000)
    num_cpus_per_task: int = setting(1, min=1, max=1024)
    max_retries: int = setting(3, min=0, max=100)
    videos_per_task: int = setting(4, "work unit of ingest and reprocess: a few videos of one shard (shards stay "
                                   "the same bytes whatever this is); small units keep every core busy and make the "
                                   "job's tail short", min=1, max=100_000)
    video_timeout_s: int = setting(30, "an input that takes longer than this (wall time) becomes a failed row "
                                   "\"timed out after N s\" and its worker is replaced (a 10 s clip takes 0.1-0.3 s; "
                                   "raise it for long videos in clip.mode: windows, 0.1-0.3 s per window)", min=1,
                                   max=86_400)


TRAINING = ("---- training (train/, cavmae-train). Batch sizes are GLOBAL: samples per optimizer step over all ranks, "
            "as the official scripts count them (4 GPUs under DataParallel); each rank takes batch_size / (world x "
            "accum_steps).")


@dataclass
class Model:
    """CAV-MAE size and pretraining loss (the train/model/builders.py builders take this section; mel bins and image size
    come from the audio/video sections of the shards)."""
    size: str = setting("base", "base (official ViT-B) | tiny (tests)", choices=("base", "tiny"))
    target_length: int | None = setting(None, "fbank rows padded/cut to this, whole 16-row patches; null: follows "
                                        "clip.length_s and audio.frame_shift_ms at the official 1024 rows per 10 s "
                                        "of 10 ms rows (10 s, 10 ms: 1024)", min=16, max=16_384,
                                        check=lambda rows: whole_patches("model.target_length", rows),
                                        follows=clip_rows)
    mask_ratio_a: float = setting(0.75, min=0.0, below=1.0)
    mask_ratio_v: float = setting(0.75, min=0.0, below=1.0)
    mask_mode: str = setting("unstructured", "unstructured (official) | time | freq | tf (audio ablations)",
                             choices=("unstructured", "time", "freq", "tf"))
    norm_pix_loss: bool = setting(True)
    mae_loss_weight: float = setting(1.0, min=0.0)
    contrast_loss_weight: float = setting(0.01, min=0.0)
    bidirectional: bool = setting(False, "official: single direction (visual picks its audio); true = the \"Symc\" "
                                  "model")
    contrast_chunks: int = setting(1, "emulate official DataParallel over k chunks of each rank's batch: InfoNCE "
                                   "and masked-MAE mean per chunk, both summed (official base: 4 GPUs x 12)", min=1,
                                   max=1024)
    tr_pos: bool = setting(True, "finetuning: trainable position embeddings (official CAVMAEFT default)")


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
    seed: int = setting(0, "with the epoch, fixes every epoch's order and every random draw (see README)", min=0,
                        max=2 ** 63 - 1)


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
    precision: str = setting("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp16 (official AMP + GradScaler) "
                             "| fp32", choices=("auto", "fp16", "fp32"))
    freqm: int = setting(0, "SpecAugment: widest frequency mask, in mel bins (official pretraining: no SpecAugment, "
                         "no mixup, noise + roll on)", min=0, max=1024)
    timem: int = setting(0, "SpecAugment: widest time mask, in 10 ms rows (scaled to audio.frame_shift_ms)", min=0,
                         max=16_384)
    mixup: float = setting(0.0, "probability that a sample is mixed with a random partner", min=0.0, max=1.0)
    noise: bool = setting(True, "uniform noise + circular time roll of the fbank by up to +-model.target_length rows "
                                "(official: +-1024)")
    log_every: int = setting(20, "optimizer steps between metrics.jsonl records", min=1, max=10**9)
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
    freqm: int = setting(48, "SpecAugment: widest frequency mask, in mel bins", min=0, max=1024)
    timem: int = setting(192, "SpecAugment: widest time mask, in 10 ms rows (official 192 = 1.92 s; scaled to "
                         "audio.frame_shift_ms)", min=0, max=16_384)
    mixup: float = setting(0.5, "probability that a sample is mixed with a random partner (labels mixed alike)",
                           min=0.0, max=1.0)
    num_classes: int = setting(0, "0: from the --labels CSV", min=0, max=1_000_000)
    mode: str = setting("multimodal", "multimodal | audioonly | videoonly | multimodal-audioonly (official "
                        "missingaudioonly) | multimodal-videoonly (official missingvideoonly) | audioonly-lean: see "
                        "train/modes.py", choices=("multimodal", "audioonly", "videoonly", "multimodal-audioonly",
                                                   "multimodal-videoonly", "audioonly-lean", "missingaudioonly",
                                                   "missingvideoonly"))
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


SECTIONS: dict[str, type] = {"audio": Audio, "video": Video, "clip": Clip, "shards": Shards, "ray": Ray,
                             "model": Model, "data": Data, "pretrain": Pretrain, "finetune": Finetune, "eval": Eval}

# Named recipes: `--preset NAME` applies these dotted settings after the config file and before --set.
PRESETS: dict[str, dict[str, Any]] = {
    "scale+": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "scale++": {"pretrain.lr": 2.0e-4, "pretrain.batch_size": 256},
    "vggsound-pt": {"pretrain.lr": 1.0e-4, "pretrain.batch_size": 120},
    "as20k-audioonly": {"finetune.mode": "audioonly"},
    "as20k-videoonly": {"finetune.mode": "videoonly"},
    "as2m-ft": {"finetune.lr": 1.0e-5, "finetune.head_lr_scale": 50.0, "finetune.batch_size": 48,
                "finetune.epochs": 10, "finetune.lr_start_epoch": 2, "finetune.wa_start": 1, "finetune.wa_end": 10,
                "finetune.balanced": True},
    "vggsound-ft": {"finetune.lr": 1.0e-4, "finetune.head_lr_scale": 10.0, "finetune.batch_size": 48,
                    "finetune.epochs": 10, "finetune.lr_start_epoch": 2, "finetune.wa_start": 3,
                    "finetune.wa_end": 10, "finetune.balanced": True, "finetune.loss": "ce", "finetune.metric": "acc"},
    "linear-probe": {"finetune.freeze_base": True, "finetune.mixup": 0.0},
}
PRESET_NOTES = {  # (comment line above the preset, comment after it) in pipeline.yaml
    "scale+": ("Pretraining (reference 4.1; the default pretrain section is the base recipe: lr 5e-5, batch 48)",
               "official script (the released model used 108)"),
    "as20k-audioonly": ("Finetuning (reference 4.2; the default finetune section is AS-20K multimodal)", ""),
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


def _entry(head: str, doc: str) -> list[str]:
    """`head` with `doc` as an aligned trailing comment, continued on aligned comment lines when long."""
    if not doc:
        return [head]
    pad = max(COLUMN, len(head))
    lines = [line for part in doc.split("\n") for line in textwrap.wrap(part, WIDTH - pad - 3)]
    return [f"{head:<{pad}} # {lines[0]}"] + [f"{'':<{pad}} # {line}" for line in lines[1:]]


def _preset(name: str, table: dict[str, Any], note: str) -> list[str]:
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
