"""A real 2-process DDP pretraining run on CPU (torchrun, gloo) over uneven shards.

Every step all-reduces gradients and (with contrast=global) all-gathers the contrastive vectors, so a rank with
fewer batches than the other would hang or fail the run; the timeout turns a hang into a failure. Both ranks must
end at the same step: rank 0's checkpoint holds the step count, and the run exits 0 only if rank 1 did too. A run
stopped mid-epoch (`--stop-after-steps`) and resumed ends with the same weights as the uninterrupted one, and
resumed by one process instead (an elastic restart) it carries on from the same global step.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def torchrun(train_shards, out, sets, *extra, nproc=2):
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "cavmae.train", "pretrain", "--shards", str(train_shards / "ddp"),
           "--out", str(out), *[a for s in sets for a in ("--set", s)], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_process_ddp_over_uneven_shards_and_exact_resume(train_shards, tmp_path):
    shards = sorted((train_shards / "ddp").glob("*.tar"))  # 20 + 20 + 5 samples
    assert len(shards) == 3
    out = tmp_path / "run"
    sets = TINY + ["pretrain.batch_size=8", "pretrain.epochs=2", "pretrain.contrast=global", "pretrain.lr=1.0e-3"]
    torchrun(train_shards, out, sets)
    steps_per_epoch = 45 // 8  # global batch 8 = 4 per rank
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 2 * steps_per_epoch and state["epoch"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 2 * steps_per_epoch + 1))
    # stopped mid-epoch 2 and resumed, both ranks: the same weights, bit for bit
    again = tmp_path / "again"
    torchrun(train_shards, again, sets, "--stop-after-steps", "7")
    assert torch.load(again / "last.pt", weights_only=True)["step"] == 7 and not (again / "model.pth").exists()
    elastic = tmp_path / "elastic"
    shutil.copytree(again, elastic)
    torchrun(train_shards, again, sets, "--resume")
    a, b = (torch.load(run / "model.pth", weights_only=True) for run in (out, again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same stop resumed by ONE process: it carries on at the global step (no sample replayed or skipped; the
    # loader-level test in test_epochs.py checks the samples) and ends where the two-process run ended
    torchrun(train_shards, elastic, sets, "--resume", nproc=1)
    state = torch.load(elastic / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"]) == (2 * steps_per_epoch, 2) and (elastic / "model.pth").exists()
    rows = [json.loads(line) for line in (elastic / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-3:] == [8, 9, 10]


def test_two_process_ddp_compiled_with_bf16_working_weights(train_shards, tmp_path):
    """torch.compile around DDP (its DDPOptimizer splits the graph at the gradient buckets) with bf16 working weights:
    both ranks compile, train in step and save the bare model's fp32 weights (`compile: aot_eager`: inductor builds
    here but takes minutes on a CPU)."""
    out = tmp_path / "run"
    sets = TINY + ["pretrain.batch_size=8", "pretrain.epochs=1", "pretrain.lr=1.0e-3", "pretrain.precision=bf16",
                   "pretrain.compile=aot_eager"]
    torchrun(train_shards, out, sets)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "compile"] == [0]  # rank 0 writes the log
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 45 // 8 + 1))
    sd = torch.load(out / "model.pth", weights_only=True)
    assert sd and all(k.startswith("module.") and "_orig_mod" not in k for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float32}


def test_torchrun_variables_that_cannot_form_a_group_are_one_line(tmp_path, monkeypatch, capsys):
    """A rank outside the world (a rendezvous that cannot complete), a non-number, or RANK/WORLD_SIZE without the
    rest: one line naming the variable, exit 2, before any connection is made."""
    import pytest

    from cavmae.train import cli
    from cavmae.train.distributed import LaunchError, launch

    master = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29518"}
    assert launch({}) is None and launch({"RANK": "1", "WORLD_SIZE": "2", **master}) == (1, 2, "127.0.0.1:29518")
    cases = [({"RANK": "5", "WORLD_SIZE": "2", **master}, "RANK=5 with WORLD_SIZE=2: ranks are 0..1"),
             ({"RANK": "x", "WORLD_SIZE": "2", **master}, "RANK='x': expected a non-negative integer"),
             ({"RANK": "0", "WORLD_SIZE": "-3", **master}, "WORLD_SIZE='-3': expected a non-negative integer"),
             ({"RANK": "0", "WORLD_SIZE": "0", **master}, "WORLD_SIZE=0: the number of processes is at least 1"),
             ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR is not"),
             ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT is not"),
             ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
             ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
             ({"LOCAL_RANK": "y"}, "LOCAL_RANK='y'")]
    for env, message in cases:
        with pytest.raises(LaunchError, match=re.escape(message)):
            launch(env)
    for name, value in cases[0][0].items():
        monkeypatch.setenv(name, value)
    code = cli.main(["pretrain", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "cavmae-train: error: RANK=5 with WORLD_SIZE=2: ranks are 0..1"
    assert not (tmp_path / "run").exists()


def test_a_rendezvous_nobody_answers_ends_at_its_limit(tmp_path, monkeypatch, capsys):
    """MASTER_ADDR:MASTER_PORT accepts connections and never answers (or rank 0 never comes): the rank stops at
    RENDEZVOUS_TIMEOUT_S (shortened here) with one line naming the address and the limit, exit 2."""
    import socket

    from cavmae.train import cli, distributed
    from tests.conftest import time_limit

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # (the kernel completes the connections; nobody ever reads or writes)
    port = silent.getsockname()[1]
    monkeypatch.setattr(distributed, "RENDEZVOUS_TIMEOUT_S", 2)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    try:
        with time_limit(60, "a silent rendezvous"):
            code = cli.main(["pretrain", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run")])
    finally:
        silent.close()
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"cavmae-train: error: rank 1 of 2: the processes did not all meet at 127.0.0.1:{port} "
                          f"(MASTER_ADDR:MASTER_PORT) within 2 s"), err
