"""The guard against the next machine-dependent pin (issue 25): every test marked `pinned` runs again in a pytest
session with every CPU-dependent code path off (`python -m tests.simd_off`), where the ffmpeg CLI helpers refuse
too. A pin taken on this machine's own SIMD paths or system ffmpeg passes the ordinary run and fails here."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pinned_tests_hold_with_every_cpu_dependent_path_off():
    proc = subprocess.run([sys.executable, "-m", "tests.simd_off", "-m", "pinned", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
