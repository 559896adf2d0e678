"""Top-k labels for video files with a finetuned checkpoint: `preprocess` decodes each video into in-memory
samples exactly as `ingest` would (same `audio`/`video`/`clip` settings), `shards.checked` reads them as the
trainer reads shard samples, and `train` scores them (the eval transform and frames choice,
`device_augment`, `evaluate.batch_probabilities`). Nothing is written to disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from cavmae.preprocess.decode import BadInput
from cavmae.preprocess.inputs import video_id_of
from cavmae.preprocess.sample import iter_samples
from cavmae.shards.checked import SAMPLE_ERRORS, checked
from cavmae.shards.config import Config
from cavmae.shards.samples import group_members
from cavmae.shards.schema import one_line, safe_text
from cavmae.shards.settings import PATCH_ROWS
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.augment import device_augment
from cavmae.train.evaluate import batch_probabilities
from cavmae.train.modes import mode_name, mode_of

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    source: str  # the video path as text (`shards.schema.safe_text`: printable whatever its bytes)
    video_id: str
    window: int | None
    top: list[tuple[int, float]]  # (class index, score), best first


def warn_cut(path: str, sample: dict[str, Any], cfg: Config) -> bool:
    """Warn (and say so) when the model keeps less of this sample's audio than it holds, by more than one patch:
    a model finetuned on short clips follows their length (`model.target_length`), and a longer video is cut."""
    rows = 0 if sample["fbank"] is None else sample["fbank"].shape[0]
    cut = rows - cfg.model.target_length
    if cut <= PATCH_ROWS:
        return False
    shift_s = cfg.audio.frame_shift_ms / 1000
    log.warning("%s: model.target_length %d keeps the first %.2f s of its %.2f s of audio: %.2f s (%d rows) are cut",
                safe_text(path), cfg.model.target_length, cfg.model.target_length * shift_s, rows * shift_s,
                cut * shift_s, cut)
    return True


def video_samples(paths: list[str], cfg: Config) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(path, decoded sample, None) for every sample of every video, or (path, None, reason) for a video that
    cannot become a sample (an input is all or nothing, as in ingest)."""
    for path in paths:
        try:
            samples = []
            for built in iter_samples(path, video_id_of(path), safe_text(path), [], None, cfg):
                members = ((name, data, 0, 0) for name, data in built.members)
                samples += [checked(g.raw()) for g in group_members(members, path, [])]
        except (BadInput, *SAMPLE_ERRORS) as exc:
            yield path, None, one_line(exc)
            continue
        for sample in samples:
            yield path, sample, None


def predict_videos(paths: list[str], cfg: Config, checkpoint: str, *, top_k: int, mode: str,
                   frames: str | int) -> Iterator[Prediction | tuple[str, str]]:
    """A `Prediction` per sample (per window in clip.mode windows), or (path, reason) for a video that failed,
    in the order of `paths`; batches of `eval.batch_size` samples."""
    mode = mode_name(mode)
    device = dist.init()
    model = st.load_model(cfg, checkpoint, finetuned=True, mode=mode, cut_warning=False).to(device).eval()
    transform = st.transform(cfg, st.NO_AUGMENTATION, frame=frames, needs=mode_of(mode).inputs)
    rng = np.random.default_rng(0)  # (the eval transform draws nothing)
    pending: list[tuple[str, dict[str, Any]]] = []

    def flush() -> Iterator[Prediction | tuple[str, str]]:
        scored = []
        for path, sample in pending:  # one at a time: a sample the mode cannot use is named with the reason
            try:
                scored.append((path, sample, {**transform.example(sample, None, rng), "_skipped": 0}))
            except (OSError, ValueError) as exc:  # BadSample (MissingModality too) is a ValueError
                yield path, f"the sample cannot be scored in mode {mode} ({one_line(exc)})"
        pending.clear()
        if not scored:
            return
        batch = device_augment(transform.collate([e for _, _, e in scored]), device)
        probs = batch_probabilities(model, batch, mode=mode, metric=cfg.finetune.metric, device=device,
                                    precision=cfg.finetune.precision).mean(0).numpy()
        for (path, sample, _), p in zip(scored, probs):
            best = np.argsort(-p, kind="stable")[:top_k]
            yield Prediction(safe_text(path), sample["meta"]["video_id"], sample["meta"].get("window"),
                             [(int(i), float(p[i])) for i in best])

    cut_said: set[str] = set()
    for path, sample, error in video_samples(paths, cfg):
        if error is not None:
            yield from flush() if pending else ()
            yield path, error
            continue
        if path not in cut_said and warn_cut(path, sample, cfg):
            cut_said.add(path)
        pending.append((path, sample))
        if len(pending) == cfg.eval.batch_size:
            yield from flush()
    if pending:
        yield from flush()
