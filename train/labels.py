"""Class labels of the samples: the official label index CSV, a sample's class indices, the official soft
label vector (smoothing and mixup) and the class-balance weights of the balanced sampler.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cavmae.shards.errors import UserError
from cavmae.shards.index import SampleIndex
from cavmae.shards.store import open_text
from cavmae.shards.textlist import require_columns


class LabelError(UserError):
    """A label id that the label index does not know (one line, naming the label and the file)."""


def soft_labels(num_classes: int, smooth: float, first: list[int], second: list[int] | None = None,
                lam: float = 1.0) -> torch.Tensor:
    """Official label vector: every entry starts at smooth/K; without mixup positives are *set* to 1-smooth,
    with mixup they get += λ(1-smooth) (first sample) and += (1-λ)(1-smooth) (partner)."""
    y = torch.full((num_classes,), smooth / num_classes)
    if second is None:
        y[list(first)] = 1.0 - smooth
        return y
    for idx in first:
        y[idx] += lam * (1.0 - smooth)
    for idx in second:
        y[idx] += (1.0 - lam) * (1.0 - smooth)
    return y


def read_label_index(path: str | Path) -> dict[str, int]:
    """The official label CSV (`index,mid,display_name`) as label id → class index."""
    import csv

    try:
        with open_text(path, newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or ()]
            require_columns(path, reader.fieldnames, ("index", "mid"),
                            "a label index CSV (index,mid,display_name)", LabelError)
            table = {}
            for row in reader:
                if row["index"] is None or row["mid"] is None:
                    raise ValueError(f"line {reader.line_num} has fewer cells than the header")
                table[row["mid"]] = int(row["index"])
            return table
    except OSError as exc:
        raise LabelError(f"{path}: cannot read label index ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise LabelError(f"{path}: bad label index row ({exc})") from None


def label_indices(sample: dict[str, Any], label_map: dict[str, int] | None, label_file: str | None) -> list[int]:
    """Class indices of a sample: label ids from its metadata mapped through the label index when one is given,
    else its `.labels.txt` member."""
    if label_map is not None:
        out = []
        for label in sample["meta"].get("labels") or []:
            if label not in label_map:
                raise LabelError(f"unknown label id {label!r} (sample {sample['key']!r}) is not in {label_file}")
            out.append(label_map[label])
        return out
    if sample["labels"] is None:
        raise LabelError(f"sample {sample['key']!r} in {sample['url']} has no .labels.txt member; pass --labels")
    return sample["labels"]



def balance_weights(rows: list[dict[str, Any]], index: SampleIndex) -> np.ndarray:
    """Official class-balance weights (`gen_weight_file.py`): label weight 1000/(count+0.01), summed over a
    sample's labels; one per sample of `index` (a sample the manifest does not list weighs nothing)."""
    counts = Counter(label for r in rows for label in r["labels"] or [])
    by_key = {r["key"]: sum(1000.0 / (counts[label] + 0.01) for label in r["labels"] or []) for r in rows}
    return np.array([by_key.get(k.decode(), 0.0) for k in index.key], dtype=np.float64)
