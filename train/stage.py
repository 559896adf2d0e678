"""What pretraining, finetuning, evaluation and retrieval share: the run folder, shard lists, batch and epoch sizes,
labels, and the data transform built from the config.

Batch sizes in the config are *global* (the official numbers: 48, 120, 36 ... samples per optimizer step); each rank
takes batch_size / (world_size * accum_steps) per micro-batch. An epoch is the number of samples the shards hold (or
`epoch_samples`) divided by the global batch, as the official loader with drop_last (see `train.epochs`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples, NotFound, NotRegular, UserError
from cavmae.shards.fbank import fbank_rows
from cavmae.shards.frozen import adopt_shard_settings
from cavmae.shards.index import SampleIndex, sample_index
from cavmae.shards.manifest import manifest_rows
from cavmae.shards.reader import list_shards
from cavmae.shards.settings import OFFICIAL_SHIFT_MS, PATCH_ROWS
from cavmae.shards.store import Store, check_out_folder, regular_files
from cavmae.train import distributed as dist
from cavmae.train.epochs import EpochPlan
from cavmae.train.failures import shard_list
from cavmae.train.labels import LabelError, balance_weights, read_label_index
from cavmae.train.modes import MODES
from cavmae.train.transform import Transform

log = logging.getLogger(__name__)


class UsageError(UserError):
    """Bad command-line input (missing shards, bad sizes); the CLI prints it on one line and exits with 2."""


def shard_urls(spec: str | None, flag: str) -> list[str]:
    if not spec:
        raise UsageError(f"{flag} is required")
    try:
        return regular_files(list_shards(spec))
    except (NotFound, NotRegular) as exc:  # (no shard matches; a shard is not a regular file)
        raise UsageError(f"{flag}: {exc}") from None


def shard_sets(cfg: Config, shards: str, val_shards: str | None = None
               ) -> tuple[Config, list[str], list[str] | None]:
    """`cfg` with the sample-side settings the shards were made with, and the URLs of --shards and --val-shards.

    The fbank settings, mel bins, clip length and frame count and size come from the `pipeline.yaml` beside the
    shards (`shards.frozen`), so the model's geometry, audio length and waveform mixup follow the data; a run that
    sets one of them to another value, or shard sets made with different ones, stop here with one line naming both
    values. The clip is then what the samples hold (`sample_clip`)."""
    urls = shard_urls(shards, "--shards")
    val_urls = shard_urls(val_shards, "--val-shards") if val_shards else None
    flag = "--shards and --val-shards" if val_urls else "--shards"
    every = urls + (val_urls or [])
    return sample_clip(adopt_shard_settings(cfg, every, flag), every), urls, val_urls


def sample_clip(cfg: Config, urls: list[str]) -> Config:
    """`cfg` with `clip.length_s` shortened to the longest input of the shards (the manifests' `duration_s`) when
    every input was shorter than the clip: ingest cuts a clip at the end of its input, so ESC-50's 5 s files
    ingested at the default 10 s are 498-row samples, and the model's audio length (`model.target_length` when
    unset: 512, not 1024 rows of which half padding) and the cut warning must follow those rows, not the setting.
    Shards without a manifest keep the clip of their `pipeline.yaml`."""
    durations = (row.get("duration_s") for row in manifest_rows(urls, cfg.data.manifest))
    longest = max((d for d in durations if isinstance(d, (int, float)) and math.isfinite(d) and d > 0), default=None)
    if longest is None or longest >= cfg.clip.length_s:
        return cfg
    return cfg.with_overrides([f"clip.length_s={json.dumps(longest)}"])


def run_folder(out: str, cfg: Config) -> Path:
    """Create the run folder and write the exact config used beside the outputs."""
    check_out_folder(out)
    path = Path(out)
    if dist.is_main():
        path.mkdir(parents=True, exist_ok=True)
        Store.of(path).write_text("config.yaml", cfg.to_yaml())  # (a new file, not through a link left there)
    dist.barrier()
    return path


def epoch_plan(urls: list[str], cfg: Config, stage: Config, section: str, *, balanced: bool = False,
               world_size: int | None = None, rank: int | None = None) -> tuple[SampleIndex, EpochPlan]:
    """The sample index of `urls` (offsets from the manifest, else a scan of the shards) and how its epochs are
    cut into steps for this rank (`train.epochs`); `balanced` draws by the official class-balance weights."""
    rows = manifest_rows(urls, cfg.data.manifest)
    try:
        index = sample_index(urls, rows)
    except OSError as exc:
        raise UsageError(f"--shards: {exc}") from None
    if not len(index):
        raise NoSamples(f"no decodable sample in {len(urls)} shard(s): {shard_list(urls)}")
    weights = balance_weights(rows, index) if balanced else None
    if balanced and not weights.any():
        raise UsageError(f"{section}.balanced needs the manifest.parquet of the shards (labels per sample)")
    try:
        plan = EpochPlan(size=len(index), samples=stage.epoch_samples or len(index), global_batch=stage.batch_size,
                         accum_steps=stage.accum_steps, world_size=world_size or dist.world_size(),
                         rank=dist.rank() if rank is None else rank, seed=cfg.data.seed, weights=weights)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if plan.steps < 1:
        raise UsageError(f"{plan.samples} samples per epoch is less than one batch of {stage.batch_size}")
    return index, plan


def order_key(plan: EpochPlan) -> dict[str, int]:
    """What fixes the data order of a run besides the epoch (kept in last.pt; a resume must not change it)."""
    return {"seed": plan.seed, "global_batch": plan.global_batch, "samples": plan.samples, "size": plan.size,
            "balanced": int(plan.weights is not None)}


def labels(cfg: Config, label_csv: str | None, section: Config) -> tuple[dict[str, int] | None, int]:
    """(label id → index map or None to use `.labels.txt`, number of classes)."""
    label_map = read_label_index(label_csv) if label_csv else None
    num_classes = section.num_classes or (max(label_map.values()) + 1 if label_map else 0)
    if not num_classes:
        raise UsageError("the number of classes is unknown: pass --labels label_index.csv or set num_classes")
    return label_map, num_classes


def check_manifest_labels(urls: list[str], cfg: Config, label_map: dict[str, int] | None, label_csv: str | None):
    """Fail before training, on one line, when the manifest holds a label id the label index does not know."""
    if label_map is None:
        return
    for row in manifest_rows(urls, cfg.data.manifest):
        for label in row["labels"] or []:
            if label not in label_map:
                raise LabelError(f"unknown label id {label!r} (video {row['video_id']!r}) is not in {label_csv}")


def model_settings(cfg: Config) -> dict[str, Any]:
    """The keywords of the model builders: the `model:` section, with the geometry that follows from the samples
    (mel bins, frame size, clip length; `shard_sets` makes them the shards' own)."""
    return {**cfg.model.to_dict(), "num_mel_bins": cfg.audio.num_mel_bins, "image_size": cfg.video.image_size}


def warn_audio_cut(cfg: Config) -> None:
    """Warn when the model's audio length keeps less of a clip than the clip holds, by more than one patch (unset,
    `model.target_length` follows the clip and cuts nothing). The clip's rows are the samples' own once `shard_sets`
    made `clip.length_s` the shards' (498 rows for 5 s of 10 ms rows); every command that runs a model on shards
    warns once (`cavmae predict`, whose videos' lengths are their own, warns per video instead)."""
    rows = fbank_rows(int(cfg.clip.length_s * cfg.audio.sample_rate), cfg.audio)
    cut = rows - cfg.model.target_length
    if cut > PATCH_ROWS:
        shift_s = cfg.audio.frame_shift_ms / 1000
        log.warning("model.target_length %d keeps the first %.2f s of every %g s clip (audio.frame_shift_ms %g): "
                    "%.2f s (%d rows) are cut; leave model.target_length unset to follow clip.length_s",
                    cfg.model.target_length, cfg.model.target_length * shift_s, cfg.clip.length_s,
                    cfg.audio.frame_shift_ms, cut * shift_s, cut)


def time_rows(cfg: Config, rows_at_10ms: int) -> int:
    """A width given in official 10 ms rows (SpecAugment's `timem`) in rows of the shards' frame shift."""
    return round(rows_at_10ms * OFFICIAL_SHIFT_MS / cfg.audio.frame_shift_ms)


# SpecAugment's widest masks, at most the official share of the input: 48 of 128 mel bins, 192 of 1024 rows (and
# AST's ESC-50 96 of 512). The official widths are kept on official-size inputs, and a smaller one (64 bins, 3 s) is
# not mostly hidden: the absolute 48 and 192 would mask up to 75 % of it.
MAX_MASK_SHARE = {"freqm": 48 / 128, "timem": 192 / 1024}


def mask_widths(cfg: Config, aug: dict[str, Any]) -> dict[str, int]:
    """`aug`'s SpecAugment widths in the shards' units (`timem` in rows of the frame shift), each capped to
    `MAX_MASK_SHARE` of the input (mel bins, `model.target_length` rows), with one warning line when one is."""
    widths = {"freqm": aug["freqm"], "timem": time_rows(cfg, aug["timem"])}
    sizes = {"freqm": cfg.audio.num_mel_bins, "timem": cfg.model.target_length}
    capped = {name: min(width, int(sizes[name] * MAX_MASK_SHARE[name])) for name, width in widths.items()}
    for name, width in widths.items():
        if capped[name] < width:
            log.warning("SpecAugment %s %d capped to %d: at most %g of the %d %s (the official share)", name, width,
                        capped[name], MAX_MASK_SHARE[name], sizes[name],
                        "mel bins" if name == "freqm" else "rows of model.target_length")
    return capped


def transform(cfg: Config, aug: dict[str, Any], *, frame: str | int, num_classes: int = 0,
              label_map: dict[str, int] | None = None, label_csv: str | None = None, needs: str = "av") -> Transform:
    """The sample transform of `cfg` with the augmentation `aug` (`augmentation` or `NO_AUGMENTATION`); its time
    widths scale with the frame shift (the noise roll spans +-target_length rows, which follows it too) and its
    masks are capped to the input (`mask_widths`). `needs`: the modalities its model reads ("av", "a", "v"; "" for
    none required, as `embed`), see `train.transform.Transform`."""
    aug = {**aug, **mask_widths(cfg, aug)}
    data = {**cfg.data.to_dict(), "target_length": cfg.model.target_length, "image_size": cfg.video.image_size,
            "num_mel_bins": cfg.audio.num_mel_bins}
    if cfg.model.variant == "sync":  # each frame with its audio segment (train/segments.py)
        data["segment"] = {"rows": cfg.model.audio_length, "centre": cfg.data.segment_centre,
                           "rows_per_s": 1000 / cfg.audio.frame_shift_ms}
    return Transform(data, aug, frame=frame, num_frames=cfg.video.num_frames, num_classes=num_classes,
                     label_map=label_map, label_file=label_csv, seed=0, audio=cfg.audio.to_dict(), needs=needs)


def checkpoint_arg(path: str) -> dict[str, Any]:
    """The state dict that `--checkpoint path` names (weights_only; `module.` stripped), or a one-line UsageError."""
    from cavmae.train.checkpoint import CheckpointError, load_state_dict_file

    try:  # (missing, or not a regular file: one line from `read_checkpoint`)
        return load_state_dict_file(path)
    except CheckpointError as exc:
        raise UsageError(f"--checkpoint {exc}") from None


def load_model(cfg: Config, path: str, *, finetuned: bool = False, mode: str | None = None, visual: bool = False,
               cut_warning: bool = True):
    """The model a checkpoint holds, built from `cfg.model`: the finetuning model when the checkpoint has a
    classification head (`mlp_head.*`; without visual weights, the audio-only one), else the pretraining one.
    `finetuned` requires the head, `mode` (a `train.modes` name) a model that can run it, `visual` visual weights;
    `cut_warning`: `warn_audio_cut` for the clip of `cfg`."""
    from cavmae.train.checkpoint import CheckpointError, load_pretrained_into
    from cavmae.train.model import build_finetune_model, build_pretrain_model

    sd = checkpoint_arg(path)
    head = sd.get("mlp_head.1.weight")
    if head is None and finetuned:
        raise UsageError(f"{path}: no classification head (mlp_head.*): not a finetuned checkpoint")
    audio_only = head is not None and "patch_embed_v.proj.weight" not in sd
    if audio_only and (visual or (mode is not None and not MODES[mode].audio_path_only)):
        wanted = "visual weights" if visual else f"mode {mode}"
        raise UsageError(f"--checkpoint {path}: an audio-only model (no visual weights) cannot serve {wanted}")
    if cut_warning:
        warn_audio_cut(cfg)
    if head is None:
        model = build_pretrain_model(model_settings(cfg))
    else:
        model = build_finetune_model(model_settings(cfg), head.shape[0], audio_only=audio_only)
    try:
        load_pretrained_into(model, sd, source=f"--checkpoint {path} (this config and shards)")
    except CheckpointError as exc:  # one line, naming what does not fit
        raise UsageError(str(exc)) from None
    return model


def augmentation(stage: Config) -> dict[str, Any]:
    """The stage's augmentation settings (pretraining has no labels, so no label_smooth: none there)."""
    return {k: stage[k] if k in stage else off for k, off in NO_AUGMENTATION.items()}


NO_AUGMENTATION = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}
