"""Turning user inputs into RGB images: a path, a PIL image or an array, or a list of them (a multi-image input).

Every failure is a ``ValueError`` whose one-line message names the offending file, so the CLI can print it without
a traceback and the folder/JSONL modes (``io/inputs.py``) can report and skip one bad item.

Input policy (inputs come from users and datasets, so they are treated as untrusted):

- Only JPEG (with its multi-picture variant MPO), PNG, GIF, BMP, WebP and TIFF are decoded (``FORMATS``): Pillow's
  rarer plugins are the usual home of decoder bugs, and no VLM user needs them.
- Memory is bounded before decoding: the declared size is read from the header, JPEGs larger than needed are
  decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``), and an image that would still decode
  to more than ``MAX_PIXELS`` = 2**25 (33.5 MP, an 8K frame) is refused. That is 5x lower than Pillow's own bomb
  limit (179 MP, which it keeps enforcing first), because one RGBA decode of 179 MP is 0.7 GB before any copy, too
  much for the small devices this package targets; 33.5 MP bounds the decode near 0.25 GB and still accepts every
  phone photo (a 200 MP JPEG decodes at 1/8 scale).
- Size: images are downscaled so the longest side is at most ``MAX_SIDE`` = 2048 (small VLMs look at 384-1536
  pixels; anything bigger only costs memory in the processor), and an extremely thin image (aspect ratio above
  ``MAX_ASPECT`` = 100) is padded with white to that ratio, because Qwen2-VL's processor rejects ratios above 200.
  Small images (down to 1x1) are left alone: the processors upscale them.
- Colour: every mode becomes 8-bit RGB. Alpha (RGBA, LA, palette transparency) is composited on white; 16-bit
  images are scaled by 1/257 (not stretched to their own maximum, which would brighten a dark image); CMYK uses
  Pillow's conversion; animated images give their first frame; EXIF orientation is applied.
- Only regular files are opened (a FIFO or device would block or never end).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG includes MPO, the multi-picture JPEG of cameras
MAX_PIXELS = 2**25
MAX_SIDE = 2048
MAX_ASPECT = 100
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_RESIZABLE = ("RGB", "RGBA", "L", "LA", "CMYK", "I", "F")  # modes Pillow resizes with BICUBIC (alpha premultiplied)
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def display_name(path) -> str:
    """A path as one printable line: control characters and undecodable bytes in a name become escapes (a name
    with a newline must not split an error message, a lone surrogate must not crash the printing)."""
    return "".join(_printable(c) for c in str(path))


def _printable(char: str) -> str:
    if char.isprintable():
        return char
    if 0xDC80 <= ord(char) <= 0xDCFF:  # a byte that was not UTF-8, smuggled by os.fsdecode as a lone surrogate
        return f"\\x{ord(char) - 0xDC00:02x}"
    return repr(char)[1:-1]


def load_image(source, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a numpy array, under the input policy of the module docstring.

    Arrays may be HxW, HxWx1, HxWx3 or HxWx4, of uint8, uint16, bool, other integers within 0..255, or floats in
    [0, 1]. Raises ValueError (naming the file for paths) for anything it cannot turn into an image.
    """
    if isinstance(source, Image.Image):
        return _fit(_to_rgb(source), max_side)
    if isinstance(source, np.ndarray):
        return _fit(_from_array(source), max_side)
    if isinstance(source, (str, Path)):
        return _open_path(Path(source), max_pixels, max_side)
    raise ValueError(f"image: expected a path, PIL image or numpy array, got {type(source).__name__}")


MAX_IMAGES = 16
"""The most images one multi-image input may hold (each costs its image tokens in every rollout's prompt)."""


def load_images(source, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE):
    """``load_image`` of one source, or a list of RGB images for a list/tuple of sources (a multi-image input:
    1..``MAX_IMAGES`` images, kept in order)."""
    if not isinstance(source, (list, tuple)):
        return load_image(source, max_pixels=max_pixels, max_side=max_side)
    if not 1 <= len(source) <= MAX_IMAGES:
        raise ValueError(f"images: a multi-image input holds 1 to {MAX_IMAGES} images, got {len(source)}")
    return [load_image(one, max_pixels=max_pixels, max_side=max_side) for one in source]


def image_label(image) -> str:
    """How an input's image(s) appear in results: a path, or the paths of a multi-image input joined by " + "."""
    if isinstance(image, (list, tuple)):
        return " + ".join(str(one) for one in image)
    return str(image)


def _open_path(path: Path, max_pixels: int, max_side: int) -> Image.Image:
    name = display_name(path)
    try:
        if not path.exists():
            missing = "broken symbolic link (its target is missing or loops)" if path.is_symlink() else "no such file"
            raise ValueError(f"{name}: {missing}")
        if not path.is_file():
            raise ValueError(f"{name}: not a regular file")
        if path.stat().st_size == 0:
            raise ValueError(f"{name}: empty file (0 bytes)")
        with open(path, "rb") as handle:
            return _decode(handle, name, max_pixels, max_side)
    except PermissionError:
        raise ValueError(f"{name}: permission denied") from None
    except OSError as error:  # stat/open failures: ELOOP, ENAMETOOLONG, EIO, ...
        raise ValueError(f"{name}: cannot read ({error.strerror or error.__class__.__name__})") from None


def _decode(handle, name: str, max_pixels: int, max_side: int) -> Image.Image:
    """Decode an open file under the size limits. Malformed files make Pillow's decoders raise many exception types
    (OSError, SyntaxError, struct.error, zlib.error, IndexError, EOFError, ...), so every Exception becomes one
    ValueError naming the file; KeyboardInterrupt and SystemExit still pass. Pillow's warnings (corrupt EXIF, its
    own bomb warning, which our lower limit replaces) are silenced: they would print outside our one-line errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_pixels(handle, name, max_pixels, max_side)
    except ValueError as error:
        if str(error).startswith(name):
            raise
        raise ValueError(f"{name}: unreadable image ({_first_line(error)})") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: too many pixels, refused by Pillow's bomb guard ({_first_line(error)})") from None
    except UnidentifiedImageError:
        formats = ", ".join(FORMATS)
        raise ValueError(f"{name}: not an image, or its header is damaged (formats read: {formats})") from None
    except Exception as error:  # noqa: BLE001 - see the docstring
        raise ValueError(f"{name}: unreadable or truncated image ({_first_line(error)})") from None


def _read_pixels(handle, name: str, max_pixels: int, max_side: int) -> Image.Image:
    with Image.open(handle, formats=FORMATS) as image:
        declared = image.size
        if image.format in ("JPEG", "MPO") and max(declared) > max_side:
            scale = max_side / max(declared)  # decode at 1/2, 1/4 or 1/8 scale, still at least max_side
            image.draft(None, (max(1, int(declared[0] * scale)), max(1, int(declared[1] * scale))))
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"{name}: image declares {declared[0]}x{declared[1]} pixels, more than the limit of "
                f"{max_pixels} (decompression-bomb guard)"
            )
        orientation = _orientation(image)
        image.seek(0)  # animated images: the first frame
        image.load()
        # Downscale before converting where the mode allows it, so a big image is never copied at full size; the
        # result is always a new image (the file's image dies when the ``with`` closes it).
        small = _downscale(image, max_side) if image.mode in _RESIZABLE else image
        rgb = _fit(_to_rgb(small), max_side)
    transpose = _TRANSPOSE.get(orientation)
    return rgb.transpose(transpose) if transpose is not None else rgb


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = upright); a malformed EXIF block counts as upright rather than failing."""
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - EXIF is metadata; a broken block must not reject the pixels
        return 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else error.__class__.__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image.copy()
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image)
        if array.min() >= 0 and array.max() <= 65535:
            return _gray_to_rgb((array // 257).astype(np.uint8))
        return _gray_to_rgb(_stretch(array.astype(np.float64)))
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
        if array.min() >= 0 and array.max() <= 1:
            return _gray_to_rgb(np.round(array * 255).astype(np.uint8))
        return _gray_to_rgb(np.clip(np.round(array), 0, 255).astype(np.uint8))
    return image.convert("RGB")


def _stretch(array: np.ndarray) -> np.ndarray:
    low, high = float(array.min()), float(array.max())
    return np.round((array - low) / max(high - low, 1e-12) * 255).astype(np.uint8)


def _gray_to_rgb(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(np.stack([array] * 3, axis=-1)))


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[..., None].repeat(3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image: array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
    pixels = _as_uint8(array)
    if pixels.shape[-1] == 4:
        return _to_rgb(Image.fromarray(np.ascontiguousarray(pixels), mode="RGBA"))
    return Image.fromarray(np.ascontiguousarray(pixels))


def _as_uint8(array: np.ndarray) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array // 257).astype(np.uint8)
    if kind in "iu":
        if array.min() < 0 or array.max() > 255:
            raise ValueError("image: integer arrays other than uint16 must hold values in 0..255")
        return array.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("image: array contains NaN or infinite values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError("image: float arrays must hold values in [0, 1]")
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"image: unsupported array dtype {array.dtype}")


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    width, height = image.size
    if max(width, height) <= max_side:
        return image
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longest side is at most ``max_side``; pad thinner-than-1:MAX_ASPECT images with white."""
    image = _downscale(image, max_side)
    width, height = image.size
    if max(width, height) > MAX_ASPECT * min(width, height):
        padded = (max(width, -(-height // MAX_ASPECT)), max(height, -(-width // MAX_ASPECT)))
        canvas = Image.new("RGB", padded, (255, 255, 255))
        canvas.paste(image, ((padded[0] - width) // 2, (padded[1] - height) // 2))
        image = canvas
    return image


# ---------------------------------------------------------------------------------------------- folders and JSONL
