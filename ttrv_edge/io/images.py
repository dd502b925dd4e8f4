"""Turning user inputs into images and work items: one image, a folder of images, or a JSONL file.

Every failure is a ``ValueError`` whose one-line message names the offending file (or JSONL line), so the CLI can
print it without a traceback and the folder/JSONL modes can report and skip one bad item (``SkippedItem``).

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
- Paths: a JSONL file's images resolve against its folder (the data root) and may not leave it, through ``..``, an
  absolute path or a symlink, unless the caller allows it (``--allow-outside-root``); a folder's files likewise.
  Only regular files are opened (a FIFO or device would block or never end).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .answers import Question, parse_options

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


@dataclass(frozen=True)
class Item:
    """One unlabeled input: where its image comes from and the question asked about it."""

    image: str  # a path, or a short description for in-memory images
    question: Question


@dataclass(frozen=True)
class SkippedItem:
    """An input of a folder or JSONL file that was left out, and why (one line)."""

    image: str
    reason: str

    def to_dict(self) -> dict:
        return {"image": self.image, "reason": self.reason}


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


def inside_root(path: Path, root: Path) -> bool:
    """Whether ``path``, with every symlink and ``..`` resolved, lies inside ``root`` (also resolved)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(root)))
    except (OSError, ValueError):
        return False


def _outside(path: Path, root: Path) -> str:
    return f"{display_name(path)}: outside the data root {display_name(root)} (pass --allow-outside-root to allow)"


def image_files(folder: Path, skipped: list[SkippedItem] | None = None, allow_outside_root: bool = False) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; symlinks leaving the folder are skipped (or raise)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:
        raise ValueError(f"{display_name(folder)}: cannot list this folder ({error.strerror})") from None
    files = []
    for entry in entries:
        if entry.suffix.lower() not in IMAGE_SUFFIXES or entry.is_dir():
            continue
        if not allow_outside_root and not inside_root(entry, folder):
            _skip_or_raise(skipped, SkippedItem(str(entry), _outside(entry, folder)))
            continue
        files.append(entry)
    if not files:
        raise ValueError(f"{display_name(folder)}: no usable image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _skip_or_raise(skipped: list[SkippedItem] | None, item: SkippedItem) -> None:
    if skipped is None:
        raise ValueError(item.reason)
    skipped.append(item)


def read_jsonl(
    path: Path, default: Question, skipped: list[SkippedItem] | None = None, allow_outside_root: bool = False
) -> list[Item]:
    """Items of a JSONL file of {"image", "question", "choices"} objects; relative images resolve against its folder.

    ``choices`` may be a list or a comma-separated string; missing fields fall back to ``default``. A bad line (not
    JSON, no image, an image outside the data root) raises, or is appended to ``skipped`` when a list is given.
    """
    items = []
    try:
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, start=1):
                where = f"{display_name(path)}:{number}"
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                    if line.strip():
                        items.append(_jsonl_item(path, where, line, default, allow_outside_root))
                except UnicodeDecodeError:
                    _skip_or_raise(skipped, SkippedItem(where, f"{where}: not UTF-8 text"))
                except ValueError as error:
                    _skip_or_raise(skipped, SkippedItem(where, str(error)))
    except OSError as error:
        raise ValueError(f"{display_name(path)}: cannot read this JSONL file ({error.strerror})") from None
    if not items:
        raise ValueError(f"{display_name(path)}: no usable items in this JSONL file")
    return items


def _jsonl_item(path: Path, where: str, line: str, default: Question, allow_outside_root: bool) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) or not record["image"]:
        raise ValueError(f'{where}: each line must be an object with an "image" path')
    if "\x00" in record["image"]:
        raise ValueError(f"{where}: the image path contains a NUL byte")
    image = Path(record["image"])
    image = image if image.is_absolute() else path.parent / image
    if not allow_outside_root and not inside_root(image, path.parent):
        raise ValueError(f"{where}: {_outside(image, path.parent)}")
    return Item(image=str(image), question=_record_question(record, default, where))


def _record_question(record: dict, default: Question, where: str) -> Question:
    try:
        choices = record.get("choices", default.choices)
        if isinstance(choices, str):
            choices = parse_options(choices, "choices")
        labels = record.get("labels", default.labels)
        for name, value in (("choices", choices), ("labels", labels)):
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f'"{name}" must be a list or a comma-separated string')
        text = record.get("question", default.text)
        if not isinstance(text, str):
            raise ValueError('"question" must be a string')
        return Question(
            text=text,
            choices=tuple(str(c) for c in choices) if choices is not None else None,
            labels=tuple(str(c) for c in labels) if labels is not None and choices is None else None,
            numeric=bool(record.get("numeric", default.numeric)) and choices is None and labels is None,
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def collect_items(
    path: Path, default: Question, skipped: list[SkippedItem] | None = None, allow_outside_root: bool = False
) -> tuple[str, list[Item]]:
    """("episodic", [one item]) for an image file, ("transductive", items) for a folder or a JSONL file.

    With a ``skipped`` list, bad folder entries and JSONL lines are recorded there instead of raising.
    """
    if not path.exists():
        raise ValueError(f"{display_name(path)}: no such file or folder")
    if path.is_dir():
        files = image_files(path, skipped, allow_outside_root)
        return "transductive", [Item(image=str(p), question=default) for p in files]
    if path.suffix.lower() == ".jsonl":
        return "transductive", read_jsonl(path, default, skipped, allow_outside_root)
    return "episodic", [Item(image=str(path), question=default)]
