"""Image corruptions for the shift benchmark, each at severities 1 (mild) to 5 (severe).

None of them is used in training (``train.py`` draws clean scenes only), so every condition is a distribution shift
the demo model never saw. They follow ImageNet-C in spirit, with parameters set for 64 px synthetic scenes:

- ``gaussian_noise``: additive pixel noise, sigma 0.06..0.32 of the range;
- ``blur``: Gaussian blur, radius 0.6..2.6 px;
- ``contrast``: contrast scaled to 0.45..0.10 of its value around the image mean;
- ``hue``: hue rotated by 20..100 degrees. This one changes the colour itself: the colour question's key stays the
  drawn colour, so no method can recover it beyond chance when the rotation maps one palette colour to another;
  the shape and count questions keep their answers;
- ``jpeg``: JPEG compression at quality 20..3;
- ``pixelate``: downsampled to 0.5..0.2 of the size (box filter), upsampled with nearest neighbour;
- ``sketch``: coloured edges only (PIL's FIND_EDGES), blended with the image at 0.6..1.0 edges (5 = edges only);
- ``invert``: solarization with a threshold of 200..0 (pixels brighter than it are inverted; 5 = full inversion).

All corruptions are deterministic (noise uses a numpy Generator seeded from ``seed``), keep the image size and
return RGB images.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt"]

SEVERITIES = (1, 2, 3, 4, 5)
_PARAMS = {
    "gaussian_noise": (0.06, 0.10, 0.16, 0.23, 0.32),
    "blur": (0.6, 1.0, 1.5, 2.0, 2.6),
    "contrast": (0.45, 0.32, 0.22, 0.15, 0.10),
    "hue": (20, 35, 50, 70, 100),
    "jpeg": (20, 12, 8, 5, 3),
    "pixelate": (0.5, 0.4, 0.32, 0.25, 0.2),
    "sketch": (0.6, 0.7, 0.8, 0.9, 1.0),
    "invert": (200, 160, 120, 64, 0),
}


def _noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.asarray(image, dtype=np.float32) / 255.0
    noisy = np.clip(array + rng.normal(0.0, sigma, array.shape), 0.0, 1.0)
    return Image.fromarray((noisy * 255.0 + 0.5).astype(np.uint8))


def _blur(image: Image.Image, radius: float, seed: int) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def _contrast(image: Image.Image, factor: float, seed: int) -> Image.Image:
    return ImageEnhance.Contrast(image).enhance(factor)


def _hue(image: Image.Image, degrees: float, seed: int) -> Image.Image:
    h, s, v = image.convert("HSV").split()
    shift = round(degrees / 360.0 * 256) % 256
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _jpeg(image: Image.Image, quality: int, seed: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _pixelate(image: Image.Image, fraction: float, seed: int) -> Image.Image:
    w, h = image.size
    small = image.resize((max(1, round(w * fraction)), max(1, round(h * fraction))), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


def _sketch(image: Image.Image, weight: float, seed: int) -> Image.Image:
    edges = image.filter(ImageFilter.FIND_EDGES)
    edges = ImageEnhance.Brightness(edges).enhance(2.0)
    return Image.blend(image, edges, weight)


def _invert(image: Image.Image, threshold: int, seed: int) -> Image.Image:
    if threshold <= 0:
        return ImageOps.invert(image)
    return ImageOps.solarize(image, threshold=threshold)


_FUNCTIONS = {
    "gaussian_noise": _noise,
    "blur": _blur,
    "contrast": _contrast,
    "hue": _hue,
    "jpeg": _jpeg,
    "pixelate": _pixelate,
    "sketch": _sketch,
    "invert": _invert,
}
CORRUPTIONS = tuple(_FUNCTIONS)


def corrupt(image: Image.Image, name: str, severity: int = 3, seed: int = 0) -> Image.Image:
    """``image`` under corruption ``name`` at ``severity`` (1-5); "clean" (or severity 0) returns a copy."""
    if name == "clean" or severity == 0:
        return image.convert("RGB").copy()
    if name not in _FUNCTIONS:
        raise ValueError(f"--corruption: unknown corruption {name!r} (choose from clean, {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"--severity: must be one of 0-5, got {severity!r}")
    out = _FUNCTIONS[name](image.convert("RGB"), _PARAMS[name][severity - 1], seed)
    return out.convert("RGB")
