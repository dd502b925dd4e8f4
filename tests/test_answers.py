"""Answer extraction and prompt building: the reward is only as good as what is read from a rollout."""

import pytest

from ttrv_edge.io.answers import (
    NO_ANSWER,
    Question,
    answer_distribution,
    extract_choice,
    extract_label,
    extract_number,
    majority_answer,
    normalise,
    parse_options,
)

CHOICES = ("cat", "dog", "bird", "fish")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("b", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("The answer is (B).", "B"),
        ("the answer is c, because it has wings", "C"),
        ("Answer: A", "A"),
        ("B. dog", "B"),
        ("A dog, clearly.", "B"),  # "A" followed by a space is the article here: the spelled-out choice wins
        ("It is a bird", "C"),
        ("DOG", "B"),
        ("fish fish", "D"),
        ("E", None),
        ("an elephant", None),
        ("", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, CHOICES) == expected


def test_leading_capital_letter_with_punctuation_is_the_choice():
    assert extract_choice("A) cat", CHOICES) == "A"
    assert extract_choice("C: the bird", CHOICES) == "C"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("golden retriever", "golden retriever"),
        ("It's a Golden Retriever!", "golden retriever"),
        ("retriever", "retriever"),
        ("a retriever, not a golden retriever", "retriever"),
        ("tabby", None),
    ],
)
def test_extract_label_prefers_first_then_longest(text, expected):
    assert extract_label(text, ("retriever", "golden retriever", "beagle")) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3", "3"),
        ("There are three objects.", "3"),
        ("3.0", "3"),
        ("1,024 items", "1024"),
        ("-2.5 degrees", "-2.5"),
        ("none", None),
        ("twenty-one", "21"),
        ("Forty two", "42"),
        ("seven or 8", "7"),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_normalise_lowercases_strips_punctuation_and_keeps_first_line():
    assert normalise("  The CAT!\nsecond line") == "the cat"


def test_question_prompt_lists_lettered_choices_and_extracts_letters():
    q = Question("What animal?", choices=CHOICES)
    assert "A. cat" in q.prompt() and "D. fish" in q.prompt()
    assert q.kind == "choice"
    assert q.extract("The answer is (D)") == "D"
    assert q.display("D") == "D. fish"


def test_free_text_question_normalises():
    q = Question("What is it?")
    assert q.kind == "free"
    assert q.extract("A Cat.") == "a cat"
    assert q.extract("...") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=" "), "--question"),
        (dict(choices=("cat",)), "--choices"),
        (dict(choices=("cat", "Cat")), "--choices"),
        (dict(choices=("cat", "")), "--choices"),
        (dict(labels=("a",)), "--labels"),
        (dict(choices=("a", "b"), labels=("c", "d")), "--choices"),
    ],
)
def test_bad_questions_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Question(**kwargs)


def test_parse_options_strips():
    assert parse_options(" cat, dog ,bird", "--choices") == ("cat", "dog", "bird")
    assert parse_options(None, "--choices") is None


def test_distribution_and_majority():
    answers = ["B", "A", "B", None]
    assert answer_distribution(answers) == {"B": 0.5, NO_ANSWER: 0.25, "A": 0.25}
    assert majority_answer(answers) == "B"
    assert majority_answer([None, None]) is None
