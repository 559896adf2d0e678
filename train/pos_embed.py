"""Fixed 2-D sine-cosine positional embeddings (the MAE formula, as used by CAV-MAE).

Official checkpoints store these tables, and the IN-MAE initialisation copies MAE's table, so the layout must match
bit for bit up to float32 rounding: for a grid of H rows and W columns, token k = row * W + col (row-major, the order
a stride-16 Conv2d flattens to). The first D/2 channels encode the *column* index k % W and the last D/2 the *row*
index k // W. Each half is [sin(pos * w_i), cos(pos * w_i)] with w_i = 1 / 10000^(i / (D/4)), i < D/4.

For audio the conv "height" is frequency and the "width" is time, so the column is the time index.
"""

import torch


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] table: sin in the first half, cos in the second (float64)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64).reshape(-1)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, embed_dim] float32 table, row-major tokens; column code first, row code second."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb_col = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_row = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    return torch.cat([emb_col, emb_row], dim=1).float()
