"""Property tests (hypothesis) of answer extraction and of the image loader.

Example counts are small and the runs derandomized (a fixed search, so CI is stable); raise ``max_examples``
locally to search harder.
"""

from __future__ import annotations

import io
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ttrv_edge.io.answers import LETTERS, Question, extract_choice, extract_label, extract_number
from ttrv_edge.io.images import load_image

FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
ASCII = string.ascii_letters + string.digits + string.punctuation + " \n\t"

words = st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8)
options = st.lists(words, min_size=2, max_size=6, unique=True)
prose = st.text(alphabet=ASCII, max_size=60)


# ------------------------------------------------------------------------------------------------ answer extraction


@FAST
@given(text=st.text(max_size=80), opts=options, kind=st.sampled_from(["choice", "label", "number", "free"]))
def test_extraction_never_raises_and_answers_stay_in_range(text, opts, kind):
    question = Question(
        "Which?",
        choices=tuple(opts) if kind == "choice" else None,
        labels=tuple(opts) if kind == "label" else None,
        numeric=kind == "number",
    )
    answer = question.extract(text)
    assert answer is None or isinstance(answer, str)
    if answer is not None and kind == "choice":
        assert answer in LETTERS[: len(opts)]
    if answer is not None and kind == "label":
        assert answer in opts
    if answer is not None and kind == "number":
        float(answer)


@FAST
@given(
    opts=options,
    pick=st.integers(min_value=0, max_value=5),
    before=prose.filter(lambda t: "answer" not in t.lower()),
    after=prose,
    template=st.sampled_from(
        ["The answer is ({}).", "the answer is {}", "Answer: {}", "ANSWER IS ( {} )", "answer:{}"]
    ),
    lower=st.booleans(),
)
def test_the_answer_is_x_is_always_found(opts, pick, before, after, template, lower):
    letter = LETTERS[pick % len(opts)]
    text = f"{before} {template.format(letter.lower() if lower else letter)} {after}"
    assert extract_choice(text, tuple(opts)) == letter


@FAST
@given(
    opts=options,
    pick=st.integers(min_value=0, max_value=5),
    wrap=st.sampled_from(["{}", "({})", "{}.", "({}).", " {} "]),
)
def test_a_bare_letter_is_read_in_either_case(opts, pick, wrap):
    letter = LETTERS[pick % len(opts)]
    assert extract_choice(wrap.format(letter), tuple(opts)) == letter
    assert extract_choice(wrap.format(letter.lower()), tuple(opts)) == letter


@FAST
@given(labels=options, pick=st.integers(min_value=0, max_value=5), before=st.lists(words, max_size=4), data=st.data())
def test_label_extraction_ignores_case_and_punctuation(labels, pick, before, data):
    label = labels[pick % len(labels)]
    filler = [w for w in before if all(w != x for x in labels)]  # other words, none of them a label
    text = " ".join([*filler, label])
    expected = extract_label(text, tuple(labels))
    assert expected is not None  # the label is in the text
    punctuation = data.draw(st.sampled_from([", ", "! ", " (", ") ", "... ", " - "]))
    variants = [text.upper(), text.title(), punctuation.join(text.split(" ")) + "!", f'"{text}."']
    assert all(extract_label(v, tuple(labels)) == expected for v in variants)


UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
UNITS = (UNITS + "seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def _words(n: int) -> str:
    if n < 20:
        return UNITS[n]
    tens, unit = divmod(n, 10)
    return TENS[tens - 2] + (f"-{UNITS[unit]}" if unit else "")


@FAST
@given(
    n=st.integers(min_value=-(10**9), max_value=10**9),
    commas=st.booleans(),
    lead=st.sampled_from(["", "The answer is "]),
)
def test_numbers_are_read_in_canonical_form(n, commas, lead):
    written = f"{n:,}" if commas else str(n)
    assert extract_number(f"{lead}{written}.") == str(n)
    assert extract_number(f"{lead}{n}.5 apples") == repr(n + 0.5 if n >= 0 else n - 0.5)


@FAST
@given(n=st.integers(min_value=0, max_value=99), upper=st.booleans())
def test_number_words_are_read(n, upper):
    word = _words(n)
    assert extract_number(f"There are {word.upper() if upper else word} of them") == str(n)


# ------------------------------------------------------------------------------------------------ image loader

SHAPES = st.sampled_from(["hw", "hw1", "hw3", "hw4"])
DTYPES = st.sampled_from(["uint8", "uint16", "bool", "float32", "float64", "int16"])


@st.composite
def arrays(draw):
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    shape = {"hw": (h, w), "hw1": (h, w, 1), "hw3": (h, w, 3), "hw4": (h, w, 4)}[draw(SHAPES)]
    dtype = draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("float"):
        return rng.random(shape).astype(dtype)
    high = {"uint8": 256, "uint16": 65536, "int16": 256}[dtype]
    return rng.integers(0, high, shape).astype(dtype)


@FAST
@given(array=arrays())
def test_any_small_array_loads_to_rgb_of_the_same_size(array):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (array.shape[1], array.shape[0])
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        assert np.array_equal(np.asarray(image), array)
    if array.dtype == np.uint8 and array.ndim == 2:
        assert np.array_equal(np.asarray(image)[..., 1], array)


FORMATS = {"PNG": "png", "BMP": "bmp", "TIFF": "tif", "GIF": "gif", "WEBP": "webp", "JPEG": "jpg"}
MODES = {"PNG": "L LA RGB RGBA P I;16 1", "BMP": "L RGB P 1", "TIFF": "L RGB RGBA CMYK I;16 F", "GIF": "L P RGB"}
MODES.update(WEBP="RGB RGBA", JPEG="L RGB CMYK")


@st.composite
def encoded_images(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(MODES[fmt].split()))
    w, h = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(
        "RGB" if mode in ("I;16", "F") else mode
    )
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    if mode == "F":
        image = Image.fromarray(rng.random((h, w)).astype(np.float32))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return FORMATS[fmt], (w, h), buffer.getvalue()


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@FAST
@given(case=encoded_images())
def test_any_small_encoded_image_loads_to_rgb_of_the_same_size(scratch, case):
    suffix, size, data = case
    path = scratch / f"image.{suffix}"
    path.write_bytes(data)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == size


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF\x00\x00\x00\x00WEBPVP8 "]


@settings(FAST, max_examples=60)
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=300))
def test_random_bytes_raise_only_value_errors(scratch, magic, body):
    path = scratch / "noise.jpg"
    path.write_bytes(magic + body)
    try:
        image = load_image(path)
    except ValueError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert image.mode == "RGB"


@settings(FAST, max_examples=60)
@given(case=encoded_images(), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=8))
def test_corrupted_images_raise_only_value_errors(scratch, case, flips):
    """Valid files with a few bytes changed or cut: the decoders' deeper paths, not just the header check."""
    suffix, _, data = case
    data = bytearray(data)
    for position, value in flips:
        data[position % len(data)] ^= value
    path = scratch / f"mutant.{suffix}"
    path.write_bytes(bytes(data[: max(1, len(data) - flips[0][0] % 64)] if flips else data))
    try:
        image = load_image(path)
    except ValueError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert image.mode == "RGB"
