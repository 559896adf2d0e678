"""Throughput of one CAV-MAE pretraining step (forward + backward + Adam step) and the FLOP rate it achieves.

    python bench/model.py                      # CPU: batch 8; CUDA: batches 48 and 256 under bf16 autocast
    python bench/model.py --batch 8 --steps 3 --size base

Model FLOPs are counted analytically (matmuls only: patch embeddings, attention projections, attention scores and
weighted sums, MLPs, decoder embedding and prediction heads; a multiply-add is 2 FLOPs) and the backward pass is
taken as twice the forward, so a step is 3x the forward. LayerNorms, softmax, GELU and the optimiser are not counted,
which makes the reported TFLOP/s a model-FLOPs utilisation figure comparable across implementations.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from train.model import CAVMAE, PATCH_SIZE  # noqa: E402


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """One transformer block on `tokens` tokens: qkv + proj (8 N D^2), QK^T and AV (4 N^2 D), MLP (4 r N D^2)."""
    return 8 * tokens * dim * dim + 4 * tokens * tokens * dim + int(4 * mlp_ratio) * tokens * dim * dim


def pretrain_forward_flops(model: CAVMAE) -> int:
    """Matmul FLOPs of one CAVMAE.forward for one sample, following the branches the loss weights enable."""
    s = model.size
    D, Dd = s.embed_dim, s.decoder_embed_dim
    n_a = model.audio_grid[0] * model.audio_grid[1]
    n_v = model.image_grid[0] * model.image_grid[1]
    vis_a = int(n_a * (1 - model.mask_ratio_a))
    vis_v = int(n_v * (1 - model.mask_ratio_v))
    pixels = PATCH_SIZE * PATCH_SIZE
    n_joint = s.depth - s.modality_specific_depth

    flops = 2 * n_a * pixels * 1 * D + 2 * n_v * pixels * 3 * D  # patch embeddings run on every token
    flops += s.modality_specific_depth * (block_flops(vis_a, D, s.mlp_ratio) + block_flops(vis_v, D, s.mlp_ratio))
    if model.mae_loss_weight != 0:
        flops += n_joint * block_flops(vis_a + vis_v, D, s.mlp_ratio)
        flops += 2 * (vis_a + vis_v) * D * Dd
        flops += s.decoder_depth * block_flops(n_a + n_v, Dd, s.mlp_ratio)
        flops += 2 * n_a * Dd * pixels * 1 + 2 * n_v * Dd * pixels * 3
    if model.contrast_loss_weight != 0:
        flops += n_joint * (block_flops(vis_a, D, s.mlp_ratio) + block_flops(vis_v, D, s.mlp_ratio))
    return flops


def bench(model: CAVMAE, device: torch.device, batch: int, steps: int, warmup: int) -> "dict[str, float]":
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    opt = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=1e-5)
    g = torch.Generator(device=device).manual_seed(0)
    t_len = model.audio_grid[1] * PATCH_SIZE
    mel = model.audio_grid[0] * PATCH_SIZE
    img = model.image_grid[0] * PATCH_SIZE
    audio = torch.randn(batch, t_len, mel, device=device, generator=g)
    image = torch.randn(batch, 3, img, img, device=device, generator=g)

    def step() -> None:
        with autocast:
            loss = model(audio, image)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    flops = 3 * pretrain_forward_flops(model) * batch
    return {"step_s": step_s, "samples_s": batch / step_s, "tflops": flops / step_s / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 8 on CPU, 48 and 256 on CUDA)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--size", default="base", help="model size name (train.model.MODEL_SIZES)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches = args.batch or ([48, 256] if device.type == "cuda" else [8])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    torch.manual_seed(0)
    model = CAVMAE(size=args.size).to(device).train()
    print(f"CAV-MAE pretraining step, size {args.size}, {precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    print(f"model forward: {pretrain_forward_flops(model) / 1e9:.1f} GFLOP/sample (matmuls), step = 3x forward")
    print(f"| {'device':<28} | {'batch':>5} | {'step s':>8} | {'samples/s':>9} | {'TFLOP/s':>7} |")
    print(f"|{'-' * 30}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 9}|")
    for b in batches:
        try:
            r = bench(model, device, b, args.steps, args.warmup)
            print(f"| {name:<28} | {b:>5} | {r['step_s']:>8.3f} | {r['samples_s']:>9.2f} | {r['tflops']:>7.3f} |")
        except torch.cuda.OutOfMemoryError:
            print(f"| {name:<28} | {b:>5} | {'OOM':>8} | {'-':>9} | {'-':>7} |")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
