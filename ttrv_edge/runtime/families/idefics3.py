"""Idefics3 / SmolVLM inputs without torch: resize the longest edge, then either split into ``max_image_size``
crops plus a global view (rows x cols, ``<row_i_col_j>`` tokens) or resize to one square view. The prompt's
``<image>`` is expanded to ``<fake_token_around_image><global-img><image>*N<fake_token_around_image>`` (with the
row/col blocks first when split). Positions are 0..L-1. A prompt may hold several images (``prepare_many``): their
crops are concatenated in prompt order, each marker expanded for its own image."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..preprocess import Prepared, expand_images, linear_prepared, rescale_normalise, resize

__all__ = ["MROPE", "image_prompt", "pixels", "prepare", "prepare_many"]

MROPE = False


def prepare(image: Image.Image, prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """Token ids, vision feeds and positions of ``prompt`` (one image marker) for ``image``."""
    return prepare_many([image], prompt, pre, chat, image_token_id)


def prepare_many(images: list[Image.Image], prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """``prepare`` for a prompt whose markers (one per image, in order) stand for ``images``."""

    def encode(image):
        crops, rows, cols = pixels(image, pre)
        return image_prompt(rows, cols, pre), crops

    text, crops = expand_images(prompt, pre["image_token"], images, encode)
    return linear_prepared(chat.encode(text), np.concatenate(crops))


def _longest_edge_size(height: int, width: int, max_len: int) -> tuple[int, int]:
    """transformers' _resize_output_size_rescale_to_max_len then _scale_below_upper_bound (4096)."""
    aspect = width / height
    if width >= height:
        width, height = max_len, int(max_len / aspect)
        height += height % 2
    else:
        height, width = max_len, int(max_len * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if max(height, width) > 4096:
        aspect = width / height
        if width >= height:
            width, height = 4096, int(4096 / aspect)
        else:
            height, width = 4096, int(4096 * aspect)
    return max(height, 1), max(width, 1)


def _multiple_of(height: int, width: int, unit: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder: both sides rounded up to multiples of ``unit``, keeping the aspect."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / unit) * unit
        height = math.ceil(int(width / aspect) / unit) * unit
    else:
        height = math.ceil(height / unit) * unit
        width = math.ceil(int(height * aspect) / unit) * unit
    return height, width


def pixels(image: Image.Image, cfg: dict) -> tuple[np.ndarray, int, int]:
    """pixel_values [n, 3, S, S] float32 for one RGB image, and the (rows, cols) of its crops (0, 0 without split)."""
    resample = int(cfg.get("resample", 1))
    side = int(cfg["max_image_size"])
    if cfg.get("do_resize", True):
        height, width = _longest_edge_size(image.height, image.width, int(cfg["longest_edge"]))
        image = resize(image, height, width, resample)
    rows = cols = 0
    if cfg.get("do_image_splitting", False):
        height, width = _multiple_of(image.height, image.width, side)
        image = resize(image, height, width, resample)
        frames = [image]
        if height > side or width > side:
            rows, cols = (height - side) // side + 1, (width - side) // side + 1
            frames = [
                image.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
                for r in range(rows)
                for c in range(cols)
            ]
            frames.append(resize(image, side, side, resample))
    else:
        frames = [resize(image, side, side, resample)]
    arrays = [rescale_normalise(np.asarray(frame), cfg) for frame in frames]
    return np.stack(arrays), rows, cols


def image_prompt(rows: int, cols: int, cfg: dict) -> str:
    """The text that replaces one ``<image>`` in the prompt (Idefics3Processor's image expansion)."""
    fake, image, glob = cfg["fake_image_token"], cfg["image_token"], cfg["global_image_token"]
    block = image * int(cfg["image_seq_len"])
    if rows == 0 and cols == 0:
        return f"{fake}{glob}{block}{fake}"
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += f"{fake}<row_{r + 1}_col_{c + 1}>{block}"
        text += "\n"
    return text + f"\n{fake}{glob}{block}{fake}"
