"""The clipped GRPO loss over groups of rollouts, back-propagated in micro-batches.

``grpo_backward`` runs each micro-batch from the hidden states of its completion tokens straight to the loss with
``kernels.linear_grpo_loss`` (fused: logits formed chunk by chunk, d(hidden) written in the same pass), divided by
the whole batch's token count (``batch_normalizer``; a sequence-mean by per-token weights 1 / len, over the batch's
number of sequences), so the micro-batch losses and gradients add up to the one-batch loss's. Each micro-batch is
back-propagated at once, so its activations are freed before the next. ``fused=False`` keeps the unfused path:
``completion_logprobs`` then ``kernels.grpo_loss``, weighted by ``loss_weight`` (the same gradient up to fp32
rounding, a test checks it). ``logprob_gap`` compares the log-probs the sampler recorded with the ones the training
forward computes (they should agree: one distribution for both, see ``sampling.py``).
"""

from __future__ import annotations

import torch

from .. import kernels
from ..memory.backoff import chunks
from ..memory.costs import WorkShape
from ..models.forward import lm_head
from ..models.loading import LoadedVLM
from .sampling import Rollouts, work_shape
from .scoring import completion_hidden, completion_logprobs


def train_shape(vlm: LoadedVLM, groups: list[Rollouts]) -> WorkShape:
    """The ``WorkShape`` of a loss forward over ``groups`` (longest prompt, widest completion)."""
    first = work_shape(vlm, groups[0].prompt_inputs, 0)
    prompt = max(r.prompt_length for r in groups)
    width = max(r.completion_ids.shape[1] for r in groups)
    return WorkShape(prompt, width, first.vision_tokens)


def batch_normalizer(groups: list[Rollouts], aggregation: str) -> float:
    """Denominator of the one-batch loss: the completion tokens of all groups (token-mean), or their sequences
    with at least one token (sequence-mean)."""
    if aggregation == "token-mean":
        return sum(float(r.completion_mask.sum()) for r in groups)
    return sum(float((r.completion_mask.sum(-1) > 0).sum()) for r in groups)


def loss_weight(part: Rollouts, total: float, aggregation: str) -> float:
    """Weight of one micro-batch's aggregated loss so that the weighted sum over all micro-batches of all groups is
    the batch's token-mean (or sequence-mean over sequences with at least one token); ``total`` is the batch's
    ``batch_normalizer``."""
    return batch_normalizer([part], aggregation) / total if total else 0.0


def logprob_gap(groups: list[Rollouts], logps: list[torch.Tensor]) -> float | None:
    """The largest |log-prob under the sampler - log-prob under the training forward| over the groups' completion
    tokens (verl's rollout-vs-train probability gap); None when no group recorded its sampler log-probs."""
    gaps = [  # padding after EOS is a suppressed id (-inf under the sampler): select the kept tokens, never multiply
        float((logp - r.sampler_logp.to(logp.device)).abs()[r.completion_mask.bool()].max())
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
    fused: bool = True,
    normalizer: float | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """Backward of the clipped GRPO loss over ``groups``, ``micro_batch`` rollouts per forward, into ``.grad``.

    Each micro-batch's loss is a share of the one-batch loss (``fused``: ``linear_grpo_loss`` divided by the
    batch's ``batch_normalizer``; otherwise ``grpo_loss`` weighted by ``loss_weight``) and is back-propagated at
    once, so its activations are freed before the next one: the accumulated gradient is that of the one-batch loss.
    ``config`` supplies temperature, eps_low/eps_high, beta, aggregation and backend. ``old_logp`` None means the
    current policy (ratio 1). The caller zeroes the gradients first. Returns the loss value and the detached
    log-probs [N, T] per group (0 at masked tokens). ``normalizer``: the denominator when ``groups`` are one rank's
    share of a larger batch (``rl/distributed.py``: the all-reduced ``batch_normalizer``); None: ``groups``' own.
    """
    if normalizer is None:
        normalizer = batch_normalizer(groups, config.aggregation)
    total = 0.0
    logps = []
    for g, rollouts in enumerate(groups):
        group_logp = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32, device=vlm.device)
        for rows in chunks(rollouts.num, micro_batch):
            part = rollouts.select(rows)
            if batch_normalizer([part], config.aggregation) == 0.0:
                continue
            old = None if old_logp is None else old_logp[g][rows]
            ref = None if ref_logp is None else ref_logp[g][rows]
            if fused:
                loss, logp = _fused_loss(vlm, part, advantages[g][rows], old, ref, config, normalizer)
                loss.backward()
                total += float(loss.detach())
            else:
                weight = loss_weight(part, normalizer, config.aggregation)
                logp, _ = completion_logprobs(vlm, part, temperature=config.temperature, backend=config.backend)
                loss, _ = kernels.grpo_loss(
                    logp,
                    logp.detach() if old is None else old,
                    advantages[g][rows].to(logp.device),
                    part.completion_mask,
                    eps_low=config.eps_low,
                    eps_high=config.eps_high,
                    ref_logp=ref,
                    beta=config.beta,
                    aggregation=config.aggregation,
                    backend=config.backend,
                )
                (loss * weight).backward()
                total += float(loss.detach()) * weight
            group_logp[rows] = logp.detach()
        logps.append(group_logp)
    return total, logps


def _fused_loss(vlm: LoadedVLM, part: Rollouts, advantages, old, ref, config, normalizer: float):
    """One micro-batch's share of the batch loss from its tokens' hidden states, and its log-probs [n, T]."""
    hidden, keep = completion_hidden(vlm, part)
    device = hidden.device
    keep = keep.to(device)
    weights, _ = kernels.reference.token_weights(part.completion_mask.to(device), config.aggregation)
    tokens = lambda t: None if t is None else t.to(device)[keep]  # noqa: E731  [n, T] -> the kept tokens [M]
    loss, stats = kernels.linear_grpo_loss(
        hidden,
        lm_head(vlm.model).weight,
        tokens(part.completion_ids),
        tokens(old),
        tokens(advantages.to(device).unsqueeze(-1).expand(keep.shape)),
        tokens(weights),
        ref_logp=tokens(ref),
        bias=vlm.logit_bias(),
        temperature=config.temperature,
        eps_low=config.eps_low,
        eps_high=config.eps_high,
        beta=config.beta,
        normalizer=normalizer,
        backend=config.backend,
    )
    logp = torch.zeros(keep.shape, dtype=torch.float32, device=device).masked_scatter(keep, stats["logp"])
    return loss, logp
