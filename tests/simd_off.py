"""Run a pinned computation with every CPU-dependent (vectorised) code path off: bytes that do not depend on the CPU.

Not a test module: tests/test_jobs.py runs `digests` in a fresh process started with `ENV`, and
`python -m tests.simd_off [pytest arguments]` runs pytest so (tests/test_pins.py runs the tests marked `pinned`
again that way: a pin taken on this machine's default paths fails there).

The libraries pick SIMD code by the CPU they find, and some of it rounds differently from their plain code: on an
AVX-512 machine (issue 25) MKL's fbank differed by one float16 step in some bins from its CPU-independent path, and
swresample's 16 kHz audio by one 16-bit step in some samples from its C code. A pin taken on the default paths
therefore holds only on CPUs like the one it was taken on; pins are taken, and checked, with these paths off:

- MKL (torch's BLAS and FFT on x86): MKL_CBWR=COMPATIBLE, the code path giving the same results on every CPU.
- ATen: ATEN_CPU_CAPABILITY=default runs torch's kernels without AVX2/AVX-512.
- NumPy: NPY_DISABLE_CPU_FEATURES turns off the kernels its wheel dispatches above its x86-64-v2 baseline.
- libjpeg-turbo (Pillow's JPEG): JSIMD_FORCENONE=1.
- One thread (OMP/MKL): reductions split per thread would depend on the core count.
- FFmpeg (PyAV's decoders, encoders, swscale, swresample) has no environment variable: `force_ffmpeg_off` calls
  libavutil's av_force_cpu_flags(0) in this process and, as Ray's worker_process_setup_hook, in every Ray worker
  before it opens anything (codecs, the scaler and the resampler read the flags when they are set up).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default",
       "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR", "JSIMD_FORCENONE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SESSION = "CAVMAE_TESTS_SIMD_OFF"  # set by `python -m tests.simd_off`: conftest.py turns FFmpeg's SIMD off too
RAY = {"runtime_env": {"worker_process_setup_hook": "tests.simd_off.force_ffmpeg_off"}}  # ray.init's, for workers


def force_ffmpeg_off() -> None:
    """av_force_cpu_flags(0) in the libavutil PyAV has loaded (the wheel's own copy or the system's)."""
    import av  # noqa: F401  (loads libavutil)

    maps = Path("/proc/self/maps").read_text().splitlines()
    libs = {line.split()[-1] for line in maps if "/libavutil" in line}
    assert len(libs) == 1, f"expected one loaded libavutil, found {sorted(libs)}"
    avutil = ctypes.CDLL(libs.pop())
    avutil.av_force_cpu_flags(0)
    assert avutil.av_get_cpu_flags() == 0


def digests(root: str) -> dict[str, str]:
    """tests.test_jobs.output_digests in `root`, on a private Ray whose workers have FFmpeg's SIMD off (the entry of
    a process of its own: it registers the `ray` section the jobs read)."""
    import ray

    from cavmae.preprocess.settings import register_sections
    from tests.conftest import LOCAL_RAY
    from tests.test_jobs import output_digests

    register_sections()
    force_ffmpeg_off()
    ray.init(**LOCAL_RAY, **RAY)
    try:
        return output_digests(Path(root))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[1:]], {**os.environ, **ENV, SESSION: "1"})
