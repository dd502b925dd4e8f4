"""The clipped GRPO loss over groups of rollouts, back-propagated in micro-batches.

``grpo_backward`` weights each micro-batch's loss (``loss_weight``) so that the accumulated gradient equals that of
the one-batch token-mean (or sequence-mean) loss, and back-propagates it at once, so its activations are freed
before the next micro-batch. ``logprob_gap`` compares the log-probs the sampler recorded with the ones the training
forward computes (they should agree: one distribution for both, see ``sampling.py``).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..memory.backoff import chunks
from ..memory.costs import WorkShape
from ..models.loading import LoadedVLM
from .sampling import Rollouts, work_shape
from .scoring import completion_logprobs


def train_shape(vlm: LoadedVLM, groups: list[Rollouts]) -> WorkShape:
    """The ``WorkShape`` of a loss forward over ``groups`` (longest prompt, widest completion)."""
    first = work_shape(vlm, groups[0].prompt_inputs, 0)
    prompt = max(r.prompt_length for r in groups)
    width = max(r.completion_ids.shape[1] for r in groups)
    return WorkShape(prompt, width, first.vision_tokens)


def loss_weight(part: Rollouts, groups: list[Rollouts], aggregation: str) -> float:
    """Weight of one micro-batch's aggregated loss so that the weighted sum over all micro-batches of all groups is
    the batch's token-mean (or sequence-mean over sequences with at least one token)."""
    if aggregation == "token-mean":
        total = sum(float(r.completion_mask.sum()) for r in groups)
        return float(part.completion_mask.sum()) / total if total else 0.0
    total = sum(float((r.completion_mask.sum(-1) > 0).sum()) for r in groups)
    return float((part.completion_mask.sum(-1) > 0).sum()) / total if total else 0.0


def logprob_gap(groups: list[Rollouts], logps: list[torch.Tensor]) -> float | None:
    """The largest |log-prob under the sampler - log-prob under the training forward| over the groups' completion
    tokens (verl's rollout-vs-train probability gap); None when no group recorded its sampler log-probs."""
    gaps = [
        float(((logp - r.sampler_logp.to(logp.device)).abs() * r.completion_mask).max())
        for r, logp in zip(groups, logps)
        if r.sampler_logp is not None and bool(r.completion_mask.any())
    ]
    return max(gaps) if gaps else None


def grpo_backward(
    vlm: LoadedVLM,
    groups: list[Rollouts],
    advantages: torch.Tensor,
    config,
    micro_batch: int,
    *,
    old_logp: list[torch.Tensor] | None = None,
    ref_logp: list[torch.Tensor] | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """Backward of the clipped GRPO loss over ``groups``, ``micro_batch`` rollouts per forward, into ``.grad``.

    Each micro-batch's loss is weighted by ``loss_weight`` and back-propagated at once, so its activations are freed
    before the next one: the accumulated gradient is that of the one-batch loss. ``config`` supplies temperature,
    eps_low/eps_high, beta, aggregation and backend. ``old_logp`` None means the current policy (ratio 1). The
    caller zeroes the gradients first. Returns the loss value and the detached log-probs per group.
    """
    total = 0.0
    logps = []
    for g, rollouts in enumerate(groups):
        group_logp = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32, device=vlm.device)
        for rows in chunks(rollouts.num, micro_batch):
            part = rollouts.select(rows)
            weight = loss_weight(part, groups, config.aggregation)
            if weight == 0.0:
                continue
            logp, _ = completion_logprobs(vlm, part, temperature=config.temperature, backend=config.backend)
            group_logp[rows] = logp.detach()
            old = logp.detach() if old_logp is None else old_logp[g][rows]
            loss, _ = kernels.grpo_loss(
                logp,
                old,
                advantages[g][rows].to(logp.device),
                part.completion_mask,
                eps_low=config.eps_low,
                eps_high=config.eps_high,
                ref_logp=None if ref_logp is None else ref_logp[g][rows],
                beta=config.beta,
                aggregation=config.aggregation,
                backend=config.backend,
            )
            (loss * weight).backward()
            total += float(loss.detach()) * weight
        logps.append(group_logp)
    return total, logps
