"""Questions, prompts and answer extraction.

TTRV's reward needs an answer that can be compared across rollouts. Three kinds are supported, as in the paper's
recognition and VQA tasks: multiple choice (canonical answer: the choice letter), a label set (canonical answer:
the label as given), and numbers (canonical answer: the number in shortest decimal form). A question with none
of these is answered in free text, normalised (lower case, no punctuation, single spaces); that makes rewards
possible for short-answer VQA but is far noisier, which the paper avoids by using extractable answers.
``option_text`` and ``describe_answer`` turn a choice letter back into its option for people ("C (blue)").

Extraction is deliberately forgiving (case, punctuation, "The answer is (B)", the choice or label spelled out,
trailing text) and returns None when a rollout cannot be read as an answer: such rollouts get no frequency reward
(docs/method.md, section 3). ``parse_options`` and ``read_labels`` read the options of the command line.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_uppercase
_UNITS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen"
).split()
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
NUMBER_WORDS = {**{w: i for i, w in enumerate(_UNITS)}, **_TENS}
_NUMBER_WORD = re.compile(
    rf"\b(?:({'|'.join(_TENS)})(?:[- ]({'|'.join(_UNITS[1:10])}))?|({'|'.join(_UNITS)}))\b", re.IGNORECASE
)
NO_ANSWER = "<none>"
"""Key of unparseable rollouts in answer distributions (no normalised answer can contain "<")."""
DEFAULT_QUESTION = "What is shown in the image?"
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)?\s*:?\s*\(?\s*([A-Za-z])\s*\)?(?![A-Za-z])", re.IGNORECASE)
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])[).:,]")
_LEADING_WORD_LETTER = re.compile(r"^\s*([A-Z])\s")
_BARE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?[.!]?\s*$")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Question:
    """A question about an image and the kind of answer expected from it.

    Give ``choices`` for multiple choice, ``labels`` for a label set, ``numeric=True`` for a number; at most one.
    """

    text: str = DEFAULT_QUESTION
    choices: tuple[str, ...] | None = None
    labels: tuple[str, ...] | None = None
    numeric: bool = False

    def __post_init__(self) -> None:
        if not self.text or not self.text.strip():
            raise ValueError("--question must not be empty")
        if sum([self.choices is not None, self.labels is not None, self.numeric]) > 1:
            raise ValueError("give at most one of --choices, --labels and a numeric question")
        if self.choices is not None:
            _check_options("--choices", self.choices, limit=len(LETTERS))
        if self.labels is not None:
            _check_options("--labels", self.labels, limit=None)

    @property
    def kind(self) -> str:
        if self.choices is not None:
            return "choice"
        if self.labels is not None:
            return "label"
        return "number" if self.numeric else "free"

    def prompt(self) -> str:
        """The user turn's text (the image is placed before it by the chat template)."""
        if self.choices is not None:
            lines = [f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices)]
            return "\n".join([self.text, *lines, "Answer with the option's letter from the given choices directly."])
        if self.labels is not None:
            return f"{self.text}\nAnswer with one of: {', '.join(self.labels)}."
        if self.numeric:
            return f"{self.text}\nAnswer with a single number."
        return f"{self.text}\nAnswer with a single word or phrase."

    def extract(self, text: str) -> str | None:
        """The canonical answer read from a rollout's text, or None when it holds no recognisable answer."""
        if self.choices is not None:
            return extract_choice(text, self.choices)
        if self.labels is not None:
            return extract_label(text, self.labels)
        if self.numeric:
            return extract_number(text)
        return normalise(text) or None

    def display(self, answer: str | None) -> str | None:
        """A human-readable form of a canonical answer ("B" -> "B. dog")."""
        if answer is None or self.choices is None:
            return answer
        return f"{answer}. {self.choices[LETTERS.index(answer)]}"


def option_text(answer: str | None, choices) -> str | None:
    """The text behind an answer: the chosen option for a choice letter ("C" -> "blue"); labels, numbers and free text
    are their own text; None (nothing readable) stays None."""
    if answer is None or not choices or len(answer) != 1 or answer not in LETTERS[: len(choices)]:
        return answer
    return choices[LETTERS.index(answer)]


def describe_answer(answer: str | None, choices) -> str:
    """An answer for people: "C (blue)" for a choice letter, the answer itself otherwise, "no answer" for None."""
    if answer is None:
        return "no answer"
    text = option_text(answer, choices)
    return answer if text == answer else f"{answer} ({text})"


def _check_options(flag: str, options: tuple[str, ...], limit: int | None) -> None:
    if len(options) < 2:
        raise ValueError(f"{flag} needs at least two entries, got {len(options)}")
    if limit is not None and len(options) > limit:
        raise ValueError(f"{flag} supports at most {limit} entries, got {len(options)}")
    cleaned = [normalise(o) for o in options]
    if any(not c for c in cleaned):
        raise ValueError(f"{flag} has an empty entry")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"{flag} has duplicate entries: {', '.join(options)}")


def parse_options(value: str | None, flag: str) -> tuple[str, ...] | None:
    """Split a comma-separated option list ("cat, dog,bird") into stripped entries."""
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(","))


def read_labels(path: Path | None) -> tuple[str, ...] | None:
    """The class labels of a text file, one per line, blank lines skipped (``--labels``); None stays None."""
    if path is None:
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--labels: cannot read {path} ({error.__class__.__name__})") from None
    return tuple(line.strip() for line in lines if line.strip())


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed; the first line only."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    table = str.maketrans({c: " " for c in string.punctuation})
    return " ".join(first.lower().translate(table).split())


def extract_choice(text: str, choices: tuple[str, ...]) -> str | None:
    """The letter of the chosen option: from "The answer is (B)", "B", "(b)", "B. dog", or "dog" spelled out."""
    valid = LETTERS[: len(choices)]
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()
    for pattern in (_BARE_LETTER, _LEADING_LETTER):
        match = pattern.match(text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    spelled = _spelled_out(normalise(text), choices)
    if spelled is not None:
        return LETTERS[spelled]
    match = _LEADING_WORD_LETTER.match(text)  # "B because ..."; after the spelled-out check, as "A dog" is English
    return match.group(1) if match and match.group(1) in valid else None


def extract_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label named in the text; when several are, the one named first (longest wins at equal position)."""
    index = _spelled_out(normalise(text), labels)
    return None if index is None else labels[index]


def _spelled_out(clean: str, options: tuple[str, ...]) -> int | None:
    best: tuple[int, int, int] | None = None  # (position, -length, index)
    for index, option in enumerate(options):
        needle = normalise(option)
        match = re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", clean)
        if match:
            key = (match.start(), -len(needle), index)
            best = key if best is None or key < best else best
    return None if best is None else best[2]


def extract_number(text: str) -> str | None:
    """The first number in the text (digits, or words up to ninety-nine), in shortest decimal form."""
    candidates = []
    match = _NUMBER.search(text)
    if match:
        candidates.append((match.start(), match.group(0).replace(",", "").lstrip("+")))
    word = _NUMBER_WORD.search(text)
    if word:
        tens, units, small = (g.lower() if g else None for g in word.groups())
        value = NUMBER_WORDS[small] if small else _TENS[tens] + (NUMBER_WORDS[units] if units else 0)
        candidates.append((word.start(), str(value)))
    if not candidates:
        return None
    value = float(min(candidates)[1])
    return str(int(value)) if value.is_integer() else repr(value)


def answer_distribution(answers: list[str | None]) -> dict[str, float]:
    """Fraction of rollouts per answer, most frequent first; unparseable rollouts are counted under "<none>"."""
    counts: dict[str, int] = {}
    for answer in answers:
        key = NO_ANSWER if answer is None else answer
        counts[key] = counts.get(key, 0) + 1
    total = max(len(answers), 1)
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))}


def majority_answer(answers: list[str | None]) -> str | None:
    """The most frequent valid answer (ties: the first one seen), or None when no answer is valid."""
    counts: dict[str, int] = {}
    for answer in answers:
        if answer is not None:
            counts[answer] = counts.get(answer, 0) + 1
    return max(counts, key=counts.get) if counts else None
