"""The trainer's reduced precisions against fp32 for CAV-MAE pretraining: one step's loss terms and gradients, then
a loss curve.

    python bench/numerics.py grads --batch 8 --json results.jsonl     # base model, official geometry
    python bench/numerics.py curve --steps 300 --json results.jsonl    # tiny model, synthetic data

Precisions (`--precision`, the trainer's names, train/precision.py): `auto` is bf16 autocast (CUDA only: on a CPU
it is fp32 and is left out), `bf16` the bf16 working weights with fp32 masters (any device), `fp16` fp16 autocast.
`grads`: the same weights, batch and masks (the same seed before each forward) under fp32 and under each precision
as the trainer runs it: the relative difference of every loss term and, per parameter group (patch embeddings,
modality-specific blocks, joint blocks, decoder, ...), the cosine similarity and relative norm difference of the
gradients (bf16: the fp32 gradients the masters get). It also reports the dtype the contrastive loss is computed in
(fp32 by design). `curve`: the tiny model trained from the same initial weights on the same synthetic batches (a
fixed pool of random fbanks and frames, Adam as the trainer builds it) in fp32 and in each precision; the loss
curves side by side and their largest relative gap. One JSON record per compared precision.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.lr_schedule import make_optimizer  # noqa: E402
from cavmae.train.model import PATCH_SIZE, build_pretrain_model  # noqa: E402
from cavmae.train.precision import WorkingWeights, step_autocast  # noqa: E402
from cavmae.train.settings import register_sections  # noqa: E402
from cavmae.train.stage import model_settings  # noqa: E402

TERMS = ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc")
TINY = ["model.size=tiny", "model.target_length=128", "video.image_size=64"]


def group_of(name: str) -> str:
    """Parameter group for the report: the top-level module (blocks_a, blocks_u, decoder_blocks, norm_a ...)."""
    return name.split(".")[0]


def batch_for(model, batch: int, device: torch.device, seed: int) -> "tuple[torch.Tensor, torch.Tensor]":
    g = torch.Generator(device=device).manual_seed(seed)
    t_len, mel = model.audio_grid[1] * PATCH_SIZE, model.audio_grid[0] * PATCH_SIZE
    img = model.image_grid[0] * PATCH_SIZE
    return (torch.randn(batch, t_len, mel, device=device, generator=g),
            torch.randn(batch, 3, img, img, device=device, generator=g))


def trainer_model(model, precision: str) -> "tuple[torch.nn.Module, WorkingWeights | None, dict]":
    """A copy of `model` as the trainer runs it in `precision`, its working weights (bf16, else None) and its fp32
    parameters by name (the masters: what an optimizer updates)."""
    model = copy.deepcopy(model)
    masters = dict(model.named_parameters())
    return model, (WorkingWeights(model) if precision == "bf16" else None), masters


def forward_backward(model, audio, image, device, precision: str) -> "tuple[dict, dict]":
    model, working, masters = trainer_model(model, precision)
    torch.manual_seed(1)  # the same masks in every precision
    with step_autocast(device, precision):
        out = model(audio, image)
    out["loss"].backward()
    if working is not None:
        working.grads_to_masters()
    terms = {k: float(torch.as_tensor(out[k]).detach()) for k in TERMS if k in out}
    terms["loss_c_dtype"] = str(out["loss_c"].dtype).replace("torch.", "")
    grads = {n: p.grad.detach().float() for n, p in masters.items() if p.grad is not None}
    return terms, grads


def compared(precisions: "list[str]", device: torch.device) -> "list[str]":
    """The precisions that differ from fp32 on `device` (autocast is CUDA only)."""
    keep = [p for p in precisions if device.type == "cuda" or p == "bf16"]
    if keep != precisions:
        print(f"on a CPU autocast is off: {', '.join(p for p in precisions if p not in keep)} left out")
    return keep


def grads(args, device: torch.device) -> "list[dict]":
    cfg = load_config(None, args.sets, [])
    torch.manual_seed(0)
    model = build_pretrain_model(model_settings(cfg)).to(device).train()
    audio, image = batch_for(model, args.batch, device, 0)
    t32, g32 = forward_backward(model, audio, image, device, "fp32")
    return [grads_against(t32, g32, *forward_backward(model, audio, image, device, precision), precision, args.batch)
            for precision in compared(args.precision, device)]


def grads_against(t32: dict, g32: dict, t16: dict, g16: dict, precision: str, batch: int) -> dict:
    print(f"loss terms, batch {batch}, fp32 against {precision} (same weights, batch and masks):")
    print(f"| {'term':<10} | {'fp32':>10} | {precision:>10} | {'rel diff':>9} |")
    print("|------------|------------|------------|-----------|")
    rel = {}
    for k in TERMS:
        if k in t32:
            rel[k] = abs(t16[k] - t32[k]) / max(abs(t32[k]), 1e-12)
            print(f"| {k:<10} | {t32[k]:>10.5f} | {t16[k]:>10.5f} | {rel[k]:>9.2e} |")
    print(f"contrastive loss dtype under {precision}: {t16['loss_c_dtype']}")
    groups: dict[str, list[str]] = {}
    for n in g32:
        groups.setdefault(group_of(n), []).append(n)
    print(f"| {'parameter group':<22} | {'params':>10} | {'grad cos':>9} | {'rel norm diff':>13} |")
    print("|------------------------|------------|-----------|---------------|")
    per_group = {}
    for gname, names in groups.items():
        a = torch.cat([g32[n].flatten() for n in names]).double()  # fp32 sums of 78M squares drift
        b = torch.cat([g16[n].flatten() for n in names]).double()
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        norm = float((b.norm() - a.norm()).abs() / a.norm().clamp_min(1e-30))
        per_group[gname] = {"params": a.numel(), "cos": cos, "rel_norm_diff": norm}
        print(f"| {gname:<22} | {a.numel():>10} | {cos:>9.5f} | {norm:>13.2e} |", flush=True)
    return {"batch": batch, "precision": precision, "fp32": t32, "other": t16, "rel_diff": rel, "groups": per_group}


def curve(args, device: torch.device) -> "list[dict]":
    cfg = load_config(None, TINY + args.sets + [f"pretrain.lr={args.lr}"], [])
    stage = cfg.pretrain
    torch.manual_seed(0)
    initial = build_pretrain_model(model_settings(cfg)).to(device).train()
    pool = [batch_for(initial, args.curve_batch, device, seed) for seed in range(args.pool)]
    precisions = compared(args.precision, device)
    losses = {}
    for precision in ["fp32"] + precisions:
        model, working, masters = trainer_model(initial, precision)
        opt = make_optimizer([{"params": [p for p in masters.values() if p.requires_grad]}], stage)
        torch.manual_seed(1)
        out = []
        start = time.perf_counter()
        for step in range(args.steps):
            audio, image = pool[step % len(pool)]
            with step_autocast(device, precision):
                loss = model(audio, image)["loss"]
            loss.backward()
            if working is not None:
                working.grads_to_masters()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if working is not None:
                working.refresh()
            out.append(loss.detach())
        losses[precision] = [float(x) for x in torch.stack(out).cpu()]
        print(f"{precision}: {args.steps} steps in {time.perf_counter() - start:.1f} s", flush=True)
    return [curve_against(losses["fp32"], losses[precision], precision, args) for precision in precisions]


def curve_against(a: "list[float]", b: "list[float]", precision: str, args) -> dict:
    gaps = [abs(y - x) / max(abs(x), 1e-12) for x, y in zip(a, b)]
    window = max(1, args.every)
    smooth = [sum(v[i:i + window]) / len(v[i:i + window]) for v in (a, b) for i in range(0, len(v), window)]
    half = len(smooth) // 2
    smooth_gaps = [abs(y - x) / abs(x) for x, y in zip(smooth[:half], smooth[half:])]
    other = f"{precision} loss"
    print(f"| {'steps':<11} | {'fp32 loss':>9} | {other:>9} | {'rel gap':>8} |   (means over {window} steps)")
    print("|-------------|-----------|-----------|----------|")
    for i, (x, y) in enumerate(zip(smooth[:half], smooth[half:])):
        print(f"| {i * window + 1:>4}-{min((i + 1) * window, len(a)):<6} | {x:>9.4f} | {y:>9.4f} | "
              f"{abs(y - x) / abs(x):>8.2e} |")
    print(f"largest per-step relative gap {max(gaps):.2e}; largest gap of the {window}-step means "
          f"{max(smooth_gaps):.2e}; first -> last loss fp32 {a[0]:.4f} -> {a[-1]:.4f}, {precision} {b[0]:.4f} -> "
          f"{b[-1]:.4f}")
    return {"steps": args.steps, "batch": args.curve_batch, "every": window, "precision": precision,
            "max_step_gap": max(gaps), "max_mean_gap": max(smooth_gaps), "fp32": a, "other": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("grads", "curve"))
    ap.add_argument("--batch", type=int, default=8, help="grads: batch size")
    ap.add_argument("--steps", type=int, default=300, help="curve: optimizer steps per precision")
    ap.add_argument("--curve-batch", type=int, default=16, help="curve: batch size")
    ap.add_argument("--pool", type=int, default=8, help="curve: distinct synthetic batches, cycled")
    ap.add_argument("--lr", type=float, default=1e-3, help="curve: learning rate")
    ap.add_argument("--every", type=int, default=25, help="curve: print means over this many steps")
    ap.add_argument("--precision", nargs="+", default=["auto", "bf16"], choices=("auto", "bf16", "fp16"),
                    help="compared against fp32 (default: auto and bf16; auto and fp16 on CUDA only)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (grads: e.g. the tiny model on a CPU)")
    ap.add_argument("--json", metavar="FILE", help="append the result as one JSON record")
    args = ap.parse_args()
    register_sections()  # this script's entry: it reads train's sections, as cavmae-train does
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"numerics {args.what} on {name}, torch {torch.__version__}", flush=True)
    results = grads(args, device) if args.what == "grads" else curve(args, device)
    if args.json:
        with open(args.json, "a") as f:
            for result in results:
                f.write(json.dumps({"section": f"numerics_{args.what}", "device": name, **result}) + "\n")


if __name__ == "__main__":
    main()
