"""Work items from user inputs: one image, a folder of images, or a JSONL file of images and questions.

Every failure is a ``ValueError`` whose one-line message names the offending file (or JSONL line); with a
``skipped`` list, the folder/JSONL modes report and skip one bad item (``SkippedItem``) instead of raising.

Paths: a JSONL file's images resolve against its folder (the data root) and may not leave it, through ``..``, an
absolute path or a symlink, unless the caller allows it (``--allow-outside-root``); a folder's files likewise.
A JSONL line names one image (``"image"``) or several (``"images"``, a multi-image input, in order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .answers import Question, parse_options
from .images import IMAGE_SUFFIXES, MAX_IMAGES, display_name, image_label

__all__ = ["Item", "SkippedItem", "collect_items", "image_files", "inside_root", "read_jsonl"]


@dataclass(frozen=True)
class Item:
    """One unlabeled input: where its image comes from and the question asked about it."""

    image: str | tuple[str, ...]  # a path (a tuple of paths for a multi-image input), or a short description
    question: Question

    @property
    def label(self) -> str:
        """The input's name in results (``image_label``)."""
        return image_label(self.image)


@dataclass(frozen=True)
class SkippedItem:
    """An input of a folder or JSONL file that was left out, and why (one line)."""

    image: str
    reason: str

    def to_dict(self) -> dict:
        return {"image": self.image, "reason": self.reason}


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
    """Items of a JSONL file of {"image", "question", "choices"} objects ({"images": [...]} for a multi-image input);
    relative images resolve against its folder.

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
    if not isinstance(record, dict) or ("image" in record) == ("images" in record):
        raise ValueError(f'{where}: each line must be an object with an "image" path or an "images" list')
    if "images" in record:
        names = record["images"]
        if not isinstance(names, list) or not 1 <= len(names) <= MAX_IMAGES:
            raise ValueError(f'{where}: "images" must be a list of 1 to {MAX_IMAGES} image paths')
        images = tuple(_record_image(path, where, name, allow_outside_root) for name in names)
        return Item(image=images, question=_record_question(record, default, where))
    return Item(
        image=_record_image(path, where, record["image"], allow_outside_root),
        question=_record_question(record, default, where),
    )


def _record_image(path: Path, where: str, name, allow_outside_root: bool) -> str:
    """One image path of a JSONL line, resolved against the file's folder and kept inside it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: an image must be a non-empty path string, got {name!r:.40}")
    if "\x00" in name:
        raise ValueError(f"{where}: the image path contains a NUL byte")
    image = Path(name)
    image = image if image.is_absolute() else path.parent / image
    if not allow_outside_root and not inside_root(image, path.parent):
        raise ValueError(f"{where}: {_outside(image, path.parent)}")
    return str(image)


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
