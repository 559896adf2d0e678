"""Video frames: a stored JPEG decoded to the uint8 pixels the model's image size wants, and their fast stacking.

Normalisation is not done here but batched on the device (`train.augment.device_augment`). A frame already stored
at the target size (what ingest writes) is only decoded.

The official loader decodes with PIL. Both PIL and torchvision decode JPEG with libjpeg-turbo (the same integer
IDCT and upsampling), so a colour frame gives the same pixels either way (tests/test_images.py checks every
sampling, progressive and quality variant), and torchvision's `decode_jpeg` writes them straight into a tensor:
~0.18 ms for a 224² frame where PIL's per-row unpacking and `tobytes` take ~0.3 ms, the largest per-sample cost of
the loader (bench/loader.py). PIL still reads the header first (the one-format, size-checked opener) and does what
differs: grey or CMYK frames (its own conversion to RGB) and resizing. torchvision deprecated its image decoders in
0.29 (for torchcodec, which needs the system's FFmpeg libraries): we call its registered op, without the wrapper's
per-call DeprecationWarning, and where a torchvision no longer has it PIL decodes every frame (the same pixels).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.io  # noqa: F401  (registers torch.ops.image, while torchvision has it)
from torchvision import transforms

from cavmae.shards.media import open_jpeg
from cavmae.shards.schema import BadSample, one_line

RGB = 3  # torchvision.io.ImageReadMode.RGB
DECODE_JPEG = getattr(getattr(torch.ops, "image", None), "decode_jpeg", None)  # (data, mode) -> uint8 [C, H, W]


def frame_pixels(jpeg: bytes, size: int) -> torch.Tensor:
    """A stored frame as uint8 [3, size, size] (channel-last in memory), the pixels PIL decodes as the official
    loader does, then the official Resize(short side, bicubic) + CenterCrop (no random crop or flip), skipped when
    the frame is already at the target size (ingest's output). `device_augment` normalises. JPEG only, and a frame
    far larger than `size` is a BadSample before any pixel is decoded (`shards.media.open_jpeg`)."""
    image = open_jpeg(jpeg, size)
    if DECODE_JPEG is not None and image.mode == "RGB" and image.size == (size, size):  # see the module docstring
        try:
            return DECODE_JPEG(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), RGB)
        except RuntimeError as exc:  # its text starts with the source file's path: keep the reason only
            raise BadSample(f"frame is not a readable JPEG ({one_line(str(exc).rsplit(', ', 1)[-1])})") from None
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
