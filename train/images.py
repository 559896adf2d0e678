"""Video frames: a stored JPEG decoded to the uint8 pixels the model's image size wants, and their fast stacking.

Normalisation is not done here but batched on the device (`train.augment.device_augment`). A frame already stored
at the target size (what ingest writes) is only decoded.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import transforms

from cavmae.shards.media import open_jpeg


def frame_pixels(jpeg: bytes, size: int) -> torch.Tensor:
    """A stored frame as uint8 [3, size, size], decoded with PIL as the official loader does, then the official
    Resize(short side, bicubic) + CenterCrop (no random crop or flip), skipped when the frame is already at the
    target size (ingest's output). `device_augment` normalises. JPEG only, and a frame far larger than `size` is a
    BadSample before any pixel is decoded (`shards.media.open_jpeg`)."""
    image = open_jpeg(jpeg, size)
    image.load()
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)(image)
        image = transforms.CenterCrop(size)(image)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def stack_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [..., 3, H, W] uint8 frames that are channel-last in memory (PIL's layout, what `frame_pixels` gives)
    without a strided copy: ~15x faster than `torch.stack` of the CHW views. The result is channel-last in memory
    too; `device_augment` makes it contiguous after normalising."""
    return torch.stack([x.movedim(-3, -1) for x in images]).movedim(-1, -3)
