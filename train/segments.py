"""Frame-aligned audio segments for CAV-MAE Sync, cut at load time from the stored fbank.

The shards hold one fbank per clip (the CAV-MAE data preparation, which Sync reuses unchanged). Sync pairs frame i
of a clip's T frames with the `rows`-row segment centred on it, in the spectrogram zero-padded or cut to
`target_length` rows (S) as the released loader (src/dataloader_sync.py `map_frame_to_spectrogram`) does:

  centre  round(i * S / T) ("index", the released rule: the frames taken as evenly spread over the clip), or the
          frame's own time in rows ("time": `frame_times_s`, seconds in the file, less the clip's `clip_start_s`;
          frames as decoded, which need not be evenly spread, e.g. in a clip shorter than the frames asked for);
  start   max(0, centre - rows // 2), end = start + rows; a segment past the end is moved back inside: end = S,
          start = max(0, S - rows).

A cut is a slice of the padded fbank: per sample one copy of at most S x F (the padding, as collate does for
CAV-MAE) and one of rows x F per frame used (training: one; "all": T). Measured on one CPU thread (float16, S 1024,
416 rows, 128 bins): 29 us and 106 KB a sample for one frame, 0.27 ms and 1.7 MB for 16; decoding the sample's
JPEG costs milliseconds. Nothing is stored: the shards stay CAV-MAE's.
"""

from __future__ import annotations

from typing import Sequence

import torch

CENTRES = ("index", "time")


def segment_bounds(centre: int, rows: int, total: int) -> tuple[int, int]:
    """[start, end) of the `rows`-row segment centred on row `centre`, kept inside `total` rows (the released
    rule; a spectrogram shorter than a segment gives all of it)."""
    start = max(0, centre - rows // 2)
    end = start + rows
    if end > total:
        end = total
        start = max(0, end - rows)
    return start, end


def frame_centres(indices: Sequence[int], num_frames: int, total: int, centre: str,
                  frame_times_s: Sequence[float] | None = None, clip_start_s: float = 0.0,
                  rows_per_s: float = 100.0) -> list[int]:
    """The centre row of each frame in `indices`: "index" round(i * total / num_frames), "time" the frame's time
    in the clip (`frame_times_s[i] - clip_start_s`) in rows."""
    if centre == "index":
        return [int(round(i * total / num_frames)) for i in indices]
    if centre == "time":
        if frame_times_s is None or len(frame_times_s) <= max(indices):
            raise ValueError("data.segment_centre time needs the sample's frame_times_s for every frame used")
        return [int(round((frame_times_s[i] - clip_start_s) * rows_per_s)) for i in indices]
    raise ValueError(f"segment centre must be one of {CENTRES}, not {centre!r}")


def cut_segments(fbank: torch.Tensor, centres: Sequence[int], rows: int, total: int) -> torch.Tensor:
    """[len(centres), rows, F]: the fbank [n, F] zero-padded or cut to `total` rows, then each centre's segment
    (zero-padded to `rows` when `total` < `rows`)."""
    padded = fbank.new_zeros(max(total, rows), fbank.shape[1])
    n = min(fbank.shape[0], total)
    padded[:n] = fbank[:n]
    out = fbank.new_zeros(len(centres), rows, fbank.shape[1])
    for k, c in enumerate(centres):
        start, end = segment_bounds(c, rows, total)
        out[k, : end - start] = padded[start:end]
    return out
