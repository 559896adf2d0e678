"""CAV-MAE Sync retrieval: our batched strategies (train/retrieve.py `frame_similarity`) against the released
script's algorithm (src/retrieval.py `get_agg_sim_mat`: a Python loop over clip pairs, and for each pair over frame
pairs, one numpy cosine at a time).

    python bench/sync_retrieval.py                       # N=1600 clips of 16 frames, D=768 (VGGSound retrieval set)
    python bench/sync_retrieval.py --clips 200 --loop-clips 6

The loop costs N^2 T^2 cosines (6.6e8 at N=1600: hours), so it is timed on --loop-clips clips and scaled by
(N / loop_clips)^2, its cost being the same for every clip pair; the batched similarity is timed on all N clips.
The loop here is written from the released algorithm (cosine = dot / (norm * norm) per frame pair, aggregated per
clip pair), and the two matrices are compared on the loop's clips. Prints a table; times vary with the machine.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from cavmae.train.retrieve import STRATEGIES, frame_similarity  # noqa: E402


def loop_similarity(a: np.ndarray, b: np.ndarray, strategy: str) -> np.ndarray:
    """The released algorithm: per clip pair, per frame pair (all pairs or the aligned ones), one cosine."""
    n, t = a.shape[0], a.shape[1]

    def cos(x, y):
        return np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))

    sim = np.empty((n, b.shape[0]))
    for i in range(n):
        for j in range(b.shape[0]):
            if strategy in ("mean", "max"):
                pairs = np.array([[cos(a[i, k], b[j, m]) for m in range(t)] for k in range(t)])
            else:
                pairs = np.array([cos(a[i, k], b[j, k]) for k in range(t)])
            sim[i, j] = pairs.max() if strategy.endswith("max") else pairs.mean()
    return sim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=1600)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--loop-clips", type=int, default=8, help="clips the loop is timed on (then scaled)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    audio = torch.nn.functional.normalize(torch.randn(args.clips, args.frames, args.dim, generator=g), dim=-1)
    visual = torch.nn.functional.normalize(audio + torch.randn(audio.shape, generator=g), dim=-1)
    n, m = args.clips, args.loop_clips
    print(f"N={n} clips x T={args.frames} frames x D={args.dim}, float32 features; torch threads "
          f"{torch.get_num_threads()}; loop timed on {m} clips and scaled by (N/{m})^2")
    print(f"| {'strategy':<13} | {'loop (scaled)':>13} | {'batched':>9} | {'speed-up':>9} | {'max |diff|':>10} |")
    print("|---------------|---------------|-----------|-----------|------------|")
    for strategy in STRATEGIES:
        a_np, v_np = audio[:m].numpy(), visual[:m].numpy()
        start = time.perf_counter()
        ref = loop_similarity(a_np, v_np, strategy)
        loop_s = (time.perf_counter() - start) * (n / m) ** 2
        start = time.perf_counter()
        frame_similarity(audio, visual, strategy)
        batched_s = time.perf_counter() - start
        diff = np.abs(frame_similarity(audio[:m], visual[:m], strategy).numpy() - ref).max()
        print(f"| {strategy:<13} | {loop_s:>11.0f} s | {batched_s:>7.2f} s | {loop_s / batched_s:>8.0f}x | "
              f"{diff:>10.1e} |", flush=True)


if __name__ == "__main__":
    main()
