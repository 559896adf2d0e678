"""One installed name (issue 27): a wheel of this project holds `cavmae` and nothing else at the top level, so a
user's own `train.py` or another project's `shards` package is never shadowed, and `python -m cavmae.train` (what
torchrun runs) is ours wherever it is started."""

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
