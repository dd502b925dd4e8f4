"""Label-preserving views of an image, for votes and updates across views (TTAug/MEMO-style; not in the paper).

With ``views = V > 1`` the N rollouts of an input are spread over V views of its image: view 0 is the image itself,
the others are random label-preserving transforms. The answer distribution, the rewards and the "view vote" (the
majority answer over all views) are computed over the pooled rollouts, and each view's rollouts are trained on with
that shared vote, so an update teaches the model to answer the same across views. Why: under a pixel-level shift
most of a small model's errors are confident (most of its N samples agree on the same wrong answer), so the vote of
one image has nothing to correct; a vote across views often has a different, correct majority.

Transforms (``view_transforms``):

- ``geometric`` (default): a random resized crop keeping 0.8-1.0 of the area, a shift of up to 3 px (edges
  replicated), and a horizontal flip unless the question mentions left or right. Every answer about shape,
  colour or count survives these.
- ``photometric``: the geometric transform plus one of a light blur, a 3x3 median filter, autocontrast or
  histogram equalisation. Opt-in: they can undo noise or low contrast for shape and count questions, but they
  change colours, so colour questions may not survive them, and on our benchmark equalisation pushed the model
  out of its distribution.

Each view costs one prefill of its own image (the rollouts of a view share it), so V views cost V image encodings
per sampling round instead of one.
"""

from __future__ import annotations

import random
import re

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from ..config import VIEW_TRANSFORMS

CROP_AREA = (0.8, 1.0)
MAX_SHIFT = 3
_SIDEDNESS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def flip_allowed(question_text: str) -> bool:
    """A horizontal flip keeps the answer unless the question is about left and right."""
    return _SIDEDNESS.search(question_text) is None


def _shift(image: Image.Image, dx: int, dy: int) -> Image.Image:
    """``image`` moved by (dx, dy) pixels, the uncovered band filled by replicating the edge."""
    if not (dx or dy):
        return image
    pad = max(abs(dx), abs(dy))
    padded = np.pad(np.asarray(image), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    height, width = image.size[1], image.size[0]
    top, left = pad - dy, pad - dx
    return Image.fromarray(padded[top : top + height, left : left + width])


def geometric_view(image: Image.Image, rng: random.Random, flip: bool) -> Image.Image:
    width, height = image.size
    area = rng.uniform(*CROP_AREA)
    crop_w, crop_h = max(8, round(width * area**0.5)), max(8, round(height * area**0.5))
    x0, y0 = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    view = image.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((width, height), Image.BICUBIC)
    view = _shift(view, rng.randint(-MAX_SHIFT, MAX_SHIFT), rng.randint(-MAX_SHIFT, MAX_SHIFT))
    if flip and rng.random() < 0.5:
        view = ImageOps.mirror(view)
    return view


PHOTOMETRIC = (
    lambda im: im.filter(ImageFilter.GaussianBlur(0.8)),
    lambda im: im.filter(ImageFilter.MedianFilter(3)),
    ImageOps.autocontrast,
    ImageOps.equalize,
)


def load_rgb(image):
    """A PIL image in RGB, or a list of them for a multi-image input (views are made from the decoded images the
    processor saw)."""
    if isinstance(image, (list, tuple)):
        return [load_rgb(im) for im in image]
    return image if getattr(image, "mode", None) == "RGB" else image.convert("RGB")


def _random_view(image: Image.Image, rng: random.Random, transforms: str, flip: bool) -> Image.Image:
    view = geometric_view(image, rng, flip)
    if transforms == "photometric":
        view = rng.choice(PHOTOMETRIC)(view)
    return view


def make_views(image, count: int, seed: int, transforms: str, flip: bool) -> list:
    """``count`` views of an RGB ``image``: the image itself, then ``count - 1`` random transforms (reproducible from
    ``seed``). For a multi-image input (a list of images) each view is a list holding one transform of every image,
    each image drawn its own transform."""
    if transforms not in VIEW_TRANSFORMS:
        raise ValueError(f"--view-transforms must be one of {', '.join(VIEW_TRANSFORMS)}; got {transforms!r}")
    rng = random.Random(seed)
    views = [image]
    for _ in range(count - 1):
        if isinstance(image, (list, tuple)):
            views.append([_random_view(im, rng, transforms, flip) for im in image])
        else:
            views.append(_random_view(image, rng, transforms, flip))
    return views
