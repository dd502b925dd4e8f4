"""Run guards: a NaN/Inf step guard and a label-free collapse detector for transductive adaptation.

Non-finite steps. The update recipe (``update.py``) calls these helpers explicitly: before its first optimizer step
it takes a ``Snapshot`` (``models/lora.py``) of the LoRA weights and optimizer state (only when a step is about to
happen, so a group without signal costs nothing); ``nonfinite_reason`` checks the loss and gradients before each
step and ``all_finite`` the weights after it. On any NaN/Inf the snapshot is restored, so the LoRA weights are
bit-identical to before the update, and the step is reported as skipped with the reason. The run continues with
the next step.

Collapse. The paper reports that long adaptation can collapse a model to one answer for every input (one dataset
fell from 0.84 to 0.25). Without labels the symptom is still visible in the answers themselves: across the set, the
inputs' majority answers stop being diverse. At every check (once per epoch by default) the loop samples every
input once with the current LoRA weights (N rollouts, no update) and ``CollapseGuard`` computes, from those answers,

- ``dominant_share``: the fraction of inputs whose majority answer is the most common majority answer;
- ``majority_entropy``: the entropy (nats) of the inputs' majority answers;
- ``answer_entropy``: the mean per-input answer entropy (how unsure each input's samples are);
- ``score`` = H(pooled answers) - mean per-input H: the mutual information between input and answer, high when
  answers differ across inputs and agree within one (the information-maximisation criterion of label-free
  adaptation methods such as SHOT). It is 0 when every input gets the same answer distribution.

It fires when, over at least ``collapse_min_inputs`` inputs with a readable answer, ``dominant_share`` reaches
``collapse_share`` and ``majority_entropy`` has fallen to ``collapse_drop`` times its value before adaptation or
less. Comparing with the start keeps a set whose inputs already agreed (say, all cats) from looking like a collapse:
when the majority answers had no diversity to begin with, the guard cannot tell and never fires. On firing the run
stops and rolls back to the snapshot with the best score (the start of the run counts as one, scored by the answers
given before adaptation).

Why a sampling pass of its own: the answers sampled by the training steps come from weights that changed during the
epoch, so statistics built from them lag the weights; in a test where the model collapsed after one step, the best
score by those lagging answers belonged to already-collapsed weights and the rollback restored collapsed LoRA weights.
Scoring each snapshot by answers sampled from exactly those weights costs one sampling pass over the set per check
(about half the cost of an epoch, which also samples and then trains) and makes the rollback target right.

Deviation: unreadable rollouts are left out of these statistics (an input whose rollouts are all unreadable is
left out of the check), so a model whose outputs turn to unreadable text is not caught by this guard.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..io.answers import NO_ANSWER, answer_distribution
from ..models.lora import Snapshot, restore_snapshot, take_snapshot

NONFINITE_LOSS = "non-finite loss"
NONFINITE_GRADIENT = "non-finite gradient"
NONFINITE_WEIGHTS = "non-finite weights after the step"


def all_finite(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Every given tensor (None entries ignored) holds only finite values."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def nonfinite_reason(loss: float, params: Sequence[torch.nn.Parameter]) -> str | None:
    """Why an optimizer step must not run after this backward (NaN/Inf loss or gradient), or None."""
    if not math.isfinite(loss):
        return NONFINITE_LOSS
    if not all_finite([p.grad for p in params]):
        return NONFINITE_GRADIENT
    return None


# ------------------------------------------------------------------------------------------------ collapse guard


def entropy(probabilities) -> float:
    """Shannon entropy in nats of a sequence of probabilities (zeros ignored)."""
    return max(0.0, -sum(p * math.log(p) for p in probabilities if p > 0))


def _valid(distribution: dict[str, float]) -> dict[str, float]:
    """The distribution over readable answers only, renormalised (empty when nothing was readable)."""
    valid = {a: p for a, p in distribution.items() if a != NO_ANSWER and p > 0}
    total = sum(valid.values())
    return {a: p / total for a, p in valid.items()} if total > 0 else {}


@dataclass
class DiversityCheck:
    """Label-free statistics of the answers over the set at one step (see the module docstring)."""

    step: int
    inputs: int
    dominant_answer: str | None
    dominant_share: float
    majority_entropy: float
    answer_entropy: float
    score: float
    collapsed: bool = False


def diversity(distributions: Sequence[dict[str, float]], step: int) -> DiversityCheck:
    """The statistics of one answer distribution per input (answer -> fraction, as ``answer_distribution``)."""
    valid = [d for d in (_valid(d) for d in distributions) if d]
    if not valid:
        return DiversityCheck(step, 0, None, 0.0, 0.0, 0.0, 0.0)
    majorities = Counter(min(d, key=lambda a: (-d[a], a)) for d in valid)
    dominant, count = min(majorities.items(), key=lambda kv: (-kv[1], kv[0]))
    pooled: Counter = Counter()
    for d in valid:
        pooled.update({a: p / len(valid) for a, p in d.items()})
    per_input = sum(entropy(d.values()) for d in valid) / len(valid)
    return DiversityCheck(
        step=step,
        inputs=len(valid),
        dominant_answer=dominant,
        dominant_share=count / len(valid),
        majority_entropy=entropy(c / len(valid) for c in majorities.values()),
        answer_entropy=per_input,
        score=max(0.0, entropy(pooled.values()) - per_input),
    )


class CollapseGuard:
    """Tracks answer diversity over a transductive run, keeps the best snapshot, and detects collapse.

    ``before`` holds each input's answer distribution before adaptation; ``start`` the LoRA weights' snapshot then.
    """

    def __init__(self, config, before: Sequence[dict[str, float]], start: Snapshot | None):
        self.config = config
        self.initial = diversity(before, 0)
        self.history = [self.initial]
        self.best_step = 0
        self.best_score = self.initial.score
        self.best = start
        self.collapse: dict | None = None

    def due(self, step: int, steps_per_epoch: int) -> bool:
        every = self.config.collapse_check_every or steps_per_epoch
        return step % every == 0

    def check(self, step: int, answers: Sequence[Sequence[str | None]], model, optimizer) -> DiversityCheck:
        """The statistics of ``answers`` (one list of sampled answers per input, from the current LoRA weights); keep
        a snapshot of the LoRA weights if they are the best so far; ``collapsed`` says whether to stop."""
        current = diversity([answer_distribution(list(a)) for a in answers], step)
        current.collapsed = self._collapsed(current)
        self.history.append(current)
        if self.config.collapse_guard and current.score > self.best_score and not current.collapsed:
            self.best_step, self.best_score = step, current.score
            self.best = take_snapshot(model, optimizer)
        return current

    def _collapsed(self, current: DiversityCheck) -> bool:
        cfg = self.config
        return (
            cfg.collapse_guard
            and current.inputs >= cfg.collapse_min_inputs
            and current.dominant_share >= cfg.collapse_share
            and self.initial.majority_entropy > 0
            and current.majority_entropy <= cfg.collapse_drop * self.initial.majority_entropy
        )

    def roll_back(self, step: int, model, optimizer) -> None:
        """Restore the best snapshot and record the collapse (called after ``check`` said collapsed)."""
        current = self.history[-1]
        if self.best is not None:
            restore_snapshot(model, optimizer, self.best)
        self.collapse = {
            "step": step,
            "dominant_answer": current.dominant_answer,
            "dominant_share": current.dominant_share,
            "majority_entropy": current.majority_entropy,
            "initial_majority_entropy": self.initial.majority_entropy,
            "rolled_back_to_step": self.best_step,
        }

    # -------------------------------------------------------------- state for checkpoints (JSON-able + a snapshot)

    def state(self) -> dict:
        return {
            "history": [asdict(c) for c in self.history],
            "best_step": self.best_step,
            "best_score": self.best_score,
            "collapse": self.collapse,
        }

    def load_state(self, state: dict, best: Snapshot | None) -> None:
        self.history = [DiversityCheck(**c) for c in state["history"]]
        self.initial = self.history[0]
        self.best_step, self.best_score = int(state["best_step"]), float(state["best_score"])
        self.collapse = state["collapse"]
        self.best = best

    def report(self) -> dict:
        return {"collapse": self.collapse, "diversity": [asdict(c) for c in self.history]}
