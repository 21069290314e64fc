"""Token layout helpers and the stochastic grid sampling of docs/cause.md §3.

Backbone tokens come as [B, P, D] in row-major order over the patch grid; the heads
work on [B, D, h, w] maps.
"""
import math

import torch

WINDOW = 4  # the grid sampling's cells are WINDOW×WINDOW tokens, the official 4×4


def tokens_to_map(x, height=None, width=None):
    """[B, P, D] -> [B, D, h, w]; a square grid (h = w = sqrt(P)) unless the sides are given."""
    b, p, d = x.shape
    if height is None and width is None:
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(f"{p} tokens do not form a square grid; pass height and width")
        height = width = side
    elif height is None:
        height = p // width
    elif width is None:
        width = p // height
    if height * width != p:
        raise ValueError(f"{p} tokens do not fill a {height}x{width} grid")
    return x.transpose(1, 2).reshape(b, d, height, width)


def map_to_tokens(x):
    """[B, D, h, w] -> [B, h*w, D]."""
    return x.flatten(2).transpose(1, 2)


def grid_cells(num_tokens):
    """Cells of the grid sampling of a square grid of `num_tokens` tokens."""
    return (math.isqrt(num_tokens) // WINDOW) ** 2


def grid_order(random, num_tokens):
    """Positions for grid_sample_tokens from a step's BatchRandom: one per (image, cell), drawn for
    the global batch so that every process of the batch samples the same positions."""
    return random.integers(WINDOW * WINDOW, (grid_cells(num_tokens),)).reshape(-1)


def grid_sample_tokens(x, order=None):
    """Keep one token per WINDOW×WINDOW cell of the square token grid (docs/cause.md §3).

    `order` holds, per (image, cell) in image-major and cell row-major order, the
    row-major position 0..WINDOW²-1 inside the cell; it is drawn uniformly when None.
    Passing the returned order back samples another tensor at the same positions.
    Returns ([B, cells, D], order).
    """
    window = WINDOW
    b, p, d = x.shape
    side = math.isqrt(p)
    if side * side != p:
        raise ValueError(f"{p} tokens do not form a square grid")
    if side < window:
        raise ValueError(f"grid side {side} is smaller than the window {window}")
    # A side that is not a multiple of the window (e.g. 14 tokens: ViT-/16 at 224 px, the MLP
    # head's training size) leaves its last rows and columns out, as the official unfold does.
    cells_per_side = side // window
    cells = cells_per_side * cells_per_side
    if order is None:
        order = torch.randint(window * window, (b * cells,), device=x.device)
    offset = order.to(x.device).reshape(b, cells)
    # Top-left token of every cell, then the offset inside the cell, as flat row-major indices.
    cell = torch.arange(cells, device=x.device)
    corner = (cell // cells_per_side) * window * side + (cell % cells_per_side) * window
    index = corner + (offset // window) * side + offset % window
    out = x.gather(1, index.unsqueeze(-1).expand(b, cells, d))
    return out, order
