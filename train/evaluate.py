"""Evaluation: mAP and accuracy computed here (no sklearn), multi-frame probability aggregation, validation losses.

Official protocol (reference §4.2): for every frame index 0..9 the whole eval set is scored, logits become
probabilities (sigmoid for mAP, softmax for accuracy) and the ten probability matrices are averaged; per-epoch
validation uses the middle frame only. We decode all frames of a sample in one pass instead of ten passes over
the data; the numbers are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.augment import device_augment
from cavmae.train.failures import shard_list
from cavmae.train.loaders import eval_loader
from cavmae.train.modes import mode_name, mode_of
from cavmae.train.precision import autocast
from cavmae.train.transform import Transform


def run(cfg: Config, *, shards: str, checkpoint: str, labels_csv: str | None, mode: str | None,
        frames: str | int) -> dict[str, Any]:
    """`cavmae-train eval`: the metric of a finetuned checkpoint over `shards`, per frame and frame-averaged, in
    `mode` (default finetune.mode)."""
    mode = mode_name(mode or cfg.finetune.mode, "--mode" if mode else "finetune.mode")
    device = dist.init()
    cfg, urls, _ = st.shard_sets(cfg, shards)
    model = st.load_model(cfg, checkpoint, finetuned=True, mode=mode)
    label_map, _ = st.labels(cfg, labels_csv, cfg.finetune) if labels_csv else (None, 0)
    tf = st.transform(cfg, st.NO_AUGMENTATION, frame=frames, num_classes=model.mlp_head[1].out_features,
                      label_map=label_map, label_csv=labels_csv, needs=mode_of(mode).inputs)
    pred = predict(model.to(device), urls, tf, mode=mode, metric=cfg.finetune.metric,
                   batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, device=device,
                   precision=cfg.finetune.precision)
    return score(pred, cfg.finetune.metric) | {"mode": mode, "frames": frames}


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class as sklearn's `average_precision_score`: Σ (R_k - R_{k-1}) P_k over distinct score thresholds
    (tied scores form one threshold). Returns nan when the class has no positive."""
    positives = targets.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tp = np.cumsum(targets)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes that have at least one positive (sklearn gives 0 with a warning for the others)."""
    aps = [average_precision(scores[:, k], targets[:, k] > 0.5) for k in range(scores.shape[1])]
    return float(np.nanmean(aps))


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    return float((scores.argmax(1) == targets.argmax(1)).mean())


METRICS = {"mAP": mean_average_precision, "acc": accuracy}


def probabilities(logits: torch.Tensor, metric: str) -> torch.Tensor:
    return torch.sigmoid(logits) if metric == "mAP" else torch.softmax(logits, dim=-1)


@torch.no_grad()
def batch_probabilities(model: torch.nn.Module, batch: dict[str, Any], *, mode: str, metric: str,
                        device: torch.device, precision: str) -> torch.Tensor:
    """Probabilities `[frames, B, K]` on the CPU of one `device_augment`ed batch, one slice per frame it holds (an
    audio-only mode scores once: the frame does not matter)."""
    audio, images = batch["audio"], batch["image"]
    images = images.unsqueeze(1) if images.dim() == 4 else images  # [B, frames, 3, H, W]
    per_frame_audio = audio.dim() == 4  # CAV-MAE Sync: each frame's own segment [B, frames, rows, F]
    if not (mode_of(mode).frames_matter or per_frame_audio):
        images = images[:, :1]
    with autocast(device, precision):
        return torch.stack([probabilities(model(audio[:, k] if per_frame_audio else audio, images[:, k], mode)
                                          .float(), metric).cpu() for k in range(images.shape[1])])


@torch.no_grad()
def predict(model: torch.nn.Module, urls: list[str], transform: Transform, *, mode: str, metric: str,
            batch_size: int, num_workers: int, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """Probabilities `[frames, N, K]` (one slice per frame used), targets `[N, K]` and keys, gathered from all ranks
    and sorted by key. An audio-only mode scores once: the frame does not matter."""
    model = dist.unwrap(model)
    model.eval()
    probs, targets, keys = [], [], []
    for batch in eval_loader(urls, transform, batch_size=batch_size, num_workers=num_workers):
        batch = device_augment(batch, device)
        probs.append(batch_probabilities(model, batch, mode=mode, metric=metric, device=device, precision=precision))
        targets.append(batch["label"].cpu())
        keys += batch["key"]
    parts = dist.gather_objects((torch.cat(probs, 1) if probs else None, torch.cat(targets) if targets else None,
                                 keys))
    parts = [p for p in parts if p[0] is not None]
    if not parts:
        raise NoSamples(f"no decodable sample in {len(urls)} shard(s): {shard_list(urls)}")
    all_keys = [k for p in parts for k in p[2]]
    order = np.argsort(all_keys, kind="stable")
    return {"probs": torch.cat([p[0] for p in parts], 1).numpy()[:, order],
            "targets": torch.cat([p[1] for p in parts]).numpy()[order],
            "keys": np.asarray(all_keys)[order]}


def score(pred: dict[str, np.ndarray], metric: str) -> dict[str, Any]:
    """The metric per frame and of the frame-averaged probabilities."""
    fn = METRICS[metric]
    per_frame = [fn(p, pred["targets"]) for p in pred["probs"]]
    return {metric: fn(pred["probs"].mean(0), pred["targets"]), f"{metric}_per_frame": per_frame,
            "samples": int(pred["targets"].shape[0])}


@torch.no_grad()
def pretrain_losses(model: torch.nn.Module, urls: list[str], transform: Transform, *, batch_size: int,
                    num_workers: int, device: torch.device, precision: str) -> dict[str, float]:
    """Mean pretraining losses over a validation set (random masks, as the official validation)."""
    model = dist.unwrap(model)
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in eval_loader(urls, transform, batch_size=batch_size, num_workers=num_workers):
        if batch["audio"].shape[0] % model.contrast_chunks:
            continue  # a last partial batch that does not split into the contrastive chunks
        batch = device_augment(batch, device)
        with autocast(device, precision):
            out = model(batch["audio"], batch["image"])
        for name in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc"):
            sums[name] = sums.get(name, 0.0) + float(out[name])
        count += 1
    totals = torch.tensor([count] + [sums.get(n, 0.0) for n in ("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")],
                          dtype=torch.float64)
    totals = dist.all_reduce_mean(totals) * dist.world_size()
    n = max(float(totals[0]), 1.0)
    model.train()
    return {f"val_{name}": float(v) / n for name, v in zip(("loss", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc"),
                                                             totals[1:])}
