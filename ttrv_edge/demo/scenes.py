"""Synthetic scenes for the demo model: 1-4 coloured shapes on a varied background, with multiple-choice questions.

A scene is fully determined by its seed (``make_scene(seed)``): the same seed gives the same pixels and the same
question on every platform (Python's ``random.Random`` and PIL drawing only, no numpy RNG). Three question kinds,
as in the issue: the shape of the largest object, its colour, how many objects there are. Each has four choices.

Design choices, and why:

- Every shape is drawn with the area of a circle of its radius, and the largest object's radius is at least 1.3x
  every other one (area 1.69x), so "the largest" is never ambiguous; objects never overlap, so the count is
  always visible.
- Shapes are drawn at 2x and downsampled (anti-aliased edges, like a photo, and less aliasing under blur).
- Backgrounds are low-saturation (grey, tinted, a vertical or horizontal gradient, or faint stripes), so that every
  object colour stays distinct from the background in clean images.
- The model's target answer is a short text, "<colour> <shape> (<letter>)" for the shape and colour questions and
  "<number> (<letter>)" for counting. The decisive words come before the letter: ``answers.extract_choice`` reads
  the spelled-out option before a trailing letter, and for the shape question the sampled colour word comes first,
  so the majority answer over samples can differ from the greedy one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..io.answers import LETTERS, Question

__all__ = [
    "COLOURS",
    "COUNT_WORDS",
    "KINDS",
    "SHAPES",
    "Scene",
    "SceneObject",
    "draw_scene",
    "make_scene",
    "render",
    "scene_words",
]

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
}
COUNT_WORDS = ("one", "two", "three", "four")
KINDS = ("shape", "colour", "count")
QUESTION_TEXT = {
    "shape": "What shape is the largest object?",
    "colour": "What colour is the largest object?",
    "count": "How many objects are there?",
}
IMAGE_SIZE = 64
_SCALE = 2  # supersampling factor of the drawing
_LARGEST_RATIO = 1.3  # radius ratio of the largest object to every other one


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """One image's content and its question. ``answer`` is the correct letter of ``choices``."""

    seed: int
    objects: tuple[SceneObject, ...]
    background: tuple
    kind: str
    choices: tuple[str, ...]
    answer: str

    @property
    def largest(self) -> SceneObject:
        return max(self.objects, key=lambda o: o.radius)

    @property
    def question(self) -> Question:
        return Question(QUESTION_TEXT[self.kind], choices=self.choices)

    @property
    def answer_word(self) -> str:
        return self.choices[LETTERS.index(self.answer)]

    @property
    def target(self) -> str:
        """The text the demo model is trained to answer (see the module docstring)."""
        if self.kind == "count":
            return f"{self.answer_word} ({self.answer})"
        big = self.largest
        return f"{big.colour} {big.shape} ({self.answer})"

    def image(self) -> Image.Image:
        return render(self)


def scene_words() -> list[str]:
    """Every word the scenes' prompts and answers use (for the demo tokenizer's vocabulary)."""
    words = list(SHAPES) + list(COLOURS) + list(COUNT_WORDS)
    for text in QUESTION_TEXT.values():
        words += text.replace("?", " ?").split()
    words += Question("x", choices=("a", "b")).prompt().replace(".", " .").replace("'", " ' ").split()
    return sorted(set(words))


def _sizes(rng: random.Random, count: int) -> list[float]:
    """Radii (in pixels of the 64 px image) with one clear largest object."""
    big = rng.uniform(9.5, 14.0) if count <= 2 else rng.uniform(8.5, 11.5)
    limit = big / _LARGEST_RATIO
    others = [rng.uniform(4.5, max(4.6, limit)) for _ in range(count - 1)]
    return [big] + others


def _extent(shape: str) -> float:
    """How far the outline of ``shape`` reaches from its centre, in units of its circle-equivalent radius."""
    if shape == "circle":
        return 1.0
    return max(math.hypot(x, y) for x, y in _polygon(shape, 0.0, 0.0, 1.0))


def _place(rng: random.Random, reach: list[float]) -> list[tuple[float, float]] | None:
    centres: list[tuple[float, float]] = []
    for r in reach:
        for _ in range(60):
            x, y = rng.uniform(r + 1, IMAGE_SIZE - r - 1), rng.uniform(r + 1, IMAGE_SIZE - r - 1)
            if all(math.hypot(x - cx, y - cy) > r + reach[i] + 1.5 for i, (cx, cy) in enumerate(centres)):
                centres.append((x, y))
                break
        else:
            return None
    return centres


def _background(rng: random.Random) -> tuple:
    base = rng.randint(60, 200)
    tint = [max(0, min(255, base + rng.randint(-18, 18))) for _ in range(3)]
    style = rng.choice(("flat", "vgrad", "hgrad", "stripes"))
    shift = rng.choice((-1, 1)) * rng.randint(25, 55)
    other = [max(0, min(255, c + shift)) for c in tint]
    return (style, tuple(tint), tuple(other))


def _choices(rng: random.Random, correct: str, pool: tuple[str, ...], shuffle: bool) -> tuple[tuple[str, ...], str]:
    distractors = rng.sample([w for w in pool if w != correct], 3)
    options = [correct] + distractors
    if shuffle:
        rng.shuffle(options)
    else:
        options.sort(key=pool.index)
    return tuple(options), LETTERS[options.index(correct)]


def make_scene(seed: int, kind: str | None = None, shuffle: bool = True) -> Scene:
    """The scene of ``seed``: objects, background and a question (``kind`` forced, or drawn from the seed).

    ``shuffle=False`` lists the choices in the canonical order of their pool (a training curriculum aid).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = random.Random(f"ttrv-scene-{seed}")
    while True:
        count = rng.randint(1, 4)
        radii = _sizes(rng, count)
        shapes = [rng.choice(SHAPES) for _ in radii]
        centres = _place(rng, [r * _extent(s) for r, s in zip(radii, shapes)])
        if centres is not None:
            break
    colours = [rng.choice(list(COLOURS)) for _ in radii]
    objects = tuple(SceneObject(s, c, x, y, r) for s, c, (x, y), r in zip(shapes, colours, centres, radii))
    background = _background(rng)
    kind = kind or rng.choice(KINDS)
    big = max(objects, key=lambda o: o.radius)
    pool, correct = {
        "shape": (SHAPES, big.shape),
        "colour": (tuple(COLOURS), big.colour),
        "count": (COUNT_WORDS, COUNT_WORDS[count - 1]),
    }[kind]
    choices, answer = _choices(rng, correct, pool, shuffle)
    return Scene(seed, objects, background, kind, choices, answer)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The outline of ``shape`` centred at (cx, cy), scaled to the area of a circle of radius ``r``."""
    points = _outline(shape, 0.0, 0.0, 1.0)
    scale = r * math.sqrt(math.pi / _area(points))
    return [(cx + x * scale, cy + y * scale) for x, y in points]


def _area(points) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1]))) / 2


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(n, radius, phase):
        return [
            (cx + radius * math.cos(phase + 2 * math.pi * k / n), cy + radius * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if shape == "square":
        return ring(4, r * 1.05, math.pi / 4)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":
        return ring(3, r * 1.1, -math.pi / 2)
    if shape == "star":
        outer, inner = ring(5, r * 1.1, -math.pi / 2), ring(5, r * 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = r * 0.95, r * 0.33
        pts = [
            (-b, -a),
            (b, -a),
            (b, -b),
            (a, -b),
            (a, b),
            (b, b),
            (b, a),
            (-b, a),
            (-b, b),
            (-a, b),
            (-a, -b),
            (-b, -b),
        ]
        return [(cx + x, cy + y) for x, y in pts]
    raise ValueError(f"shape: unknown shape {shape!r}")


def _draw_background(draw: ImageDraw.ImageDraw, background: tuple, size: int) -> None:
    style, first, second = background
    if style == "flat":
        draw.rectangle((0, 0, size, size), fill=first)
        return
    if style == "stripes":
        draw.rectangle((0, 0, size, size), fill=first)
        step = size // 8
        for y in range(0, size, 2 * step):
            draw.rectangle((0, y, size, y + step - 1), fill=tuple((a * 3 + b) // 4 for a, b in zip(first, second)))
        return
    for i in range(size):
        t = i / (size - 1)
        colour = tuple(round(a + (b - a) * t) for a, b in zip(first, second))
        box = (0, i, size, i) if style == "vgrad" else (i, 0, i, size)
        draw.line(box, fill=colour)


def draw_scene(objects, background, size: int = IMAGE_SIZE) -> Image.Image:
    """Render objects on a background into a ``size`` x ``size`` RGB image (drawn at 2x, then downsampled)."""
    big = size * _SCALE
    scale = big / IMAGE_SIZE
    image = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(image)
    _draw_background(draw, background, big)
    for obj in objects:
        cx, cy, r = obj.cx * scale, obj.cy * scale, obj.radius * scale
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The RGB image of ``scene``."""
    return draw_scene(scene.objects, scene.background, size)
