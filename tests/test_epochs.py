"""Exact epochs: every sample once per epoch, equal batches per rank, the same global steps on any world size and
worker count, class-balanced draws, and runs that stop (cleanly or by kill -9) and resume bit-identical on the CPU.

The order is checked through the two interfaces a user has (`cavmae-train order`, the training loader itself), on
tiny shards of uneven sizes made with the project's own writer."""

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY, color_frames, tone_fbank, write_synthetic_shards  # noqa: E402

from cavmae.shards.index import sample_index, scan_spans  # noqa: E402
from cavmae.shards.manifest import read_rows  # noqa: E402
from cavmae.shards.schema import sample_members  # noqa: E402
from cavmae.shards.writer import write_shard  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.epochs import EpochPlan  # noqa: E402
from cavmae.train.loaders import train_loader  # noqa: E402
from cavmae.train.transform import Transform  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = {"target_length": 128, "mean": -5.081, "std": 4.4849, "image_size": 64,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
NO_AUG = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """26 samples in shards of 7, 7, 7 and 5 (manifest with offsets beside them)."""
    folder = tmp_path_factory.mktemp("uneven")
    write_synthetic_shards(folder, 26, 7)
    return folder


def order(capsys, shards, epoch, world, rank, *extra):
    capsys.readouterr()
    rc = main(["order", "--shards", str(shards), "--epoch", str(epoch), "--world-size", str(world), "--rank",
               str(rank), *[a for s in extra for a in ("--set", s)]])
    out = capsys.readouterr().out
    assert rc == 0
    return [line.split() for line in out.splitlines()]


def test_every_sample_once_per_epoch_equal_batches_and_elastic_steps(uneven, capsys):
    for batch, expect in ((2, 26), (4, 24)):  # 26 samples: a global batch of 4 drops a tail of 2
        first = None
        for world in (1, 2, 4):
            if batch % world:
                continue
            ranks = [order(capsys, uneven, 1, world, r, f"pretrain.batch_size={batch}") for r in range(world)]
            assert len({len(r) for r in ranks}) == 1  # every rank the same number of batches
            steps = [sorted(k for r in ranks for k in r[s]) for s in range(len(ranks[0]))]
            keys = [k for s in steps for k in s]
            assert len(keys) == expect and len(set(keys)) == expect  # each sample at most once, tail < one batch
            first = first or steps
            assert steps == first  # the samples of every global step do not depend on the world size
    e1 = [k for b in order(capsys, uneven, 1, 1, 0, "pretrain.batch_size=2") for k in b]
    e2 = [k for b in order(capsys, uneven, 2, 1, 0, "pretrain.batch_size=2") for k in b]
    assert sorted(e1) == sorted(e2) and e1 != e2  # every epoch a new permutation of the same samples
    assert [k for b in order(capsys, uneven, 2, 1, 0, "pretrain.batch_size=2", "data.seed=1") for k in b] != e2
    # 4 ranks x 2 micro-batches of accumulation: the same global steps again
    ranks = [order(capsys, uneven, 1, 4, r, "pretrain.batch_size=8", "pretrain.accum_steps=2") for r in range(4)]
    one = order(capsys, uneven, 1, 1, 0, "pretrain.batch_size=8")
    assert [sorted(k for r in ranks for b in r[2 * s:2 * s + 2] for k in b) for s in range(3)] == \
        [sorted(b) for b in one]
    assert main(["order", "--shards", str(uneven), "--epoch", "1", "--world-size", "2", "--rank", "2"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["order", "--shards", str(uneven), "--epoch", "0"])
    assert exit_info.value.code == 2


def loader_steps(shards, world, workers, batch=4, epoch=0, first=0):
    """Sorted keys of every global step as the training loaders of `world` ranks read them."""
    index = sample_index([str(p) for p in sorted(Path(shards).glob("*.tar"))])
    tf = Transform(DATA, NO_AUG, frame="random", num_frames=4, num_classes=0, label_map=None, label_file=None, seed=0)
    per_rank = []
    for rank in range(world):
        plan = EpochPlan(size=len(index), samples=len(index), global_batch=batch, accum_steps=1, world_size=world,
                         rank=rank, seed=0)
        per_rank.append([b["key"] for b in train_loader(index, tf, plan, epoch=epoch, first=first,
                                                         count=plan.batches - first, num_workers=workers)])
    assert len({len(r) for r in per_rank}) == 1
    return [sorted(k for r in per_rank for k in r[s]) for s in range(len(per_rank[0]))]


def test_loader_steps_do_not_depend_on_world_size_or_workers(uneven, capsys):
    reference = loader_steps(uneven, 1, 0)
    assert reference == [sorted(b) for b in order(capsys, uneven, 1, 1, 0, "pretrain.batch_size=4")]
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            if (world, workers) != (1, 0):
                assert loader_steps(uneven, world, workers) == reference, (world, workers)
    # resuming at step 4 reads steps 4.. only, the same samples
    assert loader_steps(uneven, 2, 1, first=4) == reference[4:]


def test_one_shard_with_four_workers(tmp_path, capsys):
    write_synthetic_shards(tmp_path, 10, 10)
    steps = loader_steps(tmp_path, 1, 4, batch=2)
    assert len(steps) == 5 and sorted(k for s in steps for k in s) == sorted(r["key"] for r in
                                                                            read_rows(tmp_path / "manifest.parquet"))
    assert steps == loader_steps(tmp_path, 1, 0, batch=2)


def test_index_from_manifest_offsets_equals_scan_and_corrupt_samples_are_skipped(uneven, tmp_path):
    urls = [str(p) for p in sorted(uneven.glob("*.tar"))]
    rows = read_rows(uneven / "manifest.parquet")
    assert all(r["offset"] is not None for r in rows)
    a, b = sample_index(urls, rows), sample_index(urls)
    for field in ("shard", "key", "offset", "length"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert [s[0] for s in scan_spans(urls[0])] == [r["key"] for r in sorted(rows, key=lambda r: r["offset"])
                                                 if r["shard"] == Path(urls[0]).name]
    # a truncated shard without a manifest keeps the samples before the damage
    data = Path(urls[0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2 + 100])
    assert len(sample_index([str(tmp_path / "cut.tar")])) == 3  # of 7; the 4th is cut short
    # a sample whose npy is garbage: the training batch is one smaller and says so
    rng = random.Random(0)
    members = []
    for i in range(4):
        m = sample_members(f"s{i}", {"video_id": f"s{i}"}, tone_fbank(440.0, 1.3, rng),
                           color_frames((200, 0, 0), 64, 2, rng), label_indices=[0])
        members += [(n, b"garbage" if i == 2 and n.endswith(".npy") else d) for n, d in m]
    write_shard(tmp_path / "bad.tar", members)
    index = sample_index([str(tmp_path / "bad.tar")])
    plan = EpochPlan(size=4, samples=4, global_batch=4, accum_steps=1, world_size=1, rank=0, seed=0)
    tf = Transform(DATA, NO_AUG, frame="random", num_frames=2, num_classes=0, label_map=None, label_file=None, seed=0)
    (batch,) = list(train_loader(index, tf, plan, epoch=0, first=0, count=1, num_workers=0))
    assert sorted(batch["key"]) == ["s0", "s1", "s3"] and batch["skipped"] == 1


def test_class_balanced_draws_are_deterministic_and_elastic(uneven, capsys):
    bal = ("finetune.balanced=true", "finetune.batch_size=4", "finetune.num_classes=4")
    def draw(world, rank, epoch=3):
        capsys.readouterr()
        assert main(["order", "--shards", str(uneven), "--epoch", str(epoch), "--world-size", str(world), "--rank",
                     str(rank), "--stage", "finetune", *[a for s in bal for a in ("--set", s)]]) == 0
        return [line.split() for line in capsys.readouterr().out.splitlines()]

    single = draw(1, 0)
    keys = [k for b in single for k in b]
    assert len(keys) == 24 and len(set(keys)) < 24  # with replacement
    assert draw(1, 0) == single and draw(1, 0, epoch=4) != single
    halves = [draw(2, r) for r in range(2)]
    assert [sorted(halves[0][s] + halves[1][s]) for s in range(6)] == [sorted(b) for b in single]
    # the draws follow the official weights: rows of a rare class are drawn more often per sample
    rows = read_rows(uneven / "manifest.parquet")
    label = {r["key"]: r["labels"][0] for r in rows}
    per_class = Counter(label[r["key"]] for r in rows)
    many = Counter(label[k] for e in range(1, 21) for b in draw(1, 0, epoch=e) for k in b)
    rate = {c: many[c] / per_class[c] for c in per_class}
    rarest, commonest = min(per_class, key=per_class.get), max(per_class, key=per_class.get)
    assert per_class[rarest] == per_class[commonest] or rate[rarest] > rate[commonest]


# ---------------------------------------------------------------------------------------------- resume


RUN = TINY + ["pretrain.batch_size=4", "pretrain.epochs=2", "pretrain.lr=1.0e-3", "pretrain.mixup=0.5",
              "pretrain.freqm=8", "pretrain.timem=16"]


def pretrain(shards, out, *extra, sets=RUN):
    return main(["pretrain", "--shards", str(shards), "--out", str(out), *[a for s in sets for a in ("--set", s)],
                 *extra])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """9 samples in shards of 4, 4, 1: 2 steps of 4 per epoch (one sample left out of each)."""
    folder = tmp_path_factory.mktemp("small")
    write_synthetic_shards(folder, 9, 4)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert pretrain(small, out) == 0
    return torch.load(out / "model.pth", weights_only=True)


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_is_bit_identical(small, uninterrupted, tmp_path, monkeypatch):
    # the same CPU threads throughout: without OMP_NUM_THREADS a loader worker lowers them (`cpu_threads`), and a
    # float sum split differently differs in its last bits, whatever the data
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    out = tmp_path / "run"
    assert pretrain(small, out, "--stop-after-steps", "1") == 0  # mid-epoch 1
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_done"]) == (1, 0, 1) and not (out / "model.pth").exists()
    # resume with a loader worker this time: the data does not depend on them
    assert pretrain(small, out, "--resume", "--stop-after-steps", "2", sets=RUN + ["data.num_workers=1"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batches_done"]) == (3, 1, 1)  # across the epoch boundary
    assert pretrain(small, out, "--resume") == 0
    assert same_weights(torch.load(out / "model.pth", weights_only=True), uninterrupted)
    # a resume that would change the order is refused
    assert pretrain(small, out, "--resume", sets=RUN + ["pretrain.batch_size=2"]) == 2


def test_resume_after_kill_9_is_bit_identical(small, uninterrupted, tmp_path):
    sets = RUN + ["pretrain.save_every=1"]
    # the same CPU threads as this process: a float sum split differently would differ in its last bits
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(torch.get_num_threads()))
    for attempt in range(3):  # the tiny run can finish between two polls on a quiet machine: then start it again
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "train", "pretrain", "--shards", str(small), "--out", str(out),
               *[a for s in sets for a in ("--set", s)]]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and proc.poll() is None and not (out / "last.pt").exists():
                time.sleep(0.01)
            killed = proc.poll() is None
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        if killed and torch.load(out / "last.pt", weights_only=True)["step"] < 4:
            break
    else:
        pytest.fail("the run always ended before it could be killed")
    assert 1 <= torch.load(out / "last.pt", weights_only=True)["step"] < 4
    assert pretrain(small, out, "--resume") == 0
    assert same_weights(torch.load(out / "model.pth", weights_only=True), uninterrupted)
