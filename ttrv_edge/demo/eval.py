"""Evaluate one shift condition (model, corruption, severity, method, n scenes): ``ttrv-edge eval``.

Methods, all through the adaptation loop (``ttrv_edge.rl.loop.AdaptationLoop``, behind ``TTRVModel``):

- ``base``: no adaptation. Reports greedy accuracy, self-consistency (majority of N samples), the sampled accuracy
  (mean correctness of the N samples, what TTRL reports) and the answer entropy of the samples;
- ``ttrl``: transductive GRPO with TTRL's 0/1 majority reward (``reward="majority"``);
- ``ttrv``: transductive TTRV, frequency + alpha * entropy reward (``reward="ttrv"``);
- ``ttrv-episodic``: single-example TTRV per scene (K steps, reset after every scene);
- ``tent``: entropy minimisation on the same LoRA weights (TENT-style, the non-RL baseline): E epochs over the
  set, each step minimises the mean token entropy of the model's own N sampled answers, computed by the same fused
  kernel (``rl.scoring.completion_logprobs``). TENT proper adapts batch-norm statistics; these models have none, so
  the LoRA weights are what it trains, as the issue asks.

Every method reports the same metrics after adaptation, and the base metrics of the same scenes before it, so one
row of the table is "before -> after" on identical inputs. Scenes are ``scenes.make_scene(seed)`` for seeds
``start .. start + n - 1`` (kinds mixed, drawn from the seed), then corrupted with ``shift.corrupt``.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..config import TTRVConfig
from ..rl.loop import AdaptationLoop
from ..rl.records import ItemResult, Prediction, PreparedItem, item_seed
from ..rl.schedule import schedule
from ..rl.scoring import completion_logprobs
from .scenes import make_scene
from .shift import corrupt

__all__ = ["METHODS", "evaluate", "prepare_items", "summarise"]

METHODS = ("base", "ttrl", "ttrv", "ttrv-episodic", "tent")


def prepare_items(loop: AdaptationLoop, corruption: str, severity: int, n: int, start: int = 0):
    """The ``n`` benchmark scenes under the corruption, encoded for the model; returns (items, correct letters)."""
    items, answers = [], []
    for seed in range(start, start + n):
        scene = make_scene(seed)
        image = corrupt(scene.image(), corruption, severity, seed=seed)
        items.append(loop.prepare(f"scene-{seed}", image, scene.question))
        answers.append(scene.answer)
    return items, answers


def answer_entropy(distribution: dict[str, float]) -> float:
    """Entropy (nats) of a sampled answer distribution (unreadable answers count as one more answer)."""
    return -sum(p * math.log(p) for p in distribution.values() if p > 0)


def summarise(predictions: list[Prediction], answers: list[str]) -> dict:
    """Accuracies (greedy, majority of samples, mean over samples) and mean answer entropy, as fractions."""
    n = max(len(answers), 1)
    return {
        "greedy": sum(p.answer == a for p, a in zip(predictions, answers)) / n,
        "majority": sum(p.majority == a for p, a in zip(predictions, answers)) / n,
        "sampled": sum(p.distribution.get(a, 0.0) for p, a in zip(predictions, answers)) / n,
        "entropy": sum(answer_entropy(p.distribution) for p in predictions) / n,
        "unreadable": sum(p.answer is None for p in predictions) / n,
    }


def _tent(loop: AdaptationLoop, items: list[PreparedItem]) -> list[ItemResult]:
    """Entropy minimisation on the LoRA weights over the set (the TTRV runs' update budget and order,
    ``rl/schedule.py``; ``batch_size`` inputs per step)."""
    cfg = loop.config
    results = [
        ItemResult(
            it.label, it.question.text, list(it.question.choices or []), loop.predict(it, item_seed(cfg.seed, 0, i))
        )
        for i, it in enumerate(items)
    ]
    for batch in schedule(cfg, len(items)):
        groups = []
        for i in batch.indices:
            sampled = loop.sample(items[i], item_seed(cfg.seed, 3, batch.epoch, batch.start, i))[0]
            groups.extend(sampled if isinstance(sampled, list) else [sampled])  # one Rollouts per view
        total, tokens = 0.0, 0.0  # the base model stays in eval mode (no dropout), as in the TTRV update
        for rollouts in groups:
            _, entropy = completion_logprobs(loop.vlm, rollouts, temperature=cfg.temperature, backend=cfg.backend)
            total = total + (entropy * rollouts.completion_mask).sum()
            tokens += float(rollouts.completion_mask.sum())
        loop.optimizer.zero_grad(set_to_none=True)
        (total / max(tokens, 1.0)).backward()
        if cfg.max_grad_norm > 0:
            params = [p for p in loop.vlm.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        loop.optimizer.step()
    for i, it in enumerate(items):
        results[i].after = loop.predict(it, item_seed(cfg.seed, 2, i))
    return results


def run_method(loop: AdaptationLoop, method: str, items: list[PreparedItem]) -> list[ItemResult]:
    """Run ``method`` on the prepared items with the loop's config; the loop is reset first and after."""
    if method not in METHODS:
        raise ValueError(f"--method: must be one of {', '.join(METHODS)}, got {method!r}")
    loop.reset()
    try:
        if method == "base":
            cfg = loop.config
            return [
                ItemResult(it.label, it.question.text, None, loop.predict(it, item_seed(cfg.seed, 0, i)))
                for i, it in enumerate(items)
            ]
        if method == "ttrv-episodic":
            return [loop.adapt_episode(it, index=i) for i, it in enumerate(items)]
        if method == "tent":
            return _tent(loop, items)
        return loop.adapt_transductive(items)
    finally:
        loop.reset()


def method_config(config: TTRVConfig, method: str) -> TTRVConfig:
    """The config a method runs with: TTRL switches the reward to the 0/1 majority; TTRV keeps the config's reward
    ('ttrv' or 'gated') unless it is TTRL's; the rest keep ``config``."""
    if method == "ttrl":
        return dataclasses.replace(config, reward="majority", alpha=0.0)
    if method in ("ttrv", "ttrv-episodic") and config.reward == "majority":
        return dataclasses.replace(config, reward="ttrv")
    return config


def evaluate(
    loop: AdaptationLoop, corruption: str, severity: int, method: str, n: int = 64, start: int = 0, items=None
) -> dict:
    """Accuracy of ``method`` on ``n`` scenes under (corruption, severity): before and after adaptation."""
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    base_config = loop.config
    if items is None:
        items, answers = prepare_items(loop, corruption, severity, n, start)
    else:
        items, answers = items
    loop.config = method_config(base_config, method)
    started = time.perf_counter()
    try:
        results = run_method(loop, method, items)
    finally:
        loop.config = base_config
    seconds = time.perf_counter() - started
    before = summarise([r.before for r in results], answers)
    after = summarise([r.after or r.before for r in results], answers)
    steps = [s for r in results for s in r.steps]
    return {
        "corruption": corruption,
        "severity": severity,
        "method": method,
        "n": len(items),
        "before": before,
        "after": after,
        "updates": sum(s.updated for s in steps),
        "run": loop.last_run if method in ("ttrl", "ttrv") else None,  # the collapse guard's checks and stop
        "seconds": round(seconds, 2),
        "seconds_per_item": round(seconds / max(len(items), 1), 3),
        "config": loop.config.to_dict() if method == "base" else method_config(base_config, method).to_dict(),
    }
