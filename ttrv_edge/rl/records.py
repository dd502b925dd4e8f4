"""What the adaptation loop works on and reports: prepared inputs, predictions, per-step records, item results.

``ItemResult.to_dict`` is the JSON the CLI prints and checkpoints store; ``from_dict`` reads it back on resume.
Seeds are derived per (phase, item, step) from the run's seed (``item_seed``), so a run is reproducible and a
resumed run replays the same draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..io.answers import Question, majority_answer

__all__ = [
    "ItemResult",
    "Prediction",
    "PreparedItem",
    "Progress",
    "StepRecord",
    "UpdateOutcome",
    "consensus_of",
    "item_seed",
]

Progress = Callable[[int], None]
"""Called with the number of work units just finished (one unit = one sampling round)."""


@dataclass
class Prediction:
    """An answer to one input: greedy decoding, and the distribution of N sampled answers."""

    answer: str | None
    distribution: dict[str, float]
    majority: str | None
    text: str


@dataclass
class StepRecord:
    """One sampling round. ``mean_reward`` and ``loss`` are None when it stopped on consensus before rewarding."""

    step: int
    mean_reward: float | None
    consensus: float
    loss: float | None
    seconds: float
    updated: bool
    answer_entropy: float
    skipped: str | None = None  # why the update was undone (e.g. "non-finite loss"); None when it ran or had no signal
    logprob_gap: float | None = None  # max |log-prob under the sampler - under the training forward|, before the update


@dataclass
class UpdateOutcome:
    """What one ``update`` did: the loss (None when skipped or without signal), the mean reward, each group's answer
    entropy, why it was undone (if it was) and the sampler-vs-training log-prob gap of the tokens it trained on."""

    loss: float | None
    mean_reward: float
    answer_entropies: list[float]
    skipped: str | None = None
    logprob_gap: float | None = None

    def record(self, step: int, consensus: float, seconds: float) -> StepRecord:
        return StepRecord(
            step=step,
            mean_reward=self.mean_reward,
            consensus=consensus,
            loss=self.loss,
            seconds=seconds,
            updated=self.loss is not None,
            answer_entropy=sum(self.answer_entropies) / len(self.answer_entropies),
            skipped=self.skipped,
            logprob_gap=self.logprob_gap,
        )


@dataclass
class ItemResult:
    image: str
    question: str
    choices: list[str] | None
    before: Prediction
    after: Prediction | None = None
    steps: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ItemResult:
        """Inverse of ``to_dict`` (used to resume a checkpointed run)."""
        after = data.get("after")
        return cls(
            image=data["image"],
            question=data["question"],
            choices=data["choices"],
            before=Prediction(**data["before"]),
            after=Prediction(**after) if after is not None else None,
            steps=[StepRecord(**s) for s in data["steps"]],
        )


@dataclass
class PreparedItem:
    """An input ready for the model: its image already encoded by the processor (and kept, for views)."""

    label: str
    question: Question
    inputs: dict
    image: Any = None  # the RGB PIL image, from which views are made


def item_seed(seed: int, *parts: int) -> int:
    """A per-(phase, item, step) seed derived from the run's seed, stable across runs and platforms."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


def consensus_of(answers: Sequence[str | None]) -> float:
    """Fraction of rollouts that gave the majority answer (0 when none is valid)."""
    majority = majority_answer(list(answers))
    return 0.0 if majority is None else sum(a == majority for a in answers) / len(answers)
