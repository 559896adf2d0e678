"""A stored frame decodes to exactly the pixels of the official loader (PIL open → convert RGB → Resize(bicubic) →
CenterCrop), whichever decoder `train.images.frame_pixels` uses for it (torchvision's for colour frames at the
target size, PIL's for the rest)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from cavmae.preprocess.features import encode_jpeg
from cavmae.shards.schema import BadSample
from cavmae.train.images import frame_pixels, stack_pixels
from tests.clips import bigbuckbunny


def official_pixels(jpeg: bytes, size: int) -> np.ndarray:
    """The official loader's image path up to ToTensor, as uint8 HxWx3."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    image = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)(image)
    return np.array(transforms.CenterCrop(size)(image))


def footage(size: int) -> np.ndarray:
    """A real frame (Big Buck Bunny), centre-cropped to size x size."""
    with av.open(str(bigbuckbunny())) as container:
        frame = next(container.decode(video=0)).to_image()
    w, h = frame.size
    frame = frame.resize((round(w * size / h), size), Image.BILINEAR)
    left = (frame.size[0] - size) // 2
    return np.asarray(frame.crop((left, 0, left + size, size)))


def save(rgb: np.ndarray, mode: str = "RGB", **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format="JPEG", **options)
    return buf.getvalue()


NOISE = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
VARIANTS = {  # name: (frame size the model wants, JPEG bytes)
    "ingest's encoder, 224": (224, encode_jpeg(footage(224), 75)),
    "4:4:4 q95": (224, save(footage(224), quality=95, subsampling=0)),
    "4:2:2 q50": (224, save(footage(224), quality=50, subsampling=1)),
    "4:2:0 progressive": (224, save(footage(224), quality=75, subsampling=2, progressive=True)),
    "optimised huffman": (224, save(footage(224), quality=75, optimize=True)),
    "noise, odd size 100 (partial MCUs)": (100, save(NOISE, quality=90, subsampling=2)),
    "grey": (224, save(footage(224), "L", quality=75)),
    "CMYK": (224, save(footage(224), "CMYK", quality=90)),
    "larger than the model's size (resized)": (160, encode_jpeg(footage(224), 75)),
    "not square (resized, cropped)": (64, encode_jpeg(footage(224)[:, :150], 75)),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_frame_pixels_are_the_official_loaders(name):
    size, jpeg = VARIANTS[name]
    ours = frame_pixels(jpeg, size)
    assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), official_pixels(jpeg, size))


def test_frames_stack_channel_last_whichever_decoder():
    """`stack_pixels` keeps the batch channel-last in memory for frames of both decoders."""
    frames = [frame_pixels(VARIANTS["ingest's encoder, 224"][1], 224), frame_pixels(VARIANTS["grey"][1], 224)]
    batch = stack_pixels(frames)
    assert batch.shape == (2, 3, 224, 224) and batch.movedim(1, -1).is_contiguous()
    assert torch.equal(batch[0], frames[0]) and torch.equal(batch[1], frames[1])


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_frame_is_one_line_without_a_path(damage):
    jpeg = VARIANTS["ingest's encoder, 224"][1]
    if damage == "truncated":
        jpeg = jpeg[: len(jpeg) // 2]
    else:
        middle = len(jpeg) // 2
        jpeg = jpeg[:middle] + b"\xff" * 50 + jpeg[middle + 50:]
    with pytest.raises(BadSample, match=r"^frame is not a readable JPEG \(") as info:
        frame_pixels(jpeg, 224)
    assert "\n" not in str(info.value) and "/" not in str(info.value) and ".cpp" not in str(info.value)


def test_without_torchvisions_decoder_pil_gives_the_same_pixels(monkeypatch):
    """A torchvision without its (deprecated) JPEG op: PIL decodes every frame, to the same pixels."""
    from cavmae.train import images

    assert images.DECODE_JPEG is not None  # the pinned torchvision has it: the loader's speed depends on it
    jpeg = VARIANTS["ingest's encoder, 224"][1]
    fast = frame_pixels(jpeg, 224)
    monkeypatch.setattr(images, "DECODE_JPEG", None)
    slow = frame_pixels(jpeg, 224)
    assert torch.equal(slow, fast) and slow.stride() == fast.stride()
