"""Throughput of one CAV-MAE training step (forward + backward + optimizer) and the FLOP rate it achieves.

    python bench/model.py                                   # CPU: batch 8 fp32; CUDA: batches 48, 256, bf16 autocast
    python bench/model.py --batch 48 256 --precision fp32 auto bf16 --finetune 48 --json results.jsonl
    python bench/model.py --batch 256 --precision bf16 --compile default   # torch.compile'd (compile time shown)
    python bench/model.py --max-batch pretrain --precision bf16   # largest batch that fits, and the fastest
    python bench/model.py --batch 256 --precision auto --profile profile.txt   # top ops by device time

The step is the trainer's: the model from the default config (official geometry: 1024x128 fbank, 224² frames),
the optimizer `train.lr_schedule.make_optimizer` builds (Adam, fused on CUDA), and the trainer's precision and compile
(`train.loop.training_model`, `train.precision`): `--precision` takes the trainer's names, `auto` (bf16 autocast on
CUDA; the contrastive loss stays fp32 inside the model; fp32 on a CPU), `bf16` (bf16 working weights, fp32 masters
updated by the optimizer) and `fp32`; `--compile` the trainer's modes. `--finetune B` also times the finetuning
step (`CAVMAEFT`, multimodal, 527 classes, BCE) at batch B.

Model FLOPs are counted analytically (matmuls only: patch embeddings, attention projections, attention scores and
weighted sums, MLPs, decoder embedding and prediction heads; a multiply-add is 2 FLOPs) and the backward pass is
taken as twice the forward, so a step is 3x the forward. LayerNorms, softmax, GELU and the optimiser are not counted,
which makes the reported TFLOP/s a model-FLOPs utilisation figure comparable across implementations. MFU divides
it by the card's dense bf16 peak (`PEAK_BF16_TFLOPS`, chosen by the device name; `--peak` overrides it).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from cavmae.shards.config import load_config  # noqa: E402
from cavmae.train.loop import training_model  # noqa: E402
from cavmae.train.lr_schedule import make_optimizer  # noqa: E402
from cavmae.train.model import CAVMAE, PATCH_SIZE, build_finetune_model, build_pretrain_model  # noqa: E402
from cavmae.train.precision import step_autocast  # noqa: E402
from cavmae.train.settings import register_sections  # noqa: E402
from cavmae.train.stage import model_settings  # noqa: E402

# Dense bf16 tensor-core peaks (vendor datasheets, without sparsity), matched in order against the device name.
PEAK_BF16_TFLOPS = (("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))
FT_CLASSES = 527


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One transformer block on `tokens` tokens: qkv + proj (8 N D^2), QK^T and AV (4 N^2 D), MLP (4 r N D^2)."""
    return 8 * tokens * dim * dim + 4 * tokens * tokens * dim + int(4 * mlp_ratio) * tokens * dim * dim


def embed_flops(model) -> int:
    pixels = PATCH_SIZE * PATCH_SIZE
    n_a = model.audio_grid[0] * model.audio_grid[1]
    n_v = model.image_grid[0] * model.image_grid[1]
    return 2 * n_a * pixels * 1 * model.size.embed_dim + 2 * n_v * pixels * 3 * model.size.embed_dim


def pretrain_forward_flops(model: CAVMAE) -> int:
    """Matmul FLOPs of one CAVMAE.forward for one sample, following the branches the loss weights enable (a
    CAVMAESync's cls and register tokens count in the modality-specific and contrastive passes, its contrastive
    heads as two more blocks per modality; kept registers in the joint pass are left out)."""
    s = model.size
    D, Dd = s.embed_dim, s.decoder_embed_dim
    n_a = model.audio_grid[0] * model.audio_grid[1]
    n_v = model.image_grid[0] * model.image_grid[1]
    extra = int(getattr(model, "cls_token", False)) + getattr(model, "num_register_tokens", 0)
    vis_a = int(n_a * (1 - model.mask_ratio_a))
    vis_v = int(n_v * (1 - model.mask_ratio_v))
    pixels = PATCH_SIZE * PATCH_SIZE
    n_joint = s.depth - s.modality_specific_depth

    flops = embed_flops(model)  # patch embeddings run on every token
    flops += s.modality_specific_depth * (block_flops(vis_a + extra, D, s.mlp_ratio)
                                          + block_flops(vis_v + extra, D, s.mlp_ratio))
    if model.mae_loss_weight != 0:
        flops += n_joint * block_flops(vis_a + vis_v, D, s.mlp_ratio)
        flops += 2 * (vis_a + vis_v) * D * Dd
        flops += s.decoder_depth * block_flops(n_a + n_v, Dd, s.mlp_ratio)
        flops += 2 * n_a * Dd * pixels * 1 + 2 * n_v * Dd * pixels * 3
    if model.contrast_loss_weight != 0:
        heads = 2 if getattr(model, "contrastive_heads", False) else 0
        flops += (n_joint + heads) * (block_flops(vis_a + extra, D, s.mlp_ratio)
                                      + block_flops(vis_v + extra, D, s.mlp_ratio))
    return flops


def finetune_forward_flops(model) -> int:
    """Matmul FLOPs of one multimodal CAVMAEFT.forward for one sample: every token, no masking, one joint pass."""
    s = model.size
    n_a = model.audio_grid[0] * model.audio_grid[1]
    n_v = model.image_grid[0] * model.image_grid[1]
    flops = embed_flops(model)
    flops += s.modality_specific_depth * (block_flops(n_a, s.embed_dim, s.mlp_ratio)
                                          + block_flops(n_v, s.embed_dim, s.mlp_ratio))
    flops += (s.depth - s.modality_specific_depth) * block_flops(n_a + n_v, s.embed_dim, s.mlp_ratio)
    return flops + 2 * s.embed_dim * FT_CLASSES


def step_name(kind: str, cfg) -> str:
    """The table's step: `pretrain`, or `pretrain (sync)` for another model variant."""
    return kind if cfg.model.variant == "cavmae" else f"{kind} ({cfg.model.variant})"


def peak_tflops(device: torch.device, override: "float | None") -> "tuple[float | None, str]":
    if override:
        return override, f"{override:g} TFLOP/s (--peak)"
    if device.type != "cuda":
        return None, "n/a (CPU)"
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return peak, f"{peak:g} TFLOP/s dense bf16 ({key}, from the device name {name!r})"
    return None, f"unknown for {name!r} (pass --peak)"


class Bench:
    """One model + optimizer on one device, in one precision and compile mode, as the trainer sets them up; `run`
    times its step at a batch size."""

    def __init__(self, device: torch.device, cfg, kind: str, precision: str, compile_mode: str):
        self.device, self.kind, self.precision, self.compile = device, kind, precision, compile_mode
        torch.manual_seed(0)
        model_cfg = model_settings(cfg)
        if kind == "pretrain":
            core = build_pretrain_model(model_cfg)
            self.flops = pretrain_forward_flops(core)
            stage = cfg.pretrain
        else:
            core = build_finetune_model(model_cfg, FT_CLASSES)
            self.flops = finetune_forward_flops(core)
            stage = cfg.finetune
        for name, p in core.named_parameters():  # as the trainer: parameters that get no gradient are frozen
            if name in core.unused_parameter_names():
                p.requires_grad_(False)
        self.core = core.to(device).train()
        self.opt = make_optimizer([{"params": [p for p in self.core.parameters() if p.requires_grad]}], stage)
        self.fused = bool(self.opt.defaults.get("fused"))
        self.model, self.working = training_model(self.core, precision, compile_mode)

    def inputs(self, batch: int) -> "tuple[torch.Tensor, ...]":
        g = torch.Generator(device=self.device).manual_seed(0)
        t_len, mel = self.core.audio_grid[1] * PATCH_SIZE, self.core.audio_grid[0] * PATCH_SIZE
        img = self.core.image_grid[0] * PATCH_SIZE
        audio = torch.randn(batch, t_len, mel, device=self.device, generator=g)
        image = torch.randn(batch, 3, img, img, device=self.device, generator=g)
        target = (torch.rand(batch, FT_CLASSES, device=self.device, generator=g) < 0.01).float()
        return audio, image, target

    def step_fn(self, batch: int):
        audio, image, target = self.inputs(batch)

        def step() -> None:
            with step_autocast(self.device, self.precision):
                if self.kind == "pretrain":
                    loss = self.model(audio, image)["loss"]
                else:
                    logits = self.model(audio, image)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target)
            loss.backward()
            if self.working is not None:
                self.working.grads_to_masters()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.working is not None:
                self.working.refresh()
        return step

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, batch: int, steps: int, warmup: int) -> dict:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        step = self.step_fn(batch)
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        self.sync()
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            step()
        self.sync()
        step_s = (time.perf_counter() - start) / steps
        mem = torch.cuda.max_memory_allocated(self.device) / 2 ** 30 if self.device.type == "cuda" else None
        return {"step_s": step_s, "samples_s": batch / step_s, "tflops": 3 * self.flops * batch / step_s / 1e12,
                "peak_mem_gib": mem, "warmup_s": warm_s}

    def release(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def emit(row: dict, path: "str | None") -> None:
    """Print a table row and append the record to the JSON-lines file at once (a later hang loses nothing)."""
    mfu = f"{row['mfu'] * 100:.1f}" if row.get("mfu") is not None else "-"
    mem = f"{row['peak_mem_gib']:.1f}" if row.get("peak_mem_gib") is not None else "-"
    if row.get("status", "ok") == "ok":
        print(f"| {row['step']:<8} | {row['batch']:>5} | {row['precision']:<9} | {row['compile']:<9} | "
              f"{row['samples_s']:>9.1f} | {row['tflops']:>7.1f} | {mfu:>5} | {mem:>8} | {row['step_s']:>7.4f} |",
              flush=True)
    else:
        print(f"| {row['step']:<8} | {row['batch']:>5} | {row['precision']:<9} | {row['compile']:<9} | "
              f"{row['status']} |", flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"section": "model", **row}) + "\n")


def max_batch(bench: Bench, start: int, limit: int, json_path: "str | None", base: dict) -> "tuple[int, int]":
    """Largest batch (multiple of 32) whose step runs, doubling from `start` then bisecting, and the best batch: the
    fastest (samples/s over 2 steps after 1 warm-up) of the batches that fit."""
    rates: dict[int, float] = {}
    fits, fails = 0, None
    b = start
    while b <= limit and fails is None:
        if try_batch(bench, b, rates):
            fits, b = b, b * 2
        else:
            fails = b
    while fails is not None and fails - fits > 32:
        mid = (fits + fails) // 64 * 32
        if mid <= fits:
            break
        if try_batch(bench, mid, rates):
            fits = mid
        else:
            fails = mid
    best = max(rates, key=rates.get) if rates else 0
    print(f"largest {bench.precision} {bench.kind} batch that fits: {fits} "
          f"({f'first out of memory: {fails}' if fails else f'the search stops at {limit}'}); fastest: {best}",
          flush=True)
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps({"section": "max_batch", **base, "step": bench.kind, "precision": bench.precision,
                                "max_batch": fits,
                                "first_oom": fails, "best_batch": best, "rates": rates}) + "\n")
    return fits, best


def try_batch(bench: Bench, batch: int, rates: "dict[int, float]") -> bool:
    try:
        r = bench.run(batch, steps=2, warmup=1)
        rates[batch] = r["samples_s"]
        mem = f", peak {r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else ""
        print(f"  batch {batch}: fits, {r['samples_s']:.1f} samples/s{mem}", flush=True)
        return True
    except torch.cuda.OutOfMemoryError:
        print(f"  batch {batch}: out of memory", flush=True)
        return False
    finally:
        bench.release()


def profile(bench: Bench, batch: int, path: str) -> None:
    """torch.profiler over 3 steps (after 2 warm-up ones): the top ops by self device time, and the device time
    grouped into matmul / attention / normalisation / gather-scatter / optimizer / elementwise, against the wall
    time (a device busy for much less than the wall time is held up by the host)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = bench.step_fn(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == "cuda" else [])
    active = 3
    for _ in range(2):
        step()
    bench.sync()
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(active):
            step()
        bench.sync()
        wall = (time.perf_counter() - start) / active
    events = prof.key_averages()
    dev = "device" if bench.device.type == "cuda" else "cpu"
    try:
        table = events.table(sort_by=f"self_{dev}_time_total", row_limit=40, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):  # older torch names it self_cuda_time_total
        table = events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60)
    groups = {"attention": ("attention", "flash", "sdpa", "fmha", "efficient"),  # (kernel or aten op names)
              "matmul": ("aten::mm", "addmm", "bmm", "linear", "gemm", "matmul", "conv", "nvjet", "xmma", "cutlass"),
              "norm": ("layer_norm", "norm"), "gather/scatter/index/sort": ("gather", "scatter", "index", "sort"),
              "optimizer": ("adam", "foreach", "fused"), "softmax": ("softmax",)}
    totals: dict[str, float] = {}
    for e in events:
        # on CUDA the kernels' own rows (an op's row repeats its kernels' time); on a CPU the aten ops
        if dev == "device" and e.device_type == torch.autograd.DeviceType.CPU:
            continue
        t = next((getattr(e, n) for n in (f"self_{dev}_time_total", "self_cuda_time_total") if getattr(e, n, 0)), 0)
        if not t:
            continue
        name = e.key.lower()
        group = next((g for g, keys in groups.items() if any(k in name for k in keys)), "other (elementwise, copies)")
        totals[group] = totals.get(group, 0.0) + t
    busy = sum(totals.values()) / 1e6 / active
    lines = [f"profile: {bench.kind} step, batch {batch}, precision {bench.precision}, compile {bench.compile}, "
             f"{torch.cuda.get_device_name(bench.device) if dev == 'device' else 'cpu'}, torch {torch.__version__}",
             f"wall per step {wall * 1000:.1f} ms; self {dev} time per step {busy * 1000:.1f} ms "
             f"({100 * busy / wall:.0f}% of the wall time; grouped by kernel name on CUDA, by aten op on a CPU)",
             "", f"self {dev} time by op group (per step):"]
    for group, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<30} {t / 1e3 / active:9.2f} ms  {100 * t / max(sum(totals.values()), 1):5.1f}%")
    text = "\n".join(lines) + "\n\n" + table + "\n"
    Path(path).write_text(text)
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 8 on CPU, 48 and 256 on CUDA)")
    ap.add_argument("--precision", nargs="+", choices=("fp32", "auto", "bf16"),
                    help="the trainer's precisions (default: auto, which is fp32 on a CPU)")
    ap.add_argument("--compile", default="eager", choices=("eager", "default", "max-autotune", "aot_eager"),
                    help="the trainer's compile setting (the optimizer stays fused)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (with --compile: the compilation)")
    ap.add_argument("--finetune", type=int, nargs="*", default=[], metavar="B",
                    help="also time the finetuning step (multimodal, 527 classes) at these batch sizes")
    ap.add_argument("--no-pretrain", action="store_true", help="time the finetuning step only")
    ap.add_argument("--max-batch", choices=("pretrain", "finetune"),
                    help="search the largest batch of this step in the first --precision instead, and the fastest")
    ap.add_argument("--profile", metavar="FILE", help="profile the first --batch/--precision pretraining step")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set model.size=tiny (default: the official base geometry)")
    ap.add_argument("--peak", type=float, help="dense bf16 peak in TFLOP/s for MFU (default: by device name)")
    ap.add_argument("--json", metavar="FILE", help="append one JSON record per result to FILE")
    args = ap.parse_args()
    register_sections()  # this script's entry: it reads train's sections, as cavmae-train does

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = args.batch or ([48, 256] if cuda else [8])
    precisions = args.precision or ["auto"]
    if not cuda and "auto" in precisions:  # autocast applies on CUDA only: on a CPU `auto` is fp32
        print("auto is fp32 on a CPU: timing fp32 for it")
        precisions = list(dict.fromkeys("fp32" if p == "auto" else p for p in precisions))
    cfg = load_config(None, args.sets, [])
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak, peak_text = peak_tflops(device, args.peak)
    base = {"device": name, "torch": torch.__version__, "size": cfg.model.size}
    rows = cfg.model.audio_length if cfg.model.variant == "sync" else cfg.model.target_length
    print(f"device {name}, torch {torch.__version__}, model size {cfg.model.size} ({cfg.model.variant}), "
          f"fbank {rows}x{cfg.audio.num_mel_bins}, frames {cfg.video.image_size}²")
    print(f"MFU peak: {peak_text}", flush=True)

    if args.max_batch:
        start = (256 if args.max_batch == "pretrain" else 64) if cuda else 8
        max_batch(Bench(device, cfg, args.max_batch, precisions[0], "eager"), start, 4096 if cuda else 32, args.json,
                  base)
        return
    if args.profile:
        profile(Bench(device, cfg, "pretrain", precisions[0], args.compile), batches[0], args.profile)
        return
    print(f"| {'step':<8} | {'batch':>5} | {'precision':<9} | {'compile':<9} | {'samples/s':>9} | TFLOP/s | "
          f"{'MFU %':>5} | {'peak GiB':>8} | {'step s':>7} |")
    print("|----------|-------|-----------|-----------|-----------|---------|-------|----------|---------|", flush=True)
    jobs = [("pretrain", p, batches) for p in precisions if not args.no_pretrain]
    jobs += [("finetune", p, args.finetune) for p in precisions if args.finetune]
    for kind, precision, sizes in jobs:  # one model per (step, precision): bf16 working weights change the model
        bench = Bench(device, cfg, kind, precision, args.compile)
        print(f"{kind}: optimizer {type(bench.opt).__name__} fused={bench.fused}; model forward "
              f"{bench.flops / 1e9:.1f} GFLOP/sample (matmuls), step = 3x forward", flush=True)
        for b in sizes:
            row = {**base, "step": step_name(kind, cfg), "batch": b, "precision": precision, "compile": args.compile,
                   "peak_tflops": peak, "fused_optimizer": bench.fused}
            try:
                r = bench.run(b, args.steps, args.warmup)
                row.update(r, mfu=r["tflops"] / peak if peak else None)
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            bench.release()
            emit(row, args.json)
        del bench


if __name__ == "__main__":
    main()
