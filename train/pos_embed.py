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


def is_sincos_pos_embed(table: torch.Tensor, grid_h: int, grid_w: int) -> bool:
    """Whether a [1, grid_h * grid_w, D] table is the fixed sin-cos table of that grid (float32 rounding aside): a
    pretrained CAV-MAE's tables are, a finetuned one's with trainable position embeddings (tr_pos) are not."""
    fixed = get_2d_sincos_pos_embed(table.shape[-1], grid_h, grid_w)
    return torch.allclose(table.reshape(fixed.shape).float(), fixed, atol=1e-5)


def cut_or_interpolate_pos_embed(
    table: torch.Tensor, old_grid: "tuple[int, int]", new_grid: "tuple[int, int]"
) -> torch.Tensor:
    """A trained [1, H*W, D] table fitted to another grid as AST (Gong et al. 2021, `ASTModel.__init__`) fits its
    pretrained one: per axis, the centre slice when the new axis is shorter, bilinear interpolation when longer."""
    (h, w), (new_h, new_w) = old_grid, new_grid
    grid = table.reshape(1, h, w, -1).permute(0, 3, 1, 2).float()  # [1, D, H, W]
    if new_w < w:
        grid = grid[:, :, :, w // 2 - new_w // 2: w // 2 - new_w // 2 + new_w]
    elif new_w > w:
        grid = torch.nn.functional.interpolate(grid, size=(h, new_w), mode="bilinear")
    if new_h < h:
        grid = grid[:, :, h // 2 - new_h // 2: h // 2 - new_h // 2 + new_h, :]
    elif new_h > h:
        grid = torch.nn.functional.interpolate(grid, size=(new_h, new_w), mode="bilinear")
    return grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, -1).to(table.dtype)
