"""Turning user inputs into images and work items: one image, a folder of images, or a JSONL file.

Every failure is a ``ValueError`` whose one-line message names the offending file (or JSONL line), so the CLI can
print it without a traceback and the folder/JSONL modes can report and skip one bad item.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .answers import Question, parse_options

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Item:
    """One unlabeled input: where its image comes from and the question asked about it."""

    image: str  # a path, or a short description for in-memory images
    question: Question


def load_image(source) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a numpy array (HxW, HxWx3 or HxWx4; uint8 or floats in [0, 1])."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, Path)):
        return _open_path(Path(source))
    raise ValueError(f"image: expected a path, PIL image or numpy array, got {type(source).__name__}")


def _open_path(path: Path) -> Image.Image:
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    try:
        with Image.open(path) as image:
            image.seek(0)  # animated images: the first frame
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: image too large ({error})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file PIL can read") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{path}: unreadable image ({error})") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        return _from_array(array / max(array.max(), 1.0))
    return image.convert("RGB")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image: array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("image: array contains NaN or infinite values")
    if array.dtype != np.uint8:
        if array.min() < 0 or array.max() > 1:
            raise ValueError("image: float arrays must hold values in [0, 1]")
        array = np.round(array * 255).astype(np.uint8)
    return _to_rgb(Image.fromarray(array[..., :3] if array.shape[-1] == 4 else array))


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def read_jsonl(path: Path, default: Question) -> list[Item]:
    """Items of a JSONL file of {"image", "question", "choices"} objects; relative images resolve against its folder.

    ``choices`` may be a list or a comma-separated string; missing fields fall back to ``default``.
    """
    items = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                raise ValueError(f'{where}: each line must be an object with an "image" path')
            image = Path(record["image"])
            image = image if image.is_absolute() else path.parent / image
            items.append(Item(image=str(image), question=_record_question(record, default, where)))
    if not items:
        raise ValueError(f"{path}: no items in this JSONL file")
    return items


def _record_question(record: dict, default: Question, where: str) -> Question:
    choices = record.get("choices", default.choices)
    if isinstance(choices, str):
        choices = parse_options(choices, "choices")
    labels = record.get("labels", default.labels)
    try:
        return Question(
            text=record.get("question", default.text),
            choices=tuple(str(c) for c in choices) if choices is not None else None,
            labels=tuple(str(c) for c in labels) if labels is not None and choices is None else None,
            numeric=bool(record.get("numeric", default.numeric)) and choices is None and labels is None,
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def collect_items(path: Path, default: Question) -> tuple[str, list[Item]]:
    """("episodic", [one item]) for an image file, ("transductive", items) for a folder or a JSONL file."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if path.is_dir():
        return "transductive", [Item(image=str(p), question=default) for p in image_files(path)]
    if path.suffix.lower() == ".jsonl":
        return "transductive", read_jsonl(path, default)
    return "episodic", [Item(image=str(path), question=default)]
