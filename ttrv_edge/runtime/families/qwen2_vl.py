"""Qwen2-VL (and Qwen2.5-VL) inputs without torch: ``smart_resize`` to multiples of patch*merge within
[min_pixels, max_pixels], then patchify into [grid_h * grid_w, C * T * P * P] rows in (merge-block, row, col)
order. ``<|image_pad|>`` is repeated grid_h * grid_w / merge^2 times. The 3-D rope positions (``get_rope_index``)
and the vision rope positions (``get_vision_position_ids``) are computed here in numpy, since they are
data-dependent loops that do not export. A prompt may hold several images (``prepare_many``): their patches are
concatenated with one segment id per image (the vision graph attends within a segment)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..preprocess import Prepared, expand_images, rescale_normalise, resize

__all__ = ["MROPE", "pixels", "prepare", "prepare_many", "smart_resize", "text_positions", "vision_positions"]

MROPE = True


def prepare(image: Image.Image, prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """Token ids, vision feeds (patches, vision rope positions, one segment) and 3-D positions of ``prompt``."""
    return prepare_many([image], prompt, pre, chat, image_token_id)


def prepare_many(images: list[Image.Image], prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """``prepare`` for a prompt whose markers (one per image, in order) stand for ``images``."""
    merge = int(pre["merge_size"])
    marker = pre["image_token"]

    def encode(image):
        patches, grid = pixels(image, pre)
        return marker * (grid[0] * grid[1] * grid[2] // merge**2), (patches, grid)

    text, encoded = expand_images(prompt, marker, images, encode)
    ids, grids = chat.encode(text), [grid for _, grid in encoded]
    positions, next_position = text_positions(ids, image_token_id, grids, merge)
    feeds = {
        "pixel_values": np.concatenate([patches for patches, _ in encoded]),
        "rope_positions": np.concatenate([vision_positions(grid, merge) for grid in grids]),
        "segment_ids": np.concatenate([np.full(p.shape[0], i, dtype=np.int64) for i, (p, _) in enumerate(encoded)]),
    }
    return Prepared(ids, feeds, positions, next_position)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image: aspect ratio must be below 200, got {max(height, width) / min(height, width):.0f}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixels(image: Image.Image, cfg: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flattened patches [grid_h * grid_w, C * T * P * P] float32 and the grid (t, h, w) of one RGB image."""
    patch, merge, temporal = int(cfg["patch_size"]), int(cfg["merge_size"]), int(cfg["temporal_patch_size"])
    if cfg.get("do_resize", True):
        height, width = smart_resize(
            image.height, image.width, patch * merge, int(cfg["min_pixels"]), int(cfg["max_pixels"])
        )
        image = resize(image, height, width, int(cfg.get("resample", 3)))
    array = rescale_normalise(np.asarray(image), cfg)
    channels, height, width = array.shape
    grid_h, grid_w = height // patch, width // patch
    patches = array.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    patches = np.broadcast_to(patches, (*patches.shape[:5], temporal, patch, patch))
    flat = patches.reshape(grid_h * grid_w, channels * temporal * patch * patch)
    return np.ascontiguousarray(flat, dtype=np.float32), (1, grid_h, grid_w)


def vision_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(h, w) rope positions [t * h * w, 2] int64 of the vision patches, laid out block-major over merge x merge."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)).astype(np.int64)


def text_positions(input_ids: np.ndarray, image_token_id: int, grid, merge: int):
    """3-D rope positions [3, 1, L] int64 of a prompt, and the next free position. ``grid`` is the (t, h, w) of its
    image, or a list of them for a prompt with several images (in prompt order).

    Text runs count up by one in all three rows; an image's tokens get (start, start + row, start + col) over the
    merged grid, and the text after it starts at start + max(grid_h, grid_w) / merge (Qwen2-VL's get_rope_index).
    """
    grids = list(grid) if isinstance(grid[0], (tuple, list)) else [grid]
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    out = np.zeros((3, ids.size), dtype=np.int64)
    pos, i, image = 0, 0, 0
    while i < ids.size:
        j = i
        while j < ids.size and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out[:, i:j] = pos + np.arange(j - i)
            pos += j - i
        else:
            if image >= len(grids):
                raise ValueError(f"image: the prompt holds more images than the {len(grids)} given")
            grid = grids[image]
            image += 1
            t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
            if j - i != t * gh * gw:
                raise ValueError(f"image: {j - i} image tokens in the prompt, the image needs {t * gh * gw}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i:j] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
            pos += max(grid[1], grid[2]) // merge
        i = j
    return out[:, None, :], int(out.max()) + 1 if ids.size else 0
