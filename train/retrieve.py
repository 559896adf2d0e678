"""Audio↔visual retrieval (official `retrieval.py` protocol, reference §4.3), vectorised.

Features: `forward_feat` (no masking; the modality streams through the joint block with their own norms and
norm_a / norm_v), mean-pooled over tokens, L2-normalised; the similarity is one matrix product. Visual→audio ranks
audios for each visual query (rows = visual), audio→visual the transpose. R@k is the fraction of queries whose
paired item ranks below k (rank 0 = best), MR the median rank + 1.

CAV-MAE Sync (`--strategy`, released src/retrieval.py): every frame of a clip with its own audio segment gives one
audio and one visual feature per frame (the global tokens, or with `--local` the mean of the patch tokens), and two
clips compare by an aggregate of their T x T frame-pair cosines (`frame_similarity`). A CAV-MAE checkpoint can be
scored so too: its one audio feature stands for every frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.augment import device_augment
from cavmae.train.failures import shard_list
from cavmae.train.loaders import eval_loader
from cavmae.train.model.sync import CAVMAESync
from cavmae.train.precision import autocast
from cavmae.train.transform import Transform


def run(cfg: Config, *, shards: str, checkpoint: str, frames: str | int, strategy: str | None = None,
        local: bool = False) -> dict[str, Any]:
    """`cavmae-train retrieve`: R@1/5/10 and median rank both ways over `shards` with a checkpoint's encoders;
    with `strategy`, per-frame features of every frame compared by that aggregation (`frames` is then "all")."""
    device = dist.init()
    cfg, urls, _ = st.shard_sets(cfg, shards)
    model = st.load_model(cfg, checkpoint, visual=True)
    tf = st.transform(cfg, st.NO_AUGMENTATION, frame="all" if strategy else frames)
    audio, visual, _ = features(model.to(device), urls, tf, batch_size=cfg.eval.batch_size,
                                num_workers=cfg.data.num_workers, device=device, precision=cfg.pretrain.precision,
                                per_frame=strategy is not None, local=local)
    if strategy:
        return frame_retrieval(audio, visual, strategy)
    return retrieval(audio, visual) | {"frames": frames}


@torch.no_grad()
def features(model: torch.nn.Module, urls: list[str], transform: Transform, *, batch_size: int, num_workers: int,
             device: torch.device, precision: str, per_frame: bool = False,
             local: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """L2-normalised mean-pooled audio [N, D] and visual [N, D] features (`per_frame`: [N, frames, D], each frame
    normalised) and keys, from all ranks, sorted by key."""
    model = dist.unwrap(model).eval()
    audio, visual, keys = [], [], []
    for batch in eval_loader(urls, transform, batch_size=batch_size, num_workers=num_workers):
        batch = device_augment(batch, device)
        if per_frame:
            a, v = frame_features(model, batch, device, precision, local)
        else:
            a, v = pooled_features(model, batch, device, precision, local)
        audio.append(F.normalize(a, dim=-1).cpu())
        visual.append(F.normalize(v, dim=-1).cpu())
        keys += batch["key"]
    parts = [p for p in dist.gather_objects((audio, visual, keys)) if p[2]]
    if not parts:
        raise NoSamples(f"no decodable sample in {len(urls)} shard(s): {shard_list(urls)}")
    all_keys = [k for p in parts for k in p[2]]
    order = torch.as_tensor(np.argsort(all_keys, kind="stable"))
    a = torch.cat([x for p in parts for x in p[0]])[order]
    v = torch.cat([x for p in parts for x in p[1]])[order]
    return a, v, [all_keys[i] for i in order]


def pooled_features(model: torch.nn.Module, batch: dict[str, Any], device: torch.device,
                    precision: str, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled (not normalised) float32 audio [B, D] and visual [B, D] features of a `device_augment`ed batch.
    With several frames per sample (`image` [B, frames, 3, H, W], eval's "all") the visual feature is the mean of
    the frames' pooled features; the audio stream runs once (a Sync model: the mean over its frame pairs of
    `frame_features`)."""
    if isinstance(model, CAVMAESync):
        a, v = frame_features(model, batch, device, precision, local)
        return a.mean(1), v.mean(1)
    images = batch["image"]
    images = images.unsqueeze(1) if images.dim() == 4 else images
    with autocast(device, precision):
        a = model.audio_feat(batch["audio"]).float().mean(1)
        v = torch.stack([model.visual_feat(images[:, k]).float().mean(1) for k in range(images.shape[1])]).mean(0)
    return a, v


def frame_features(model: torch.nn.Module, batch: dict[str, Any], device: torch.device, precision: str,
                   local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame (not normalised) float32 audio and visual features [B, frames, D] of a `device_augment`ed batch.
    A Sync model runs each (segment, frame) pair: its global tokens, or with `local` (or without cls tokens) the
    mean of its patch tokens. A CAV-MAE model's one audio feature is repeated for every frame."""
    images = batch["image"]
    images = images.unsqueeze(1) if images.dim() == 4 else images
    b, t = images.shape[:2]
    with autocast(device, precision):
        if isinstance(model, CAVMAESync):
            audio = batch["audio"]
            audio = audio.unsqueeze(1) if audio.dim() == 3 else audio
            out = model.sync_features(audio.flatten(0, 1), images.flatten(0, 1))
            if model.cls_token and not local:
                a, v = out["global_a"], out["global_v"]
            else:
                a, v = out["tokens_a"].mean(1), out["tokens_v"].mean(1)
            return a.float().view(b, t, -1), v.float().view(b, t, -1)
        a = model.audio_feat(batch["audio"]).float().mean(1)
        v = torch.stack([model.visual_feat(images[:, k]).float().mean(1) for k in range(t)], dim=1)
    return a.unsqueeze(1).expand(-1, t, -1), v


def ranks(similarity: torch.Tensor) -> torch.Tensor:
    """Rank (0 = best) of the diagonal item in each row: how many candidates score strictly higher."""
    return (similarity > similarity.diagonal().unsqueeze(1)).sum(1)


def recall_metrics(similarity: torch.Tensor) -> dict[str, float]:
    r = ranks(similarity).numpy()
    return {"R@1": float((r < 1).mean()), "R@5": float((r < 5).mean()), "R@10": float((r < 10).mean()),
            "MR": float(np.median(r) + 1)}


# CAV-MAE Sync (released src/retrieval.py `get_agg_sim_mat`): a clip is T per-frame features, and the similarity of
# two clips aggregates their T x T frame-pair cosines: all pairs (mean, max) or the time-aligned ones (diagonal_*).
STRATEGIES = ("mean", "max", "diagonal_mean", "diagonal_max")


def frame_similarity(queries: torch.Tensor, items: torch.Tensor, strategy: str,
                     block_elements: int = 1 << 24) -> torch.Tensor:
    """[Nq, Ni] float32 similarities of clips `queries` [Nq, T, D] to clips `items` [Ni, T, D] by `strategy`.

    The released script loops over clip pairs and frame pairs (N^2 T^2 float32 cosines in Python). Here the
    cosines are float32 matrix products (bench/sync_retrieval.py: 1e2-1e4 times faster at N=1600, T=16): mean = the
    dot product of the normalised frames' means (mean is linear), diagonal_mean = one [Nq, T*D] x [T*D, Ni] product
    / T, diagonal_max = T [Nq, Ni] products, max = all frame pairs, by blocks of query clips holding at most
    `block_elements` cosines at a time.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
    q = F.normalize(queries.float(), dim=-1)
    x = F.normalize(items.float(), dim=-1)
    (nq, t, d), ni = q.shape, x.shape[0]
    if strategy == "mean":
        return q.mean(1) @ x.mean(1).T
    if strategy == "diagonal_mean":
        return q.reshape(nq, t * d) @ x.reshape(ni, t * d).T / t
    if strategy == "diagonal_max":
        return torch.stack([q[:, k] @ x[:, k].T for k in range(t)]).amax(0)
    flat = x.reshape(ni * t, d).T
    step = max(1, block_elements // (t * t * ni))
    return torch.cat([(q[i:i + step].reshape(-1, d) @ flat).reshape(-1, t, ni, t).amax(dim=(1, 3))
                      for i in range(0, nq, step)])


def frame_retrieval(audio: torch.Tensor, visual: torch.Tensor, strategy: str) -> dict[str, Any]:
    """`retrieval` for per-frame features [N, T, D] by a released aggregation strategy."""
    sim = frame_similarity(visual, audio, strategy)  # every strategy is symmetric: audio->visual is the transpose
    return {"video_to_audio": recall_metrics(sim), "audio_to_video": recall_metrics(sim.T),
            "samples": int(sim.shape[0]), "strategy": strategy}


def retrieval(audio: torch.Tensor, visual: torch.Tensor) -> dict[str, Any]:
    sim = visual @ audio.T  # rows: visual queries
    return {"video_to_audio": recall_metrics(sim), "audio_to_video": recall_metrics(sim.T),
            "samples": int(sim.shape[0])}
