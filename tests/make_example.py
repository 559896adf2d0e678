"""Make the example input set that README's first command ingests: `python -m tests.make_example DIR`.

A few generated clips in different containers and codecs (labelled by folder), the real Big Buck Bunny
excerpt, and one broken file, so the example run shows a recorded failure next to the samples.
"""

import shutil
import sys
from pathlib import Path

from tests.clips import bigbuckbunny, make_clip


def make_example(root: Path) -> None:
    """Videos under `root`, and beside it `class_labels_indices.csv` naming the two tone folders as classes."""
    for i, (tone, color) in enumerate([(330, "red"), (330, "blue"), (660, "red"), (660, "blue")]):
        make_clip(root / f"tone{tone}", f"{color}_{i}", seconds=4.0, size=(320, 240), tone_hz=tone, color=color,
                  container=("mp4", "mkv", "webm", "mov")[i],
                  vcodec=("libx264", "libvpx-vp9", "libvpx", "libx264")[i],
                  acodec=("aac", "libopus", "libvorbis", "aac")[i])
    make_clip(root / "long", "testsrc_25s", seconds=25.0, size=(640, 360), fps=30, channels=2, sample_rate=44100)
    real = root / "real" / "bigbuckbunny.mp4"
    if not real.exists():
        real.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bigbuckbunny(), real)
    broken = root / "broken" / "truncated.mp4"
    if not broken.exists():
        broken.parent.mkdir(parents=True, exist_ok=True)
        data = make_clip(root.parent / ".src", "whole", seconds=2.0, size=(160, 120)).read_bytes()
        broken.write_bytes(data[: len(data) // 3])
    (root.parent / "class_labels_indices.csv").write_text(
        "index,mid,display_name\n0,/example/tone330,tone330\n1,/example/tone660,tone660\n")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "example/videos")
    make_example(target)
    print(f"example videos in {target}")
