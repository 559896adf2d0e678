"""One installed name (issue 27): a wheel of this project holds `cavmae` and nothing else at the top level, so a
user's own `train.py` or another project's `shards` package is never shadowed, and `python -m cavmae.train` (what
torchrun runs) is ours wherever it is started."""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_only_cavmae(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("cavmae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = "-".join(wheel.name.split("-")[:2]) + ".dist-info"
    assert {n.split("/")[0] for n in names} == {"cavmae", dist_info}  # site-packages' -S run: no editable finder
    for package in ("preprocess", "shards", "train", "train/model"):
        assert f"cavmae/{package}/__init__.py" in names, package
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import importlib.util as u, cavmae.train, cavmae.shards, cavmae.preprocess\n"
             "print(cavmae.train.__file__.startswith(%r), u.find_spec('train'), u.find_spec('shards'))" % str(site))
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{site}:{sysconfig.get_paths()['purelib']}"}, timeout=120)
    assert out.stdout.split() == ["True", "None", "None"], out.stderr[-2000:]


def test_a_users_train_py_does_not_shadow_the_trainer(tmp_path):
    (tmp_path / "train.py").write_text("raise SystemExit('the user script ran')\n")
    out = subprocess.run([sys.executable, "-m", "cavmae.train", "--help"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout, out.stderr[-2000:]


def test_ingest_runs_outside_the_checkout(tmp_path):
    """Run from a folder that is not the checkout (as an installed cavmae is), the Ray workers import every module
    by its installed name: a module named by its folder alone (`preprocess.sample`) is not found there."""
    from tests.clips import make_clip

    clip = make_clip(tmp_path / "videos", "one", seconds=1.0, size=(64, 48))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "cavmae.preprocess.cli", "ingest", str(clip), "--out",
                          str(tmp_path / "out"), "--workers", "1", "--no-progress", "--set", "video.num_frames=2",
                          "--set", "video.image_size=32", "--set", "clip.length_s=1.0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok 1 samples" in out.stdout, out.stderr[-3000:]
