"""Memory per task is bounded: a 10-minute video in `clip.mode: windows` (60 consecutive 10 s windows from
one pass) must not raise a worker's peak memory much above a 10 s clip's. Each measurement runs in a fresh
process (peak RSS, `ru_maxrss`, after the imports and a warm-up decode)."""

import json
import subprocess
import sys
from pathlib import Path

from cavmae.preprocess.units import SPOOL_BYTES
from tests.clips import make_clip

REPO = Path(__file__).resolve().parents[1]
PROBE = r"""
import json, resource, sys, tempfile
sys.path.insert(0, sys.argv[1])
from cavmae.preprocess.ingest import INGEST
from cavmae.preprocess.units import assemble_shard, work_unit
from cavmae.preprocess.inputs import InputItem
from cavmae.preprocess.settings import register_sections
from cavmae.shards.config import load_config
register_sections()  # the `ray` settings below are checked, as cavmae-prep's are
cfg = load_config(sets=["clip.mode=windows", "video.image_size=32", "audio.keep_waveform=true",
                        "ray.video_timeout_s=600"]).to_dict()

def task(index, item):  # the real task path: decode, spool, the unit's part, the shard assembled from it
    part, rows = work_unit(INGEST, index, 0, [item], out, cfg)
    assemble_shard(index, [part], rows, out, cfg)
    return rows

with tempfile.TemporaryDirectory() as out:
    task(0, InputItem("warm", sys.argv[3]))  # imports, codecs, torch kernels
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = task(1, InputItem("v", sys.argv[2]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"windows": len(rows), "base_kib": base, "peak_kib": peak,
                  "sample_kib": sum(r["bytes"] for r in rows) // 1024}))
"""


def _peak(video: Path, warm: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, str(REPO), str(video), str(warm)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_ten_minutes_in_windows_costs_no_more_memory_than_ten_seconds(clips_dir):
    kw = dict(size=(64, 48), fps=5, channels=1, sample_rate=16000, preset="ultrafast")
    long = make_clip(clips_dir / "memory", "ten_minutes", seconds=600, **kw)
    short = make_clip(clips_dir / "memory", "ten_seconds", seconds=10, **kw)
    warm = make_clip(clips_dir / "memory", "warm", seconds=2, **kw)
    ten_s, ten_min = _peak(short, warm), _peak(long, warm)
    assert (ten_s["windows"], ten_min["windows"]) == (1, 60)
    grew_mib = (ten_min["peak_kib"] - ten_s["peak_kib"]) / 1024
    # no whole-video or whole-audio buffering (600 s of 16 kHz float32 alone would be 37 MiB), and the input's
    # finished samples (19 MiB here) wait in a spool that holds at most SPOOL_BYTES in memory
    assert grew_mib < 16 + SPOOL_BYTES / 2**20, (ten_s, ten_min)
    print(f"peak RSS: 10 s clip {ten_s['peak_kib'] // 1024} MiB, 10 min clip {ten_min['peak_kib'] // 1024} MiB "
          f"(+{grew_mib:.1f} MiB; samples {ten_min['sample_kib'] // 1024} MiB)")
