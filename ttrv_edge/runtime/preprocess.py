"""Torch-free preprocessing for the ONNX runner: images (numpy + PIL), chat prompts (jinja2), tokens (tokenizers).

This module re-implements, for one image per prompt, what the transformers processors of the exported architectures
do, so that ``ttrv_edge.runtime.runner`` answers without importing torch or transformers. The settings come from the
``preprocess`` section of the export manifest, which ``ttrv_edge.export.onnx`` fills from the loaded processor (the same
values as the copied ``processor_config.json``, flattened). tests/test_export.py checks pixel values, token ids and
rope positions against the transformers processors and models.

What it follows exactly (same order of operations and dtypes as transformers 5.x's PIL image processors):

- Idefics3 / SmolVLM: resize the longest edge, then either split into ``max_image_size`` crops plus a global view
  (rows x cols, ``<row_i_col_j>`` tokens) or resize to one square view; rescale in float64 then cast to float32;
  normalise in float32. The prompt's ``<image>`` is expanded to ``<fake_token_around_image><global-img><image>*N...``.
- Qwen2-VL: ``smart_resize`` to multiples of patch*merge within [min_pixels, max_pixels], then patchify into
  [grid_h * grid_w, C * T * P * P] rows in (merge-block, row, col) order. ``<|image_pad|>`` is repeated
  grid_h * grid_w / merge^2 times. The 3-D rope positions (``get_rope_index``) and the vision rope positions
  (``get_vision_position_ids``) are computed here in numpy, since they are data-dependent loops that do not export.

Deviations: one image per prompt (what ttrv-edge asks); images are converted to RGB by ``ttrv_edge.io.images``
(transparent pixels composited on white), like the processors' ``do_convert_rgb``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "ChatPrompt",
    "idefics3_image_prompt",
    "idefics3_pixels",
    "qwen2vl_pixels",
    "qwen2vl_text_positions",
    "qwen2vl_vision_positions",
    "rescale_normalise",
]


def rescale_normalise(array: np.ndarray, cfg: dict) -> np.ndarray:
    """HWC uint8 -> CHW float32: x * rescale_factor (in float64, then float32), then (x - mean) / std in float32."""
    image = np.moveaxis(array, -1, 0)
    if cfg.get("do_rescale", True):
        image = (image.astype(np.float64) * cfg["rescale_factor"]).astype(np.float32)
    else:
        image = image.astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.asarray(cfg["image_mean"], dtype=np.float32)
        std = np.asarray(cfg["image_std"], dtype=np.float32)
        image = ((image.T - mean) / std).T
    return np.ascontiguousarray(image, dtype=np.float32)


def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample=resample)


# ----------------------------------------------------------------------------------------------------- Idefics3


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


def idefics3_pixels(image: Image.Image, cfg: dict) -> tuple[np.ndarray, int, int]:
    """pixel_values [n, 3, S, S] float32 for one RGB image, and the (rows, cols) of its crops (0, 0 without split)."""
    resample = int(cfg.get("resample", 1))
    side = int(cfg["max_image_size"])
    if cfg.get("do_resize", True):
        height, width = _longest_edge_size(image.height, image.width, int(cfg["longest_edge"]))
        image = _resize(image, height, width, resample)
    rows = cols = 0
    if cfg.get("do_image_splitting", False):
        height, width = _multiple_of(image.height, image.width, side)
        image = _resize(image, height, width, resample)
        frames = [image]
        if height > side or width > side:
            rows, cols = (height - side) // side + 1, (width - side) // side + 1
            frames = [
                image.crop((c * side, r * side, (c + 1) * side, (r + 1) * side))
                for r in range(rows)
                for c in range(cols)
            ]
            frames.append(_resize(image, side, side, resample))
    else:
        frames = [_resize(image, side, side, resample)]
    arrays = [rescale_normalise(np.asarray(frame), cfg) for frame in frames]
    return np.stack(arrays), rows, cols


def idefics3_image_prompt(rows: int, cols: int, cfg: dict) -> str:
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


# ----------------------------------------------------------------------------------------------------- Qwen2-VL


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
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


def qwen2vl_pixels(image: Image.Image, cfg: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flattened patches [grid_h * grid_w, C * T * P * P] float32 and the grid (t, h, w) of one RGB image."""
    patch, merge, temporal = int(cfg["patch_size"]), int(cfg["merge_size"]), int(cfg["temporal_patch_size"])
    if cfg.get("do_resize", True):
        height, width = _smart_resize(
            image.height, image.width, patch * merge, int(cfg["min_pixels"]), int(cfg["max_pixels"])
        )
        image = _resize(image, height, width, int(cfg.get("resample", 3)))
    array = rescale_normalise(np.asarray(image), cfg)
    channels, height, width = array.shape
    grid_h, grid_w = height // patch, width // patch
    patches = array.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)[:, :, :, :, :, None]
    patches = np.broadcast_to(patches, (*patches.shape[:5], temporal, patch, patch))
    flat = patches.reshape(grid_h * grid_w, channels * temporal * patch * patch)
    return np.ascontiguousarray(flat, dtype=np.float32), (1, grid_h, grid_w)


def qwen2vl_vision_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(h, w) rope positions [t * h * w, 2] int64 of the vision patches, laid out block-major over merge x merge."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)).astype(np.int64)


def qwen2vl_text_positions(input_ids: np.ndarray, image_token_id: int, grid: tuple[int, int, int], merge: int):
    """3-D rope positions [3, 1, L] int64 of a prompt holding one image, and the next free position.

    Text runs count up by one in all three rows; the image's tokens get (start, start + row, start + col) over the
    merged grid, and the text after it starts at start + max(grid_h, grid_w) / merge (Qwen2-VL's get_rope_index).
    """
    ids = np.asarray(input_ids).reshape(-1)
    is_image = ids == image_token_id
    t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
    out = np.zeros((3, ids.size), dtype=np.int64)
    pos, i = 0, 0
    while i < ids.size:
        j = i
        while j < ids.size and is_image[j] == is_image[i]:
            j += 1
        if not is_image[i]:
            out[:, i:j] = pos + np.arange(j - i)
            pos += j - i
        else:
            if j - i != t * gh * gw:
                raise ValueError(f"image: {j - i} image tokens in the prompt, the image needs {t * gh * gw}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[:, i:j] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos
            pos += max(grid[1], grid[2]) // merge
        i = j
    return out[:, None, :], int(out.max()) + 1 if ids.size else 0


# ----------------------------------------------------------------------------------------------------- text


class ChatPrompt:
    """Chat template rendering (jinja2, sandboxed, as transformers does) and tokenization (``tokenizers``)."""

    def __init__(self, directory: str | Path, template_file: str, tokenizer_file: str, special_tokens: dict):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        directory = Path(directory)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = _raise_template_error
        self.template = env.from_string((directory / template_file).read_text(encoding="utf-8"))
        self.tokenizer = Tokenizer.from_file(str(directory / tokenizer_file))
        self.special_tokens = dict(special_tokens)

    def render(self, text: str) -> str:
        """One user turn (the image, then ``text``) with the assistant generation prompt appended."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)

    def encode(self, text: str) -> np.ndarray:
        """Token ids [1, L] int64 of an already expanded prompt (special tokens as the tokenizer's post-processor)."""
        return np.asarray([self.tokenizer.encode(text, add_special_tokens=True).ids], dtype=np.int64)

    def decode(self, ids, clean_up_spaces: bool = False) -> str:
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return _clean_up_spaces(text) if clean_up_spaces else text


def _raise_template_error(message):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization (used when tokenizer_config.json sets clean_up_tokenization_spaces)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")):
        text = text.replace(before, after)
    for suffix in ("m", "s", "ve", "re"):
        text = text.replace(f" '{suffix}", f"'{suffix}")
    return text
