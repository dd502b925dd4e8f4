"""Torch-free preprocessing shared by the ONNX runner's families: pixels (numpy + PIL), chat prompts (jinja2),
tokens (tokenizers), and ``Prepared``, what a family's ``prepare`` hands the graphs.

The family modules (``ttrv_edge.runtime.families``) re-implement, for the prompts ttrv-edge builds, what the
transformers processors of the exported families do, so that ``ttrv_edge.runtime.runner`` answers without importing
torch or transformers. The settings come from the ``preprocess`` section of the export manifest, which
``ttrv_edge.export.onnx`` fills from the loaded processor (the same values as the copied ``processor_config.json``,
flattened). tests/test_export.py checks pixel values, token ids and rope positions against the transformers
processors and models. Images are converted to RGB by ``ttrv_edge.io.images`` (transparent pixels composited on
white), like the processors' ``do_convert_rgb``; rescaling and normalising follow transformers 5.x's PIL image
processors (rescale in float64 then cast to float32, normalise in float32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["ChatPrompt", "Prepared", "expand_images", "linear_prepared", "rescale_normalise", "resize"]


@dataclass
class Prepared:
    """One prompt, ready for the graphs: token ids, the vision graph's feeds, the prompt's position ids and the
    position of the first generated token."""

    input_ids: np.ndarray  # [1, L] int64
    vision_feeds: dict
    position_ids: np.ndarray  # [1, L] or [3, 1, L] int64
    next_position: int


def expand_images(prompt: str, marker: str, images: list, encode_image) -> tuple[str, list]:
    """The prompt with its image markers (one per image, in order) replaced, and each image's arrays.

    ``encode_image(image) -> (expansion text, arrays)`` gives what one marker becomes and the image's inputs to the
    vision graph (pixels, crops or patches)."""
    pieces = prompt.split(marker)
    text, encoded = pieces[0], []
    for image, after in zip(images, pieces[1:], strict=True):
        expansion, arrays = encode_image(image)
        text += expansion + after
        encoded.append(arrays)
    return text, encoded


def linear_prepared(ids: np.ndarray, pixel_values: np.ndarray) -> Prepared:
    """``Prepared`` for a decoder with 1-D positions 0..L-1 and a vision graph fed ``pixel_values`` only."""
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    return Prepared(ids, {"pixel_values": pixel_values}, positions, ids.shape[1])


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


def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), resample=resample)


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

    def render(self, text: str, images: int = 1) -> str:
        """One user turn (``images`` images, then ``text``) with the assistant generation prompt appended."""
        content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
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
