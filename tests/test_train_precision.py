"""The trainer's precision and compile settings on CPU: bf16 working weights against fp32 (loss terms and gradients
as `bench/numerics.py` measures them), fp32 masters and checkpoints, and a torch.compile'd run that checkpoints,
resumes and lands where the eager run does.

The compiled runs use `compile: aot_eager` (dynamo and AOTAutograd trace the model, forward and backward, without
inductor's code generation): inductor does build on this CPU but takes about two minutes for the tiny model.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import TINY  # noqa: E402

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.cli import main  # noqa: E402
from cavmae.train.lr_schedule import make_optimizer  # noqa: E402
from cavmae.train.model import build_pretrain_model  # noqa: E402
from cavmae.train.precision import WorkingWeights  # noqa: E402
from cavmae.train.stage import model_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GEOMETRY = ["model.size=tiny", "model.target_length=128", "video.image_size=64"]


def test_bf16_working_weights_match_fp32_within_bounds(tmp_path):
    """One step of the tiny model, same weights, batch and masks: the loss terms within 1e-2 (the contrastive term,
    a difference of nearly equal logits, moves most) and the gradients the fp32 masters get pointing the same way as
    the fp32 ones in every parameter group."""
    out = tmp_path / "numerics.jsonl"
    cmd = [sys.executable, "bench/numerics.py", "grads", "--batch", "4", "--precision", "bf16", "--json", str(out),
           *[a for s in GEOMETRY for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["precision"] == "bf16" and record["other"]["loss_c_dtype"] == "float32"
    assert record["rel_diff"]["loss"] < 1e-3
    assert all(v < 1e-2 for v in record["rel_diff"].values()), record["rel_diff"]
    assert record["other"]["loss"] != record["fp32"]["loss"]  # it did run in bf16
    assert len(record["groups"]) > 10 and all(g["cos"] > 0.998 for g in record["groups"].values()), record["groups"]


def test_working_weights_are_bf16_and_masters_fp32_through_steps_and_state_dicts():
    cfg = load_config(None, GEOMETRY, [])
    torch.manual_seed(0)
    model = build_pretrain_model(model_settings(cfg))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in model.unused_parameter_names())
    optimizer = make_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], cfg.pretrain)
    working = WorkingWeights(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # the state dict is the fp32 masters, same keys and order: equal to the model's before the change
    sd = model.state_dict()
    assert list(sd) == list(initial) and all(torch.equal(sd[k], initial[k]) for k in sd)
    for _ in range(2):
        out = model(torch.randn(4, 128, 128), torch.randn(4, 3, 64, 64))  # fp32 inputs, cast by the model
        out["loss"].backward()
        working.grads_to_masters()
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        working.refresh()
    masters = [p for g in optimizer.param_groups for p in g["params"]]
    assert {p.dtype for p in masters} == {torch.float32}
    assert {v.dtype for s in optimizer.state.values() for v in s.values() if v.is_floating_point()} == {torch.float32}
    sd = model.state_dict()
    assert {v.dtype for v in sd.values()} == {torch.float32}
    moved = [k for k in sd if not torch.equal(sd[k], initial[k])]
    assert moved and all(model.get_parameter(k).requires_grad for k in moved)  # frozen ones stay exact
    for key in moved:  # the working copy is the master rounded to bf16
        assert torch.equal(model.get_parameter(key), sd[key].to(torch.bfloat16))
    # loading writes the masters (exactly) and the working copies (rounded)
    model.load_state_dict(initial)
    assert all(torch.equal(model.state_dict()[k], initial[k]) for k in initial)
    assert torch.equal(model.get_parameter(moved[0]), initial[moved[0]].to(torch.bfloat16))


def run_pretrain(shards, out, *extra, args=()):
    sets = TINY + ["pretrain.batch_size=8", "pretrain.epoch_samples=32", "pretrain.epochs=2", "pretrain.lr=1.0e-3",
                   *extra]
    return main(["pretrain", "--shards", str(shards), "--out", str(out), *[a for s in sets for a in ("--set", s)],
                 *args])


def test_compiled_bf16_run_checkpoints_plain_fp32_resumes_and_matches_eager(train_shards, tmp_path):
    """compile + bf16 working weights, stopped after 3 of 8 steps and resumed: the compile time is logged once per
    process start and kept out of samples/s; checkpoints hold the bare model's fp32 weights (no `_orig_mod.`); the
    end agrees with the uncompiled run within bf16 rounding."""
    shards = train_shards / "train"
    compiled, eager = tmp_path / "compiled", tmp_path / "eager"
    on = ("pretrain.precision=bf16", "pretrain.compile=aot_eager")
    assert run_pretrain(shards, compiled, *on, args=["--stop-after-steps", "3"]) == 0
    state = torch.load(compiled / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert all("_orig_mod" not in k and not k.startswith("module.") for k in state["model"])
    assert {v.dtype for v in state["model"].values()} == {torch.float32}
    assert run_pretrain(shards, compiled, *on, args=["--resume"]) == 0
    assert run_pretrain(shards, eager, "pretrain.precision=bf16") == 0

    rows = [json.loads(line) for line in (compiled / "metrics.jsonl").read_text().splitlines()]
    compiles = [r for r in rows if r["kind"] == "compile"]
    assert [(r["step"], r["mode"]) for r in compiles] == [(0, "aot_eager"), (3, "aot_eager")]
    assert all(r["seconds"] > 0 for r in compiles)
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 9)) and all(r["samples_per_s"] > 0 for r in train_rows)
    assert not any(r["kind"] == "compile" for r in map(json.loads, (eager / "metrics.jsonl").read_text().splitlines()))

    a, b = (torch.load(run / "model.pth", weights_only=True) for run in (compiled, eager))
    assert list(a) == list(b) and all(k.startswith("module.") and "_orig_mod" not in k for k in a)
    assert {v.dtype for v in a.values()} == {torch.float32}
    torch.manual_seed(0)  # data.seed: the initial weights of both runs
    start = build_pretrain_model(model_settings(load_config(None, GEOMETRY, []))).state_dict()
    moved_a, moved_b = (torch.cat([(sd[k] - start[k[len("module."):]]).flatten() for k in sd]) for sd in (a, b))
    assert float(torch.nn.functional.cosine_similarity(moved_a, moved_b, dim=0)) > 0.99


def test_decoder_input_built_by_one_gather_equals_the_per_modality_form():
    """The decoder input from one gather (train/model/pretraining.py) is the official per-modality unshuffle, cat and
    embedding adds, bit for bit in fp32, and so are its outputs."""
    torch.manual_seed(0)
    model = build_pretrain_model(model_settings(load_config(None, GEOMETRY, [])))
    a, v = torch.randn(3, 16, 64), torch.randn(3, 4, 64)  # kept tokens: 25% of 64 audio and of 16 visual patches
    ids_a = torch.stack([torch.randperm(64) for _ in range(3)])
    ids_v = torch.stack([torch.randperm(16) for _ in range(3)])

    def unshuffle(x, ids):  # the official code
        x = torch.cat([x, model.mask_token.expand(3, ids.shape[1] - x.shape[1], -1)], dim=1)
        return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[2]))

    xa = unshuffle(model.decoder_embed(a), ids_a) + model.decoder_pos_embed_a + model.decoder_modality_a
    xv = unshuffle(model.decoder_embed(v), ids_v) + model.decoder_pos_embed_v + model.decoder_modality_v
    x = torch.cat([xa, xv], dim=1)
    for blk in model.decoder_blocks:
        x = blk(x)
    x = model.decoder_norm(x)
    pred_a, pred_v = model.forward_decoder(a, v, ids_a, ids_v)
    assert torch.equal(pred_a, model.decoder_pred_a(x[:, :64])) and torch.equal(pred_v, model.decoder_pred_v(x[:, 64:]))


def test_finetune_with_bf16_weights_keeps_fp32_weights_exact(train_shards, tmp_path):
    """lr 0: with bf16 working weights the saved weights (per-epoch file, weight average, model.pth) are the fp32
    initial ones bit for bit, not their bf16 rounding; validation runs on the bf16 model."""
    cfg = load_config(None, TINY)
    torch.manual_seed(3)
    official = {f"module.{k}": v for k, v in build_pretrain_model(model_settings(cfg)).state_dict().items()}
    torch.save(official, tmp_path / "official.pth")
    sets = TINY + ["finetune.batch_size=8", "finetune.epoch_samples=16", "finetune.epochs=1", "finetune.lr=0.0",
                   "finetune.wa_start=1", "finetune.wa_end=1", "finetune.precision=bf16"]
    rc = main(["finetune", "--shards", str(train_shards / "train"), "--val-shards", str(train_shards / "val"),
               "--labels", str(train_shards / "labels.csv"), "--init", str(tmp_path / "official.pth"), "--out",
               str(tmp_path / "ft"), *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    out = torch.load(tmp_path / "ft" / "model.pth", weights_only=True)
    shared = [k for k in out if k in official]
    assert len(shared) > 50 and all(torch.equal(out[k], official[k]) for k in shared)
    assert any(not torch.equal(official[k], official[k].to(torch.bfloat16).float()) for k in shared)  # could fail
    epoch = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()][-1]
    assert epoch["kind"] == "epoch" and 0.0 <= epoch["val_mAP"] <= 1.0
