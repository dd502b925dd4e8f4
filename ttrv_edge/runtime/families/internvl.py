"""InternVL inputs without torch: GotOcr2's dynamic tiling (``crop_to_patches``: the image resized to the cols x rows
canvas of tiles whose aspect ratio is closest to the image's, cut into tiles, plus a thumbnail when there is more
than one tile) or one resized tile. The prompt's ``<IMG_CONTEXT>`` is expanded to ``<img>`` + ``<IMG_CONTEXT>`` x
``image_seq_length`` x tiles + ``</img>`` (InternVLProcessor). Positions are 0..L-1. A prompt may hold several images
(``prepare_many``): their tiles are concatenated in prompt order, each marker expanded for its own image."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..preprocess import Prepared, expand_images, linear_prepared, rescale_normalise, resize

__all__ = ["MROPE", "image_prompt", "pixels", "prepare", "prepare_many", "tiled_canvas"]

MROPE = False


def prepare(image: Image.Image, prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """Token ids, vision feeds (the image's tiles) and positions of ``prompt`` (one image marker) for ``image``."""
    return prepare_many([image], prompt, pre, chat, image_token_id)


def prepare_many(images: list[Image.Image], prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """``prepare`` for a prompt whose markers (one per image, in order) stand for ``images``."""

    def encode(image):
        tiles = pixels(image, pre)
        return image_prompt(tiles.shape[0], pre), tiles

    text, tiles = expand_images(prompt, pre["image_token"], images, encode)
    return linear_prepared(chat.encode(text), np.concatenate(tiles))


def tiled_canvas(height: int, width: int, tile: tuple[int, int], min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image (GotOcr2's get_optimal_tiled_canvas): the closest aspect ratio
    among grids of min..max tiles; on a tie, the grid with more tiles while the image's area exceeds half of it."""
    sides = range(1, max_tiles + 1)
    grids = [(w, h) for w in sides for h in sides if min_tiles <= w * h <= max_tiles]
    grids.sort(key=lambda grid: grid[0] * grid[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * grid[0] * grid[1]:
            best = grid
    return best


def pixels(image: Image.Image, cfg: dict) -> np.ndarray:
    """pixel_values [tiles, 3, H, W] float32 of one RGB image: the tiles row by row, then the thumbnail (when
    tiled into more than one), or the single resized view."""
    resample = int(cfg.get("resample", 3))
    height, width = (int(x) for x in cfg["size"])
    max_tiles = int(cfg.get("max_patches", 1))
    if cfg.get("crop_to_patches") and max_tiles > 1:
        cols, rows = tiled_canvas(image.height, image.width, (height, width), int(cfg.get("min_patches", 1)), max_tiles)
        canvas = resize(image, rows * height, cols * width, resample)
        frames = [
            canvas.crop((c * width, r * height, (c + 1) * width, (r + 1) * height))
            for r in range(rows)
            for c in range(cols)
        ]
        if len(frames) > 1:
            frames.append(resize(image, height, width, resample))
    else:
        frames = [resize(image, height, width, resample) if cfg.get("do_resize", True) else image]
    return np.stack([rescale_normalise(np.asarray(frame), cfg) for frame in frames])


def image_prompt(tiles: int, cfg: dict) -> str:
    """The text that replaces one ``<IMG_CONTEXT>`` marker for an image of ``tiles`` tiles."""
    block = cfg["image_token"] * (int(cfg["image_seq_length"]) * tiles)
    return f"{cfg['start_image_token']}{block}{cfg['end_image_token']}"
