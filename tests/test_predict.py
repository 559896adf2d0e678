"""`cavmae predict` on raw videos: after a tiny finetune on the 4-class tone x colour task, videos it was trained on
get their trained label as the top-1 display name."""

import csv
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import LABEL_IDS, TINY  # noqa: E402

from cavmae.cli import main as cavmae  # noqa: E402
from cavmae.train.cli import main as train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_train_never_imports_preprocess():
    """DESIGN.md: what a member means lives in shards/ (shards/fbank.py); only `cavmae` composes the two stages."""
    modules = ("cli", "loaders", "embed", "evaluate", "retrieve", "finetune", "pretrain", "order")
    code = (f"import sys; import {', '.join(f'cavmae.train.{m}' for m in modules)}; "
            "print(sorted(m for m in sys.modules if m.startswith(('cavmae.preprocess', 'preprocess'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def sets(*extra):
    return [a for s in TINY + list(extra) for a in ("--set", s)]


def test_predict_gives_the_trained_label(train_shards, tmp_path, capsys):
    root, labels = train_shards, train_shards / "labels.csv"
    ft = tmp_path / "ft"  # overfit the 32 samples of "val": no augmentation, a constant lr
    assert train(["finetune", "--shards", str(root / "val"), "--labels", str(labels), "--out", str(ft),
                  *sets("finetune.batch_size=8", "finetune.epochs=5", "finetune.lr=1.0e-3",
                        "finetune.head_lr_scale=10.0", "finetune.loss=ce", "finetune.metric=acc", "finetune.wa=false",
                        "finetune.mixup=0.0", "finetune.freqm=0", "finetune.timem=0", "finetune.noise=false",
                        "finetune.lr_start_epoch=100")]) == 0
    truth = dict(csv.reader((root / "inputs" / "val_labels.csv").read_text().splitlines()[1:]))
    videos = []
    for path in sorted((root / "inputs" / "val").glob("*.mp4")):  # two videos of each class
        if sum(1 for v in videos if truth[v.stem] == truth[path.stem]) < 2:
            videos.append(path)
    assert len(videos) == 8
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    capsys.readouterr()
    rc = cavmae(["predict", *map(str, videos), str(broken), "--checkpoint", str(ft / "model.pth"),
                 "--labels", str(labels), "--prep-config", str(root / "val" / "pipeline.yaml"),
                 "--top-k", "2", "--out", str(tmp_path / "p.json")])
    out, err = capsys.readouterr()
    assert rc == 1  # the broken file, named on stderr
    assert err.strip().startswith(f"cavmae: failed: {broken}: ") and len(err.strip().splitlines()) == 1
    results = json.loads((tmp_path / "p.json").read_text())
    assert [r["source"] for r in results] == list(map(str, videos))
    names = {mid: f"class {i}" for i, mid in enumerate(LABEL_IDS)}
    for r in results:
        top = r["top"]
        assert len(top) == 2 and top[0]["score"] >= top[1]["score"] and 0 < sum(t["score"] for t in top) <= 1 + 1e-6
        assert top[0]["label"] == names[truth[r["video_id"]]], r
        assert top[0]["index"] == LABEL_IDS.index(truth[r["video_id"]])
    assert out.splitlines()[0].startswith(f"{videos[0]}: {results[0]['top'][0]['label']} ")


def test_predict_warns_per_video_only_when_its_audio_is_cut(caplog):
    """A model finetuned on short clips (target_length 128 rows) and a video of 2.98 s: one line naming the video and
    what is cut; a video no longer than the model's length (within a patch) or without audio: nothing."""
    import logging

    import numpy as np

    from cavmae.predict import warn_cut
    from cavmae.shards.config import load_config

    cfg = load_config(sets=["model.target_length=128"])
    with caplog.at_level(logging.WARNING, logger="cavmae.predict"):
        assert warn_cut("long.mp4", {"fbank": np.zeros((298, 128), np.float16)}, cfg)
        assert not warn_cut("short.mp4", {"fbank": np.zeros((140, 128), np.float16)}, cfg)
        assert not warn_cut("silent.mp4", {"fbank": None}, cfg)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("long.mp4: model.target_length 128 keeps the first 1.28 s of its 2.98 s of audio: "
                    "1.70 s (170 rows) are cut")
