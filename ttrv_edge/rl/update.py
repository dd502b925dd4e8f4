"""One GRPO update of the LoRA weights on groups of sampled rollouts, as one straight recipe.

Deviations from the paper, and why:
- a group whose rewards are all equal is skipped, not trained on with zero advantages: the loss and gradient
  would be exactly zero anyway, and skipping saves the backward pass;
- not in the paper, for unattended runs (``guards.py``): an update with a NaN/Inf loss, gradient or weight is undone
  (the LoRA weights and optimizer state are restored from a snapshot) and recorded as skipped;
- under ``torch.distributed`` (``distributed.py``) each rank trains on its share of the step's groups: the token
  count, the "any informative group" decision, the batch baseline's rewards, the gradients and the loss are
  all-reduced, so every rank takes the same step (a rank with no group that step still joins every collective).
"""

from __future__ import annotations

import torch

from ..config import TTRVConfig
from ..kernels.reference import group_advantages
from ..memory.backoff import run_with_backoff
from ..memory.planner import MemoryPlanner
from ..models.loading import LoadedVLM
from ..models.lora import restore_snapshot, take_snapshot
from .distributed import SINGLE, Group
from .guards import NONFINITE_WEIGHTS, all_finite, nonfinite_reason
from .loss import batch_normalizer, grpo_backward, logprob_gap, train_shape
from .records import UpdateOutcome
from .rewards import compute_rewards
from .sampling import Rollouts
from .scoring import score_rollouts

__all__ = ["grpo_update"]


def grpo_update(
    vlm: LoadedVLM,
    optimizer: torch.optim.Optimizer,
    memory: MemoryPlanner,
    config: TTRVConfig,
    groups: list[tuple[Rollouts | list[Rollouts], list[str | None]]],
    group: Group = SINGLE,
) -> UpdateOutcome:
    """One GRPO update on the sampled groups, as a straight recipe: rewards -> reference log-probs -> backward over
    micro-batches -> guarded optimizer step (repeated ``inner_updates`` times).

    A group is one input: its rollouts (or a list of them, one per view of its image) and the answers extracted from
    all of them, in the same order. Rewards and advantages come from the pooled answers, so with views every view's
    rollouts are trained toward the vote across views.

    Only informative groups are trained on: a group whose advantages are all zero (every rollout agreed) adds
    nothing to the gradient, and its tokens are also left out of the token-mean's denominator so that they do not
    shrink the step of the groups that carry signal (TRL's GRPOTrainer keeps them in the denominator). The loss
    runs in micro-batches sized by the memory budget, gradients accumulating, so the update equals the one-batch
    update; an out-of-memory error halves the micro-batch and redoes the pass (``run_with_backoff``). The base
    model stays in eval mode: its dropout (vision tower included) must not differ from the sampler's.
    ``skip_nonfinite``: a NaN/Inf loss, gradient or weight restores the LoRA weights and optimizer state from
    before the update, and the outcome says why. ``group``: under ``torch.distributed``, ``groups`` are this rank's
    share of the step (possibly none) and the outcome is the whole step's, the same on every rank.
    """
    cfg = config
    views = [list(r) if isinstance(r, (list, tuple)) else [r] for r, _ in groups]  # each group's rollouts, per view
    rollouts = [v for item in views for v in item]
    shape = train_shape(vlm, rollouts) if rollouts else None
    size = memory.micro_batch("train", max(r.num for r in rollouts), shape) if rollouts else 1

    def with_backoff(attempt, size: int):
        """``attempt(size)`` measured as the "train" phase, halving ``size`` on out-of-memory; (result, size)."""
        return run_with_backoff(attempt, size, phase="train", shape=shape, planner=memory, device=vlm.device)

    def score(r: Rollouts, micro_batch: int):
        return score_rollouts(vlm, r, temperature=cfg.temperature, backend=cfg.backend, micro_batch=micro_batch)

    # 1. rewards and advantages over each input's pooled rollouts (all its views), then split back per view
    # (self-certainty needs every rollout's token entropy first: a no-grad pass)
    old = token_entropy = None
    if cfg.entropy_signal == "self-certainty" and rollouts:
        scored, size = with_backoff(lambda n: [score(r, n) for r in rollouts], size)
        old = [logp for logp, _ in scored]
        per_view = [_mean_over_tokens(e, r.completion_mask) for (_, e), r in zip(scored, rollouts)]
        token_entropy = torch.stack([torch.cat(per_view[a:b]) for a, b in _spans(views)])
    rewards = (
        compute_rewards(
            [a for _, a in groups],
            reward=cfg.reward,
            alpha=cfg.alpha,
            entropy_signal=cfg.entropy_signal,
            token_entropy=token_entropy,
            baseline=cfg.baseline,
            gate_share=cfg.gate_share,
            gate_margin=cfg.gate_margin,
            device=vlm.device,
        )
        if groups
        else None
    )
    outcome, advantages_of = _step_rewards(rewards, cfg.baseline, group)
    view_advantages = [row for g, item in enumerate(views) for row in advantages_of[g].split([r.num for r in item])]
    signal = [bool(advantages_of[g].abs().max() > 0) for g, item in enumerate(views) for _ in item]
    informative = [i for i, r in enumerate(rollouts) if signal[i] and bool(r.completion_mask.any())]
    train = [rollouts[i] for i in informative]
    # the step's token count (one rank's share divides by the whole step's) and whether any rank trains
    normalizer, trained = None, len(train)
    if group.enabled:
        normalizer, trained = group.sum([batch_normalizer(train, cfg.aggregation), len(train)])
    if not trained:
        return outcome
    advantages = [view_advantages[i] for i in informative]
    old = None if old is None else [old[i] for i in informative]
    # 2. reference log-probs: the same model with the adapter disabled
    refs = None
    if cfg.beta > 0:
        with vlm.model.disable_adapter():
            refs, size = with_backoff(lambda n: [score(r, n)[0] for r in train], size)
    # 3. backward over micro-batches, then a guarded optimizer step
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    snapshot = take_snapshot(vlm.model, optimizer) if cfg.skip_nonfinite else None
    for _ in range(cfg.inner_updates):

        def backward_pass(n: int, old=old):
            optimizer.zero_grad(set_to_none=True)  # a retry after an OOM starts from clean gradients
            return grpo_backward(vlm, train, advantages, cfg, n, old_logp=old, ref_logp=refs, normalizer=normalizer)

        if train:
            (loss, logps), size = with_backoff(backward_pass, size)
        else:  # another rank trains: this one adds nothing to the sum, but joins it
            optimizer.zero_grad(set_to_none=True)
            loss, logps = 0.0, []
        if group.enabled:
            group.all_reduce_grads(params)
            loss = group.sum([loss])[0]
        if outcome.logprob_gap is None:
            outcome.logprob_gap = group.max_or_none(logprob_gap(train, logps))
        old = old if old is not None else logps
        outcome.skipped = nonfinite_reason(loss, params) if snapshot is not None else None
        if outcome.skipped is None:
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            if snapshot is not None and not all_finite(params):
                outcome.skipped = NONFINITE_WEIGHTS
        if outcome.skipped is not None:
            restore_snapshot(vlm.model, optimizer, snapshot)
            return outcome
        outcome.loss = loss
    return outcome


def _step_rewards(rewards, baseline: str, group: Group) -> tuple[UpdateOutcome, torch.Tensor]:
    """The outcome's mean reward and answer entropies for the whole step, and this rank's advantages [G_r, N]
    (with ``baseline="batch"`` normalised over every rank's rewards). Under ``torch.distributed`` every rank's
    rewards are gathered (a few numbers per input), so both come out exactly as one process computes them."""
    if not group.enabled:
        return UpdateOutcome(None, float(rewards.rewards.mean()), rewards.answer_entropy.tolist()), rewards.advantages
    mine = (rewards.rewards.detach().cpu(), rewards.answer_entropy.tolist()) if rewards is not None else None
    parts = group.gather([mine])
    device = rewards.rewards.device if rewards is not None else "cpu"
    everything = torch.cat([r for r, _ in filter(None, parts)]).to(device)
    outcome = UpdateOutcome(None, float(everything.mean()), [e for _, ents in filter(None, parts) for e in ents])
    if rewards is None:
        return outcome, torch.zeros(0)
    if baseline != "batch":
        return outcome, rewards.advantages
    start = sum(len(r) for r, _ in filter(None, parts[: group.rank]))
    advantages = group_advantages(everything.reshape(1, -1)).reshape(everything.shape)
    return outcome, advantages[start : start + len(rewards.rewards)]


def _spans(views: list[list[Rollouts]]) -> list[tuple[int, int]]:
    """(start, stop) of each group's views in the flattened list of views."""
    stops = torch.tensor([len(group) for group in views]).cumsum(0).tolist()
    return list(zip([0, *stops[:-1]], stops))


def _mean_over_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
