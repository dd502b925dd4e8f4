"""Label-free statistics of what a model says across a set of inputs, for the collapse guard (``guards.py``).

At each check every checked input is sampled N times with the current LoRA weights. ``observe`` turns one input's
rollouts into an ``Observation``:

- ``answers``: what each rollout said. For a multiple-choice question this is the chosen option's text, not its
  letter: with shuffled choices a model that says "red" to every image gives varied letters, and the letters then
  look diverse while the model says the same thing everywhere (issue 15: letter diversity stayed at 0.26-0.32 while
  every image got "red green red green ..."). Other questions: the canonical answer; None when unreadable;
- ``texts``: the rollouts' normalised output texts (``answers.normalise``: lower case, no punctuation), unreadable
  ones included, so that a model that writes the same text for every image is visible even when that text holds no
  answer;
- ``ended``: whether each rollout ended with an end-of-sequence token. A rollout that runs to ``max_new_tokens``
  without ending is degenerate (the collapsed runs of issue 15 wrote "green square ( D one ( D one" until cut).

``diversity`` summarises one check (``DiversityCheck``). Inputs are compared with the inputs that ask the same
question (same question text): in a mixed set (shape, colour and count questions) a model that answers "four" to
every count question has collapsed there, although "four" among the shape and colour answers looks diverse over the
whole set (measured on the demo benchmark, gaussian noise at lr 5e-3: the count questions' answers went from 0.44 of
them sharing one answer to 1.00 within one pass, while the whole set's share only went from 0.42 to 0.68).
Questions asked of fewer than ``min_group`` checked inputs are pooled into one group (a set with one question per
image is then compared as a whole). Per question group (``groups``), and for the set with each group weighted by its
share of the readable inputs:

- ``dominant_share``: the fraction of inputs whose majority answer is their group's most common majority answer;
- ``majority_entropy``: the entropy (nats) of the inputs' majority answers within their group (for the set:
  H(majority answer | question));
- ``answer_entropy`` (set only): the mean per-input answer entropy (how unsure each input's samples are);
- ``score`` (set only): the entropy of the pooled answers within a question, H(answer | question) over all readable
  samples: how varied the answers to a question are across its inputs. The guard rolls back to the check with the
  best score (``guards.py``);
- ``information`` (set only): the mutual information between input and answer within a question, H(pooled) - mean
  per-input H (the information-maximisation criterion of SHOT-style label-free adaptation): high when answers differ
  across inputs and agree within one, 0 when every input of a question gets the same answer distribution. Reported,
  not used for the rollback: it rises whenever the model grows surer, and ranked sharpened, already damaged checks
  above the start on the demo benchmark (``guards.py``);
- ``text_share`` and ``text_entropy``: the same two statistics of the inputs' majority output texts;
- ``ended`` (set only): the fraction of all rollouts that ended with EOS.

Unreadable rollouts are left out of the answer statistics (an input whose rollouts are all unreadable is left out of
them); the text and EOS statistics count every rollout.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..io.answers import LETTERS, NO_ANSWER, Question, answer_distribution, normalise

__all__ = [
    "POOLED",
    "DiversityCheck",
    "Observation",
    "Spread",
    "diversity",
    "ended_flags",
    "entropy",
    "observe",
    "question_groups",
    "spread",
]

TEXT_REPORT_CHARS = 60
"""The dominant text is reported up to this many characters."""


def entropy(probabilities) -> float:
    """Shannon entropy in nats of a sequence of probabilities (zeros ignored)."""
    return max(0.0, -sum(p * math.log(p) for p in probabilities if p > 0))


@dataclass
class Observation:
    """What one input's N rollouts said at one check (see the module docstring)."""

    question: str
    answers: list[str | None]
    texts: list[str]
    ended: list[bool]


def said(question: Question, answer: str | None) -> str | None:
    """What an extracted answer says: the option's normalised text for a choice letter, else the answer itself."""
    if answer is None or question.choices is None:
        return answer
    index = LETTERS.find(answer) if len(answer) == 1 else -1
    return normalise(question.choices[index]) if 0 <= index < len(question.choices) else answer


def ended_flags(completion_ids, completion_mask, eos_ids: Sequence[int]) -> list[bool]:
    """For each rollout row: did it end with one of ``eos_ids``? The mask covers the tokens up to and including the
    first EOS, so a row ended when its last covered token is an EOS; a row without one ran to the token limit."""
    eos = {int(i) for i in eos_ids}
    lengths = completion_mask.sum(-1).long().tolist()
    return [n > 0 and int(row[n - 1]) in eos for row, n in zip(completion_ids, lengths)]


def observe(question: Question, texts: Sequence[str], answers: Sequence[str | None], ended: Sequence[bool]):
    """The ``Observation`` of one input: its rollouts' texts, extracted answers (``question.extract``) and EOS flags."""
    return Observation(
        question=question.text,
        answers=[said(question, a) for a in answers],
        texts=[normalise(t) for t in texts],
        ended=[bool(e) for e in ended],
    )


@dataclass
class Spread:
    """How one kind of output (answers, or texts) spreads over the inputs: per group, and weighted over groups."""

    inputs: int = 0
    dominant: str | None = None
    share: float = 0.0
    majority_entropy: float = 0.0
    mean_entropy: float = 0.0
    pooled_entropy: float = 0.0
    information: float = 0.0
    groups: dict[str, Spread] = field(default_factory=dict)


def _valid(distribution: dict[str, float]) -> dict[str, float]:
    """The distribution over readable answers only, renormalised (empty when nothing was readable)."""
    valid = {a: p for a, p in distribution.items() if a != NO_ANSWER and p > 0}
    total = sum(valid.values())
    return {a: p / total for a, p in valid.items()} if total > 0 else {}


def _top(counts: dict) -> str:
    """The most frequent key; ties go to the smallest key (deterministic)."""
    return min(counts, key=lambda k: (-counts[k], k))


def _one_group(found: list[dict[str, float]]) -> Spread:
    majorities = Counter(_top(d) for d in found)
    dominant = _top(majorities)
    pooled: Counter = Counter()
    for d in found:
        pooled.update({a: p / len(found) for a, p in d.items()})
    per_input = sum(entropy(d.values()) for d in found) / len(found)
    return Spread(
        inputs=len(found),
        dominant=dominant,
        share=majorities[dominant] / len(found),
        majority_entropy=entropy(c / len(found) for c in majorities.values()),
        mean_entropy=per_input,
        pooled_entropy=entropy(pooled.values()),
        information=max(0.0, entropy(pooled.values()) - per_input),
    )


def spread(distributions: Sequence[dict[str, float]], groups: Sequence[str]) -> Spread:
    """The statistics of one distribution per input (value -> fraction; "<none>" and empty ones are left out), each
    input compared with the inputs of its group; the set's statistics weight each group by its readable inputs."""
    members: dict[str, list[dict[str, float]]] = defaultdict(list)
    for group, distribution in zip(groups, distributions):
        valid = _valid(distribution)
        if valid:
            members[group].append(valid)
    n = sum(len(found) for found in members.values())
    if n == 0:
        return Spread()
    result = Spread(inputs=n, groups={g: _one_group(found) for g, found in sorted(members.items())})
    overall: Counter = Counter()
    for group, found in members.items():
        stats, weight = result.groups[group], len(found) / n
        overall.update(_top(d) for d in found)
        result.share += weight * stats.share
        for name in ("majority_entropy", "mean_entropy", "pooled_entropy", "information"):
            setattr(result, name, getattr(result, name) + weight * getattr(stats, name))
    result.dominant = _top(overall)
    return result


POOLED = "(questions asked of fewer inputs)"
"""The group of the inputs whose question fewer than ``min_group`` checked inputs ask (when there are several)."""


def question_groups(questions: Sequence[str], min_group: int) -> list[str]:
    """Each input's group: its question, or ``POOLED`` when fewer than ``min_group`` inputs ask it (a set with one
    question per image is compared as a whole). Depends on the checked inputs only, so it is the same at every check."""
    counts = Counter(questions)
    small = {q for q, c in counts.items() if c < min_group}
    return [POOLED if q in small and len(small) > 1 else q for q in questions]


@dataclass
class DiversityCheck:
    """Label-free statistics of the set at one check (see the module docstring). ``groups`` holds, per question,
    the statistics the per-question signals compare; ``signals`` are the collapse signals that fired
    (``guards.py``; empty when the check looked healthy) and ``questions`` the questions they fired on."""

    step: int
    inputs: int
    readable: int
    dominant_answer: str | None
    dominant_share: float
    majority_entropy: float
    answer_entropy: float
    score: float
    information: float
    dominant_text: str | None
    text_share: float
    text_entropy: float
    ended: float
    groups: dict[str, dict] = field(default_factory=dict)
    signals: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    collapsed: bool = False


def _short(text: str | None) -> str | None:
    return None if text is None else text[:TEXT_REPORT_CHARS]


def diversity(observations: Sequence[Observation], step: int, min_group: int = 1) -> DiversityCheck:
    """The statistics of one check's observations (one per checked input); questions asked of fewer than
    ``min_group`` inputs are pooled into one group."""
    groups = question_groups([o.question for o in observations], min_group)
    answers = spread([answer_distribution(list(o.answers)) for o in observations], groups)
    texts = spread([answer_distribution(list(o.texts)) for o in observations], groups)
    rollouts = sum(len(o.ended) for o in observations)
    per_group = {}
    for group in sorted(set(groups)):
        said, wrote = answers.groups.get(group, Spread()), texts.groups.get(group, Spread())
        per_group[group] = {
            "inputs": groups.count(group),
            "readable": said.inputs,
            "dominant_answer": said.dominant,
            "dominant_share": said.share,
            "majority_entropy": said.majority_entropy,
            "dominant_text": _short(wrote.dominant),
            "text_share": wrote.share,
            "text_entropy": wrote.majority_entropy,
        }
    return DiversityCheck(
        step=step,
        inputs=len(observations),
        readable=answers.inputs,
        dominant_answer=answers.dominant,
        dominant_share=answers.share,
        majority_entropy=answers.majority_entropy,
        answer_entropy=answers.mean_entropy,
        score=answers.pooled_entropy,
        information=answers.information,
        dominant_text=_short(texts.dominant),
        text_share=texts.share,
        text_entropy=texts.majority_entropy,
        ended=sum(sum(o.ended) for o in observations) / rollouts if rollouts else 0.0,
        groups=per_group,
    )
