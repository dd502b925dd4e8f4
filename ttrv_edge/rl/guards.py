"""Run guards: a NaN/Inf step guard and a label-free collapse detector for transductive adaptation.

Non-finite steps. The update recipe (``update.py``) calls these helpers explicitly: before its first optimizer step
it takes a ``Snapshot`` (``models/lora.py``) of the LoRA weights and optimizer state (only when a step is about to
happen, so a group without signal costs nothing); ``nonfinite_reason`` checks the loss and gradients before each
step and ``all_finite`` the weights after it. On any NaN/Inf the snapshot is restored, so the LoRA weights are
bit-identical to before the update, and the step is reported as skipped with the reason. The run continues with
the next step.

Collapse. The paper reports that long adaptation can collapse a model to one answer for every input (one dataset
fell from 0.84 to 0.25). Without labels the symptom is still visible in what the model says. At the start of a
transductive run and then at every check (``collapse_check_every`` steps; by default four checks spread over the
run's update budget, the last one after the last update) the loop samples the checked inputs (all of them, or a fixed
random subset of ``collapse_check_inputs``) once with the current LoRA weights (N rollouts each, no update), and
``CollapseGuard`` computes the statistics of ``diversity.py`` from the answers (for multiple choice the chosen
option's text, not its letter), the output texts and the EOS flags, per question and for the set. The first check,
before any update, is the reference. A later check fires when any enabled signal does:

- ``answer`` (per question): for some question asked of at least ``collapse_min_inputs`` readable inputs, the share
  of them whose majority answer is the most common one reaches ``collapse_share`` and the entropy of their majority
  answers has fallen to ``collapse_drop`` times its start value or less;
- ``text`` (per question): the same for the majority output texts, with ``collapse_text_share``: the model writes
  one text for every image, whatever answer that text reads as, or none;
- ``eos`` (set): the fraction of rollouts that end with EOS has fallen to ``collapse_eos_drop`` times its start
  value or less: degenerate text that runs to ``max_new_tokens``. Judged only when at least half of the rollouts
  ended at the start, since a model whose answers are usually cut by the token limit cannot tell;
- ``sharpening`` (set): the mean per-input answer entropy has fallen to the floor max(``collapse_entropy_floor``,
  ``collapse_entropy_drop`` x its start value), and the answers stopped depending on the input: the entropy of the
  majority answers given the question has fallen to ``collapse_drop`` times its start value, without any one answer
  having to dominate. Either alone is normal (a confident model that still tells inputs apart; a set whose answers
  narrow a little); together they mean the model became sure of fewer answers than the inputs had. The floor is the
  higher of the two so that both a model that started unsure (contrast shift: 0.56 -> 0.04 nats) and one that
  started confident are judged; on the clean demo scenes a damaging lr 5e-3 run reached 0.07 nats with its
  answers as diverse as at the start, and stays quiet.

Every signal compares with the start, so a set whose inputs already agreed (say, all cats) does not look like a
collapse: a statistic that had nothing to lose at the start cannot fire. On firing the run stops and rolls back to the
best snapshot: the check with the highest ``score`` where nothing fired, the start counting as one; ``score`` is the
entropy of the pooled answers within a question (how varied the answers are across inputs), and a later check must
beat the best by ``SCORE_MARGIN`` nats to replace it. Diversity, not the mutual information of input and answer
(``information``, reported): the mutual information grows as the model gets surer, and in the demo runs at lr 5e-3
that lost accuracy it ranked sharpened, damaged checks above the start (jpeg shift: a check at 0.62 majority accuracy
over the start's 0.73; clean scenes: one at 0.80 over 0.92), while in none of those six runs did a check's pooled
entropy beat the start's by more than 0.02. The margin is the score's sampling noise: 32 demo scenes sampled six
times with unchanged weights gave scores spread over 0.06-0.10 nats. ``report`` names the signals and the questions
they fired on, with the statistics of the check that fired and of the start.

Under ``torch.distributed`` (``distributed.py``) each rank samples its block of the checked inputs and the
observations are all-gathered in input order, so every rank's guard judges the same statistics, keeps the same best
snapshot and stops (and rolls back) at the same step.

Why a sampling pass of its own: the answers sampled by the training steps come from weights that changed during the
pass, so statistics built from them lag the weights; in a test where the model collapsed after one step, the best
score by those lagging answers belonged to already-collapsed weights and the rollback restored collapsed LoRA weights.
Scoring each snapshot by answers sampled from exactly those weights costs one sampling round per checked input and
check (with the defaults at most 5 x 32 rounds per run, whatever the set's size) and makes the rollback target right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, fields

import torch

from ..models.lora import Snapshot, restore_snapshot, take_snapshot
from .diversity import DiversityCheck, Observation, diversity

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

SIGNALS = ("answer", "text", "eos", "sharpening")
CHECKS_PER_RUN = 4
"""Checks after the start when ``collapse_check_every`` is 0: evenly spread over the update budget."""
EOS_JUDGED_FROM = 0.5
"""The ``eos`` signal is judged only when at least this fraction of the rollouts ended at the start."""
SCORE_MARGIN = 0.1
"""Nats by which a check's score must beat the best so far for its weights to become the rollback target."""


def check_interval(config, total_steps: int) -> int:
    """Steps between two checks: ``collapse_check_every``, or the budget split into ``CHECKS_PER_RUN``."""
    return config.collapse_check_every or max(1, -(-total_steps // CHECKS_PER_RUN))


def _narrowed(start: float, now: float, drop: float) -> bool:
    """An entropy that had something to lose at the start fell to ``drop`` times its start value or less."""
    return start > 0 and now <= drop * start


def _collapsed_questions(config, start: DiversityCheck, current: DiversityCheck, kind: str, threshold: float):
    """The questions whose majority answers (``kind`` "answer") or texts ("text") collapsed: a share of at least
    ``threshold`` and an entropy fallen to ``collapse_drop`` of its start value, judged on enough inputs."""
    share, spread, size = {
        "answer": ("dominant_share", "majority_entropy", "readable"),
        "text": ("text_share", "text_entropy", "inputs"),
    }[kind]
    found = []
    for question, now in current.groups.items():
        before = start.groups.get(question)
        if before is None or min(now[size], before[size]) < config.collapse_min_inputs:
            continue
        if now[share] >= threshold and _narrowed(before[spread], now[spread], config.collapse_drop):
            found.append(question)
    return found


def fired_signals(config, start: DiversityCheck, current: DiversityCheck) -> tuple[list[str], list[str]]:
    """The collapse signals (``SIGNALS``) that ``current`` shows compared with ``start``, and the questions the
    per-question ones (``answer``, ``text``) fired on (module docstring)."""
    cfg, fired, questions = config, [], []
    for kind, threshold in (("answer", cfg.collapse_share), ("text", cfg.collapse_text_share)):
        found = _collapsed_questions(cfg, start, current, kind, threshold) if threshold > 0 else []
        if found:
            fired.append(kind)
            questions += [q for q in found if q not in questions]
    judged = cfg.collapse_eos_drop > 0 and start.ended >= EOS_JUDGED_FROM
    if judged and current.ended <= cfg.collapse_eos_drop * start.ended:
        fired.append("eos")
    floor = max(cfg.collapse_entropy_floor, cfg.collapse_entropy_drop * start.answer_entropy)
    if (
        current.readable >= cfg.collapse_min_inputs
        and 0 < floor < start.answer_entropy
        and current.answer_entropy <= floor
        and _narrowed(start.majority_entropy, current.majority_entropy, cfg.collapse_drop)
    ):
        fired.append("sharpening")
    return fired, questions


class CollapseGuard:
    """Tracks what the model says over a transductive run, keeps the best snapshot, and detects collapse.

    ``start`` is the snapshot of the LoRA weights before adaptation; the first ``check`` (step 0, with those
    weights) gives the reference statistics every later check is compared with.
    """

    def __init__(self, config, start: Snapshot | None):
        self.config = config
        self.initial: DiversityCheck | None = None
        self.history: list[DiversityCheck] = []
        self.best_step = 0
        self.best_score = 0.0
        self.best = start
        self.collapse: dict | None = None

    def due(self, step: int, total_steps: int) -> bool:
        """Whether a check runs after ``step`` updates: at the start, every interval, and after the last update."""
        return step == 0 or step == total_steps or step % check_interval(self.config, total_steps) == 0

    def inputs(self, num_items: int) -> list[int]:
        """The indices of the inputs sampled at every check: all, or a fixed random subset (from the run's seed)."""
        limit = self.config.collapse_check_inputs
        if not limit or limit >= num_items:
            return list(range(num_items))
        rng = torch.Generator().manual_seed(self.config.seed + 6)
        return sorted(torch.randperm(num_items, generator=rng)[:limit].tolist())

    def check(self, step: int, observations: Sequence[Observation], model, optimizer) -> DiversityCheck:
        """The statistics of ``observations`` (one per checked input, sampled with the current LoRA weights); the
        first call is the reference. Keeps a snapshot of the LoRA weights if they are the best so far; ``collapsed``
        says whether to stop and ``signals`` why."""
        current = diversity(observations, step, min_group=self.config.collapse_min_inputs)
        if self.initial is None:
            self.initial, self.best_step, self.best_score = current, step, current.score
        elif self.config.collapse_guard:
            current.signals, current.questions = fired_signals(self.config, self.initial, current)
            current.collapsed = bool(current.signals)
        self.history.append(current)
        better = current.score > self.best_score + SCORE_MARGIN
        if self.config.collapse_guard and better and not current.collapsed:
            self.best_step, self.best_score = step, current.score
            self.best = take_snapshot(model, optimizer)
        return current

    def roll_back(self, step: int, model, optimizer) -> None:
        """Restore the best snapshot and record the collapse (called after ``check`` said collapsed)."""
        current = self.history[-1]
        if self.best is not None:
            restore_snapshot(model, optimizer, self.best)
        self.collapse = {
            "step": step,
            "signals": list(current.signals),
            "questions": list(current.questions),
            "dominant_answer": current.dominant_answer,
            "dominant_share": current.dominant_share,
            "dominant_text": current.dominant_text,
            "at_collapse": asdict(current),
            "at_start": asdict(self.initial),
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
        known = {f.name for f in fields(DiversityCheck)}
        if any(set(c) != known for c in state["history"]):
            raise ValueError("--resume: the checkpoint's collapse-guard state is from another ttrv-edge version")
        self.history = [DiversityCheck(**c) for c in state["history"]]
        self.initial = self.history[0] if self.history else None
        self.best_step, self.best_score = int(state["best_step"]), float(state["best_score"])
        self.collapse = state["collapse"]
        self.best = best

    def report(self) -> dict:
        return {"collapse": self.collapse, "diversity": [asdict(c) for c in self.history]}
