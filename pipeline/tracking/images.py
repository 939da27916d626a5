"""Image grids for MLflow images and artifacts (samples, reconstructions, basis functions)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: torch.Tensor, columns: int = 8, padding_px: int = 2) -> Image.Image:
    """Tile a batch of images in [-1, 1] into one RGB picture, rows of ``columns`` images."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    rows = (count + columns - 1) // columns
    canvas = np.full(
        (rows * (height + padding_px) + padding_px, columns * (width + padding_px) + padding_px, 3), 255, np.uint8
    )
    for i in range(count):
        r, c = divmod(i, columns)
        top, left = padding_px + r * (height + padding_px), padding_px + c * (width + padding_px)
        canvas[top:top + height, left:left + width] = pixels[i]
    return Image.fromarray(canvas)


def basis_grid(patterns_chw: list[np.ndarray], columns: int = 8, tile_px: int = 48, padding_px: int = 2) -> Image.Image:
    """Tile basis functions (signed (3, h, w) patterns, each min-max normalised for display) into one RGB
    picture, each enlarged (nearest) to ``tile_px`` on its longer side and centred in its tile."""
    from pipeline.evaluation.basis import display_tile

    rows = max(1, (len(patterns_chw) + columns - 1) // columns)
    step = tile_px + padding_px
    canvas = np.full((rows * step + padding_px, columns * step + padding_px, 3), 255, np.uint8)
    for i, pattern in enumerate(patterns_chw):
        tile = np.asarray(display_tile(pattern, tile_px))
        r, c = divmod(i, columns)
        top = padding_px + r * step + (tile_px - tile.shape[0]) // 2
        left = padding_px + c * step + (tile_px - tile.shape[1]) // 2
        canvas[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    return Image.fromarray(canvas)
