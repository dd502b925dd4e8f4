"""The image loader against a corpus of bad and unusual inputs, all generated here (no binaries in the repo).

Every case either loads to an RGB image of the expected size (and colour, where that is the point), or raises a
one-line ValueError naming the file. ``CASES`` is the corpus; ``describe_corpus`` prints what each input got.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, JpegImagePlugin

from ttrv_edge.io import images
from ttrv_edge.io.answers import Question
from ttrv_edge.io.images import MAX_SIDE, display_name, load_image
from ttrv_edge.io.inputs import SkippedItem, collect_items, read_jsonl

RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ------------------------------------------------------------------------------------------------ builders


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: list[bytes] | None) -> bytes:
    """A PNG written by hand (so it may declare any size, depth or lie about its data). ``rows`` are unfiltered;
    None writes a zero image streamed through zlib without ever holding it in memory."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    if rows is None:
        channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
        row = b"\x00" * (1 + width * channels * bit_depth // 8)
        data = b"".join(compressor.compress(row) for _ in range(height))
    else:
        data = b"".join(compressor.compress(b"\x00" + r) for r in rows)
    data += compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def solid(color, size=(16, 16), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return image


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(halves(), "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif() -> bytes:
    frames = [solid(c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def gif_with_screen(width: int, height: int) -> bytes:
    """A valid 1x1 GIF whose logical screen (the size Pillow reports) is patched to ``width`` x ``height``."""
    data = bytearray(encoded(solid((255, 0, 0), (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to declare ``width`` x ``height``."""
    data = bytearray(encoded(solid((200, 10, 10)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def palette(transparent: bool) -> bytes:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    if transparent:
        return encoded(image, "GIF", transparency=1)
    return encoded(image, "PNG")


def png16_rgb() -> bytes:
    pixel = struct.pack(">HHH", 65535, 32896, 0)
    return png_bytes(4, 3, 16, 2, [pixel * 4] * 3)


def big_jpeg() -> bytes:
    return encoded(halves((4800, 3200)), "JPEG", quality=50)


def bad_exif_jpeg() -> bytes:
    return encoded(halves(), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7fgarbage")


def gray16() -> Image.Image:
    return Image.fromarray(np.full((6, 5), 32896, np.uint16))  # 32896 = 128 * 257


def rgba(alpha: int) -> Image.Image:
    return solid((255, 0, 0, alpha), mode="RGBA")


def float_image() -> Image.Image:
    return Image.fromarray(np.full((4, 4), 0.5, np.float32))


def bad_crc_png() -> bytes:
    data = bytearray(png_bytes(4, 4, 8, 2, [b"\x01" * 12] * 4))
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

# Each case: (id, file name, bytes or None for a special path, expectation). An expectation is ("ok", size, pixel
# checks {(x, y): rgb}) or ("error", words the message must contain).
CASES = [
    ("zero-byte", "empty.jpg", b"", ("error", "empty file")),
    ("truncated-jpeg", "cut.jpg", lambda: half(encoded(halves((64, 64)), "JPEG")), ("error", "truncated")),
    ("truncated-png", "cut.png", lambda: half(encoded(halves((64, 64)), "PNG")), ("error", "truncated")),
    ("png-bad-crc", "crc.png", bad_crc_png, ("error", "")),
    ("png-header-only", "header.png", lambda: png_bytes(4, 4, 8, 2, [b"\0" * 12] * 4)[:33], ("error", "")),
    ("text-as-jpeg", "notes.jpg", b"just some text, not an image\n", ("error", "not an image")),
    ("html-as-png", "page.png", b"<!doctype html><html><body>404</body></html>", ("error", "not an image")),
    ("tga-as-jpeg", "targa.jpg", lambda: encoded(solid(RED), "TGA"), ("error", "not an image, or its header")),
    ("truncated-webp", "cut.webp", lambda: half(encoded(halves((64, 64)), "WEBP")), ("error", "")),
    ("bmp-garbage", "junk.bmp", b"BM" + b"\xff" * 60, ("error", "")),
    ("tiff-truncated", "cut.tif", lambda: half(encoded(halves((64, 64)), "TIFF")), ("error", "")),
    ("gif-header-only", "head.gif", b"GIF89a\x10\x00\x10\x00\x00\x00\x00", ("error", "")),
    ("bomb-png-100k", "bomb.png", lambda: png_bytes(100_000, 100_000, 8, 2, []), ("error", "too many pixels")),
    ("bomb-png-64mp", "bomb64.png", lambda: png_bytes(8000, 8000, 8, 0, None), ("error", "decompression-bomb")),
    ("bomb-gif-screen", "bomb.gif", lambda: gif_with_screen(65535, 65535), ("error", "too many pixels")),
    ("bomb-gif-40mp", "bomb40.gif", lambda: gif_with_screen(8000, 5000), ("error", "decompression-bomb")),
    ("bomb-jpeg-sof", "bomb.jpg", lambda: jpeg_declaring(60000, 60000), ("error", "too many pixels")),
    ("one-pixel", "dot.png", lambda: encoded(solid(RED, (1, 1)), "PNG"), ("ok", (1, 1), {(0, 0): RED})),
    ("thin-1x1000", "line.png", lambda: encoded(solid(RED, (1, 1000)), "PNG"), ("ok", (10, 1000), {(4, 500): RED})),
    ("wide-3000x200", "wide.png", lambda: encoded(solid(BLUE, (3000, 200)), "PNG"), ("ok", (2048, 137), {})),
    ("large-jpeg-4800", "big.jpg", big_jpeg, ("ok", (2048, 1365), {(100, 600): RED, (1900, 600): BLUE})),
    ("cmyk-jpeg", "cmyk.jpg", lambda: encoded(solid((0, 255, 255, 0), mode="CMYK"), "JPEG"), ("ok", (16, 16), {})),
    ("palette-png", "pal.png", lambda: palette(False), ("ok", (8, 8), {(3, 3): (10, 200, 30)})),
    ("palette-transparent-gif", "palt.gif", lambda: palette(True), ("ok", (8, 8), {(3, 3): WHITE})),
    ("gray16-png", "g16.png", lambda: encoded(gray16(), "PNG"), ("ok", (5, 6), {(2, 2): (128, 128, 128)})),
    ("rgb16-png", "c16.png", png16_rgb, ("ok", (4, 3), {(0, 0): (255, 128, 0)})),
    ("rgba-transparent", "alpha.png", lambda: encoded(rgba(0), "PNG"), ("ok", (16, 16), {(2, 2): WHITE})),
    ("rgba-opaque", "opaque.png", lambda: encoded(rgba(255), "PNG"), ("ok", (16, 16), {(2, 2): RED})),
    ("la-png", "la.png", lambda: encoded(solid((0, 0), mode="LA"), "PNG"), ("ok", (16, 16), {(2, 2): WHITE})),
    ("bilevel-png", "one.png", lambda: encoded(solid(1, mode="1"), "PNG"), ("ok", (16, 16), {(2, 2): WHITE})),
    ("float-tiff", "f.tif", lambda: encoded(float_image(), "TIFF"), ("ok", (4, 4), {(1, 1): (128, 128, 128)})),
    ("animated-gif", "anim.gif", animated_gif, ("ok", (16, 16), {(8, 8): RED})),
    ("exif-rotate-6", "rot6.jpg", lambda: exif_jpeg(6), ("ok", (20, 40), {(10, 5): RED, (10, 35): BLUE})),
    ("exif-rotate-3", "rot3.jpg", lambda: exif_jpeg(3), ("ok", (40, 20), {(5, 10): BLUE, (35, 10): RED})),
    ("exif-garbage", "badexif.jpg", bad_exif_jpeg, ("ok", (40, 20), {(5, 10): RED})),
    ("unicode-name", "données 日本 🐱.png", lambda: encoded(solid(RED), "PNG"), ("ok", (16, 16), {(1, 1): RED})),
    ("unicode-name-bad", "ошибка 🐱.jpg", b"nope", ("error", "not an image")),
    ("newline-in-name", "two\nlines.jpg", b"nope", ("error", "two\\nlines.jpg")),
    ("non-utf8-name", os.fsdecode(b"bytes\xff.png"), lambda: encoded(solid(RED), "PNG"), ("ok", (16, 16), {})),
    ("non-utf8-name-bad", os.fsdecode(b"bytes\xfe.jpg"), b"", ("error", "bytes\\xfe.jpg")),
]


SPECIAL_IDS = ["missing", "directory-as-jpeg", "fifo-as-jpeg", "dangling-symlink", "symlink-loop"]


def _special_paths(folder: Path) -> list[tuple[str, Path, tuple]]:
    """Paths that are not plain files: missing, a folder, a FIFO, a dangling symlink, a symlink loop."""
    cases = [("missing", folder / "nowhere.jpg", ("error", "no such file"))]
    (folder / "dir.jpg").mkdir()
    cases.append(("directory-as-jpeg", folder / "dir.jpg", ("error", "not a regular file")))
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.jpg")
        cases.append(("fifo-as-jpeg", folder / "pipe.jpg", ("error", "not a regular file")))
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    cases.append(("dangling-symlink", folder / "dangling.jpg", ("error", "broken symbolic link")))
    (folder / "loop_a.jpg").symlink_to(folder / "loop_b.jpg")
    (folder / "loop_b.jpg").symlink_to(folder / "loop_a.jpg")
    cases.append(("symlink-loop", folder / "loop_a.jpg", ("error", "broken symbolic link")))
    return cases


def build_corpus(folder: Path) -> list[tuple[str, Path, tuple]]:
    out = []
    for cid, name, data, expected in CASES:
        path = folder / name
        path.write_bytes(data() if callable(data) else data)
        out.append((cid, path, expected))
    return out + _special_paths(folder)


def outcome(path: Path) -> str:
    """What loading ``path`` gives, as one line (for the corpus table)."""
    try:
        image = load_image(path)
    except ValueError as error:
        return f"ValueError: {error}"
    return f"RGB {image.size[0]}x{image.size[1]}"


def describe_corpus(folder: Path) -> list[tuple[str, str]]:
    return [(cid, outcome(path)) for cid, path, _ in build_corpus(folder)]


# ------------------------------------------------------------------------------------------------ the corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def _ids(cases):
    return [c[0] for c in cases]


@pytest.mark.parametrize("index", range(len(CASES) + 5), ids=_ids(CASES) + SPECIAL_IDS)
def test_corpus_case(corpus, index):
    if index >= len(corpus):
        pytest.skip("no FIFO support on this platform")
    cid, path, expected = corpus[index]
    if expected[0] == "error":
        with pytest.raises(ValueError) as raised:
            load_image(path)
        message = str(raised.value)
        assert "\n" not in message, message
        assert message.startswith(display_name(path)), message
        assert expected[1] in message, message
    else:
        _, size, pixels = expected
        image = load_image(path)
        assert image.mode == "RGB" and image.size == size
        for xy, rgb in pixels.items():
            assert np.abs(np.subtract(image.getpixel(xy), rgb)).max() <= 12, (cid, xy, image.getpixel(xy))


def test_bomb_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(8000, 8000, 8, 0, None))  # 64 MP of zeros in 80 kB
    assert path.stat().st_size < 200_000
    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or original(self))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="8000x8000 pixels, more than the limit"):
        load_image(path)
    assert loads == [] and time.perf_counter() - start < 1.0
    # the limit is a parameter: with a higher one the same file decodes (the guard, not the file, refused it)
    assert load_image(path, max_pixels=8000 * 8000).size == (MAX_SIDE, MAX_SIDE)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    path.write_bytes(big_jpeg())
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: drafts.append(size) or original(self, mode, size),
    )
    image = load_image(path)
    assert image.size == (2048, 1365) and drafts and drafts[0][0] <= MAX_SIDE


def test_unreadable_file_permission(tmp_path):
    if RUNNING_AS_ROOT:
        pytest.skip("running as root: chmod 000 does not stop root from reading; see the simulated case below")
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(solid(RED), "PNG"))
    path.chmod(0)
    try:
        with pytest.raises(ValueError, match="secret.png: permission denied"):
            load_image(path)
    finally:
        path.chmod(0o600)


def test_unreadable_file_permission_simulated(tmp_path, monkeypatch):
    """The same failure, simulated for root (where chmod 000 does not block reads): open raises PermissionError."""
    path = tmp_path / "secret.png"
    path.write_bytes(encoded(solid(RED), "PNG"))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", denied, raising=False)
    with pytest.raises(ValueError, match=r"secret\.png: permission denied$"):
        load_image(path)


# ------------------------------------------------------------------------------------------------ in-memory inputs


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((0, 4, 3), np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.full((4, 4), 2.0), r"\[0, 1\]"),
        (np.full((4, 4), 300, np.int32), "0..255"),
        (np.zeros((4, 4), np.complex64), "dtype"),
    ],
)
def test_bad_arrays_raise_value_errors(array, message):
    with pytest.raises(ValueError, match=message):
        load_image(array)


def test_array_alpha_is_composited_like_files():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    assert load_image(rgba).getpixel((1, 1)) == WHITE
    rgba[..., 3] = 255
    assert load_image(rgba).getpixel((1, 1)) == RED


# ------------------------------------------------------------------------------------------------ folders and JSONL


def test_folder_skips_symlinks_leaving_the_folder(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(encoded(solid(RED), "PNG"))
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "good.png").write_bytes(encoded(solid(RED), "PNG"))
    (folder / "escape.png").symlink_to(outside)
    skipped: list[SkippedItem] = []
    mode, items = collect_items(folder, Question(), skipped)
    assert mode == "transductive" and [Path(i.image).name for i in items] == ["good.png"]
    assert len(skipped) == 1 and "outside the data root" in skipped[0].reason and "escape.png" in skipped[0].reason
    _, allowed = collect_items(folder, Question(), [], allow_outside_root=True)
    assert len(allowed) == 2


def test_jsonl_confines_images_to_its_folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(encoded(solid(RED), "PNG"))
    secret = tmp_path / "secret.png"
    secret.write_bytes(encoded(solid(RED), "PNG"))
    (root / "link.png").symlink_to(secret)
    lines = [
        {"image": "sub/ok.png"},
        {"image": str(root / "sub" / "ok.png")},  # absolute, but inside the root: allowed
        {"image": "../secret.png"},
        {"image": str(secret)},
        {"image": "sub/../../secret.png"},
        {"image": "link.png"},
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    skipped: list[SkippedItem] = []
    items = read_jsonl(data, Question(), skipped)
    assert len(items) == 2
    assert [s.image for s in skipped] == [f"{data}:{n}" for n in (3, 4, 5, 6)]
    assert all("outside the data root" in s.reason and "--allow-outside-root" in s.reason for s in skipped)
    with pytest.raises(ValueError, match=r"data.jsonl:3: .*outside the data root"):
        read_jsonl(data, Question())  # without a skipped list, the first bad line raises
    assert len(read_jsonl(data, Question(), [], allow_outside_root=True)) == 6


def test_jsonl_bad_lines_are_reported_with_their_line_number(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        b'{"image": "a.png"}\n'
        b"not json\n"
        b'{"question": "no image"}\n'
        b'["a list"]\n'
        b'{"image": "b.png", "choices": "only-one"}\n'
        b'{"image": "c.png", "choices": 5}\n'
        b'{"image": "d\\u0000.png"}\n'
        b'{"image": "\xff\xfe.png"}\n'
        b"\n"
        b'{"image": "e.png", "question": 3}\n'
    )
    skipped: list[SkippedItem] = []
    items = read_jsonl(data, Question(), skipped)
    assert [Path(i.image).name for i in items] == ["a.png"]
    reasons = {s.image.rsplit(":", 1)[1]: s.reason for s in skipped}
    assert set(reasons) == {"2", "3", "4", "5", "6", "7", "8", "10"}
    assert "invalid JSON" in reasons["2"] and '"image"' in reasons["3"] and "at least two" in reasons["5"]
    assert "NUL" in reasons["7"] and "UTF-8" in reasons["8"] and '"question"' in reasons["10"]
    assert all("\n" not in r and r.startswith(f"{data}:") for r in reasons.values())


# ------------------------------------------------------------------------------------------------ the CLI

CLI_ARGS = ["--rollouts", "2", "--epochs", "1", "--max-new-tokens", "2", "--seed", "0", "--json"]
BAD_FILES = {
    "empty.jpg": lambda: b"",
    "cut.png": lambda: half(encoded(halves((64, 64)), "PNG")),
    "notes.jpg": lambda: b"just text",
    "bomb.png": lambda: png_bytes(8000, 8000, 8, 0, None),
}


def _cli(capsys, *argv):
    from ttrv_edge.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(BAD_FILES) + ["missing.jpg"])
def test_cli_single_bad_image_is_one_line_and_exit_2(capsys, tmp_path, tiny_idefics3_dir, name):
    path = tmp_path / name
    if name in BAD_FILES:
        path.write_bytes(BAD_FILES[name]())
    code, out, err = _cli(capsys, "adapt", path, "--model", tiny_idefics3_dir, "--out", tmp_path / "o", *CLI_ARGS)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_cli_folder_skips_bad_images_and_processes_the_rest(capsys, tmp_path, tiny_idefics3_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(encoded(halves((32, 32)), "PNG" if name.endswith("png") else "JPEG"))
    for name, data in BAD_FILES.items():
        (folder / name).write_bytes(data())
    os.mkfifo(folder / "pipe.jpg")  # must be skipped, not block the run
    code, out, err = _cli(capsys, "adapt", folder, "--model", tiny_idefics3_dir, "--out", tmp_path / "o", *CLI_ARGS)
    assert code == 0, err
    report = json.loads(out)
    assert [Path(i["image"]).name for i in report["items"]] == ["a.png", "b.jpg"]
    skipped = {Path(s["image"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(BAD_FILES) | {"pipe.jpg"}
    assert all(reason.startswith(str(folder / name)) for name, reason in skipped.items())
    assert "decompression-bomb" in skipped["bomb.png"] and "not a regular file" in skipped["pipe.jpg"]
    stderr_lines = [line for line in err.splitlines() if line.startswith("skipped: ")]
    assert len(stderr_lines) == 5 and "Traceback" not in err


def test_cli_jsonl_reports_bad_lines_and_images(capsys, tmp_path, tiny_idefics3_dir):
    root = tmp_path / "data"
    root.mkdir()
    (root / "ok.png").write_bytes(encoded(halves((32, 32)), "PNG"))
    (root / "empty.jpg").write_bytes(b"")
    (tmp_path / "outside.png").write_bytes(encoded(halves((32, 32)), "PNG"))
    data = root / "set.jsonl"
    data.write_text('{"image": "ok.png"}\n{"image": "empty.jpg"}\n{"image": "../outside.png"}\n{broken\n')
    code, out, err = _cli(capsys, "adapt", data, "--model", tiny_idefics3_dir, "--out", tmp_path / "o", *CLI_ARGS)
    assert code == 0, err
    report = json.loads(out)
    assert [Path(i["image"]).name for i in report["items"]] == ["ok.png"]
    reasons = [s["reason"] for s in report["skipped"]]
    assert len(reasons) == 3
    assert any("outside the data root" in r for r in reasons) and any("invalid JSON" in r for r in reasons)
    assert any(r.startswith(f"{root / 'empty.jpg'}: empty file") for r in reasons)


def test_cli_folder_of_only_bad_images_is_an_error(capsys, tmp_path, tiny_idefics3_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"")
    code, out, err = _cli(capsys, "adapt", folder, "--model", tiny_idefics3_dir, "--out", tmp_path / "o", *CLI_ARGS)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "x.jpg: empty file" in err
