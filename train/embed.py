"""`cavmae-train embed`: one parquet row per sample with its pooled audio and visual embeddings, for downstream use
(cav-mae issue #33, "video feature extraction").

The features are retrieval's (`retrieve.pooled_features`: the unmasked streams after norm_a / norm_v, mean-pooled
over tokens), not L2-normalised, as float32 lists; null for the side a sample does not have (a video-only or
audio-only clip). The samples stream through `eval_loader` (every sample once, no
augmentation) and each batch is written as it comes (`pyarrow.parquet.ParquetWriter`, one row group per batch), so
memory does not grow with the set. The file appears under its name only when complete, and only with rows: a set
where no sample decodes is `NoSamples` (exit 2), as in eval and retrieve.

`--per-frame`: every frame's features instead (`retrieve.frame_features`: a CAV-MAE Sync model's pair of the frame
and its audio segment, its global tokens; a CAV-MAE model's one audio vector repeated per frame), audio and visual
as list<list<float32>>, one inner list per frame.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from cavmae.shards.config import Config
from cavmae.shards.errors import NoSamples
from cavmae.shards.manifest import manifest_rows
from cavmae.shards.store import publish_file
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.augment import device_augment
from cavmae.train.failures import shard_list
from cavmae.train.loaders import eval_loader
from cavmae.train.retrieve import frame_features, pooled_features
from cavmae.train.transform import Transform

SCHEMA = pa.schema([("key", pa.string()), ("video_id", pa.string()),
                    ("audio", pa.list_(pa.float32())), ("visual", pa.list_(pa.float32()))])
PER_FRAME_SCHEMA = pa.schema([("key", pa.string()), ("video_id", pa.string()),
                              ("audio", pa.list_(pa.list_(pa.float32()))),
                              ("visual", pa.list_(pa.list_(pa.float32())))])


def run(cfg: Config, *, shards: str, checkpoint: str, out: str, frames: str | int,
        progress: bool = True, per_frame: bool = False) -> dict:
    """`cavmae-train embed`: the embeddings of every sample of `shards` into the parquet file `out` (`per_frame`:
    of every frame, `frames` is then "all")."""
    device = dist.init()
    if dist.world_size() > 1:
        raise st.UsageError("embed runs as one process (it writes one file); start it without torchrun")
    cfg, urls, _ = st.shard_sets(cfg, shards)
    model = st.load_model(cfg, checkpoint, visual=True)
    frames = "all" if per_frame else frames
    tf = st.transform(cfg, st.NO_AUGMENTATION, frame=frames, needs="")  # a missing side: a null vector
    rows = embed(model.to(device), urls, tf, out, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers,
                 device=device, precision=cfg.pretrain.precision,
                 total=len(manifest_rows(urls, cfg.data.manifest)) or None, progress=progress,
                 per_frame=per_frame)
    return {"rows": rows, "frames": frames, "out": out, **({"per_frame": True} if per_frame else {})}


@torch.no_grad()
def embed(model: torch.nn.Module, urls: list[str], transform: Transform, out: str | Path, *, batch_size: int,
          num_workers: int, device: torch.device, precision: str, total: int | None = None,
          progress: bool = True, per_frame: bool = False) -> int:
    """Write the embeddings of every sample of `urls` to the parquet file `out`; returns the number of rows."""
    schema = PER_FRAME_SCHEMA if per_frame else SCHEMA
    vectors = frame_features if per_frame else pooled_features
    model = dist.unwrap(model).eval()
    rows = 0
    with publish_file(out) as up:  # (a new file, renamed into place once whole)
        with pq.ParquetWriter(up.file, schema) as writer, \
                tqdm(total=total, unit="sample", desc="embed", disable=not progress) as bar:
            for batch in eval_loader(urls, transform, batch_size=batch_size, num_workers=num_workers):
                audio, visual = vectors(model, device_augment(batch, device), device, precision)
                audio, visual = audio.cpu().numpy(), visual.cpu().numpy()
                if per_frame:  # arrow takes one array per frame, not a 2-D one
                    audio, visual = [list(x) for x in audio], [list(x) for x in visual]
                writer.write_table(pa.table({
                    "key": batch["key"], "video_id": batch["video_id"],
                    "audio": [v if has else None for v, has in zip(audio, batch["has_audio"])],
                    "visual": [v if has else None for v, has in zip(visual, batch["has_video"])]},
                    schema=schema))
                rows += len(batch["key"])
                bar.update(len(batch["key"]))
        if not rows:  # as eval and retrieve: no empty parquet that looks like a result
            raise NoSamples(f"no decodable sample in {len(urls)} shard(s): {shard_list(urls)}")
    return rows
