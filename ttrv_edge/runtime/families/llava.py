"""LLaVA inputs without torch: the PIL CLIP image processor (resize the shortest edge, center crop, rescale,
normalise) or the PIL SigLIP one (resize to the square size, rescale, normalise), as the manifest says; the prompt's
``<image>`` is repeated once per image feature (``LlavaProcessor``: patches + additional tokens such as CLIP's CLS,
minus one for the "default" select strategy). Positions are 0..L-1. A prompt may hold several images
(``prepare_many``): their pixels are stacked in prompt order, each marker expanded for its own image."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..preprocess import Prepared, expand_images, linear_prepared, rescale_normalise, resize

__all__ = ["MROPE", "center_crop", "image_tokens", "pixels", "prepare", "prepare_many", "resized_size"]

MROPE = False


def prepare(image: Image.Image, prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """Token ids, vision feeds and positions of ``prompt`` (one image marker) for ``image``."""
    return prepare_many([image], prompt, pre, chat, image_token_id)


def prepare_many(images: list[Image.Image], prompt: str, pre: dict, chat, image_token_id: int) -> Prepared:
    """``prepare`` for a prompt whose markers (one per image, in order) stand for ``images``."""
    marker = pre["image_token"]

    def encode(image):
        array = pixels(image, pre)
        return marker * image_tokens(array.shape[1], array.shape[2], pre), array

    text, arrays = expand_images(prompt, marker, images, encode)
    return linear_prepared(chat.encode(text), np.stack(arrays))


def image_tokens(height: int, width: int, cfg: dict) -> int:
    """``LlavaProcessor.replace_image_token``'s count for a [3, height, width] pixel array."""
    patch = int(cfg["patch_size"])
    count = (height // patch) * (width // patch) + int(cfg.get("num_additional_image_tokens") or 0)
    return count - (cfg.get("vision_feature_select_strategy") == "default")


def resized_size(height: int, width: int, cfg: dict) -> tuple[int, int]:
    """The (height, width) after the resize: the shortest edge to ``size_shortest_edge`` keeping the aspect
    (transformers' get_resize_output_image_size, default_to_square=False), else ``size_height`` x ``size_width``."""
    short_side = cfg.get("size_shortest_edge")
    if short_side:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = int(short_side), int(int(short_side) * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    return int(cfg["size_height"]), int(cfg["size_width"])


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop of an HWC array: the centred window, zero-padded first where the image is smaller."""
    orig_h, orig_w = array.shape[:2]
    top, left = (orig_h - height) // 2, (orig_w - width) // 2
    if top >= 0 and left >= 0 and top + height <= orig_h and left + width <= orig_w:
        return array[top : top + height, left : left + width]
    new_h, new_w = max(height, orig_h), max(width, orig_w)
    padded = np.zeros((new_h, new_w, *array.shape[2:]), dtype=array.dtype)
    pad_top, pad_left = math.ceil((new_h - orig_h) / 2), math.ceil((new_w - orig_w) / 2)
    padded[pad_top : pad_top + orig_h, pad_left : pad_left + orig_w] = array
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def pixels(image: Image.Image, cfg: dict) -> np.ndarray:
    """pixel_values [3, H, W] float32 of one RGB image."""
    if cfg.get("do_resize", True):
        height, width = resized_size(image.height, image.width, cfg)
        image = resize(image, height, width, int(cfg.get("resample", 3)))
    array = np.asarray(image)
    if cfg.get("do_center_crop"):
        array = center_crop(array, int(cfg["crop_height"]), int(cfg["crop_width"]))
    return rescale_normalise(array, cfg)
