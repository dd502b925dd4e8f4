"""Pure-torch references of the TTRV ops.

These are the single source of truth for what each op computes: the tests compare every other backend against
them (and against an fp32 gold computed by the same functions on fp32 inputs), and they are the CPU fallback of
``backend="auto"``. They favour clarity over speed, with one exception: ``linear_logprob_entropy`` processes rows
in chunks under activation checkpointing so that even the fallback never keeps an [N, V] logits tensor alive for
the backward pass.

Conventions shared by all backends:
- reductions accumulate in fp32, outputs are fp32 whatever the input dtype;
- ``-inf`` logits are allowed (masked vocabulary entries): they contribute 0 to the entropy, not NaN;
- advantages use the population standard deviation of the group (``unbiased=False``) so that a group of one
  rollout is well defined (advantage 0); TRL uses the sample std, which differs by a factor sqrt(N/(N-1)) and
  is undefined at N=1.
- the answer entropy H(p) sums over valid answers only; rollouts whose answer is invalid still count in N, so
  p(a) = count(a) / N exactly as docs/method.md §3 writes it, and r_ent = -H(p) / log(K) with K the number of distinct
  valid answers (0 when K <= 1).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

ADVANTAGE_EPS = 1e-6
"""Added to the group standard deviation before dividing (as verl and TTRL do)."""

DEFAULT_ROW_CHUNK = 1024
"""Rows of hidden states turned into logits at once by the chunked fallback."""

CHUNK_ROWS_MIN = 256
CHUNK_ROWS_MAX = 4096


def default_chunk_rows(n_rows: int, hidden_size: int, vocab_size: int) -> int:
    """Rows per chunk of the Triton lm_head ops: the chunk's logits about as large as ``hidden`` itself (Liger's
    rule), within [256, 4096] (here, without Triton, so that the memory planner can use it anywhere)."""
    rows = max(1, -(-n_rows * hidden_size // vocab_size))
    rows = 1 << (rows - 1).bit_length()  # the next power of 2
    return max(1, min(n_rows, max(CHUNK_ROWS_MIN, min(CHUNK_ROWS_MAX, rows))))


def logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """Log-probability of ``targets`` and entropy of softmax(logits / temperature), per row, in fp32."""
    z = logits.float() / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    # 0 * -inf is NaN: masked entries (p == 0) contribute nothing to the entropy. The -inf is replaced before the
    # product (not after it) so that the backward pass does not compute 0 * -inf either.
    plogp = p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))
    entropy = -plogp.sum(-1)
    return logp, entropy


def _chunk_logprob_entropy(hidden, weight, bias, targets, temperature):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logprob_entropy(logits, targets, temperature)


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_ROW_CHUNK,
):
    """``logprob_entropy(hidden @ weight.T + bias, targets)`` computed ``chunk_rows`` rows at a time.

    Each chunk runs under activation checkpointing, so the backward recomputes that chunk's logits instead of
    keeping them: peak extra memory is O(chunk_rows x V), not O(N x V).
    """
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (hidden[rows], weight, bias, targets[rows], temperature)
        if needs_grad:
            logp, ent = checkpoint(_chunk_logprob_entropy, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logprob_entropy(*args)
        logps.append(logp)
        entropies.append(ent)
    return torch.cat(logps), torch.cat(entropies)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "token-mean",
):
    """Clipped GRPO surrogate (docs/method.md §5) with optional k3 KL to ``ref_logp``.

    Returns ``(loss, stats)`` where stats has ``clip_fraction`` and ``mean_kl`` (fp32 scalars, no grad).
    ``token-mean`` averages over all unmasked tokens of the batch; ``sequence-mean`` averages each sequence over
    its tokens, then averages the sequences that have at least one token. An all-masked batch gives loss 0.
    """
    mask = mask.to(torch.float32)
    adv = advantages.float().unsqueeze(-1)
    per_token, kl, is_clipped = grpo_per_token(logp, old_logp, adv, eps_low, eps_high, ref_logp, beta)
    loss = _aggregate(per_token, mask, aggregation)
    with torch.no_grad():
        n_tokens = mask.sum().clamp_min(1.0)
        stats = {
            "clip_fraction": (is_clipped.float() * mask).sum() / n_tokens,
            "mean_kl": (kl.detach() * mask).sum() / n_tokens,
        }
    return loss, stats


def grpo_per_token(logp, old_logp, adv, eps_low=0.2, eps_high=0.2, ref_logp=None, beta=0.0):
    """Per-token clipped surrogate ``-min(rho * A, clip(rho) * A)`` (+ ``beta * k3``), k3 KL and clipped flag.

    ``adv`` broadcasts against ``logp`` (per sequence as [B, 1], or per token). The KL term (and a non-zero ``kl``)
    only when ``beta != 0`` and ``ref_logp`` is given. ``is_clipped`` carries no gradient.
    """
    logp = logp.float()
    old_logp = old_logp.float()
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if beta != 0.0 and ref_logp is not None:
        delta = ref_logp.float() - logp
        kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
    else:
        kl = torch.zeros_like(per_token)
    with torch.no_grad():
        is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return per_token, kl, is_clipped


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_ROW_CHUNK,
    return_entropy: bool = False,
):
    """GRPO loss of N flat tokens straight from hidden states: ``linear_logprob_entropy`` then the per-token terms.

    Per token i (all [N]): ``loss_i = -min(rho_i A_i, clip(rho_i) A_i) + beta k3_i - entropy_coef H_i`` with
    ``rho_i = exp(logp_i - old_logp_i)`` (``old_logp`` None: the current policy, detached, so ratio 1). The loss is
    ``sum(loss_i * mask_i) / normalizer``, normalizer ``sum(mask)`` (at least 1) by default: the token-mean. ``mask``
    may hold weights: ``token_weights`` gives those of a sequence-mean. Tokens with ``mask == 0`` contribute exactly
    0 to the loss, its gradient and the stats, even where their target's logit is -inf.

    Returns ``(loss, stats)``: stats ``logp`` [N] (detached), ``entropy`` [N] (only when computed: ``entropy_coef``
    != 0 or ``return_entropy``), and ``clip_fraction`` and ``mean_kl``, sums over the tokens weighted by ``mask``
    divided by the loss's normalizer, so that micro-batches sharing one normalizer add up to the batch's values.
    """
    logp, entropy = linear_logprob_entropy(hidden, weight, targets, bias, temperature, chunk_rows)
    weights = mask.to(torch.float32)
    valid = weights != 0
    zero = torch.zeros_like(logp)
    # Masked tokens are replaced before the loss terms, not after: their logp may be -inf, and exp/where would
    # turn that into NaN gradients (0 * inf) otherwise.
    safe_logp = torch.where(valid, logp, zero)
    safe_old = safe_logp.detach() if old_logp is None else torch.where(valid, old_logp.float(), zero)
    safe_ref = None if ref_logp is None else torch.where(valid, ref_logp.float(), zero)
    adv = advantages.float()
    per_token, kl, is_clipped = grpo_per_token(safe_logp, safe_old, adv, eps_low, eps_high, safe_ref, beta)
    if entropy_coef != 0.0:
        per_token = per_token - entropy_coef * torch.where(valid, entropy, zero)
    denominator = loss_normalizer(weights, normalizer)
    loss = (per_token * weights).sum() / denominator
    with torch.no_grad():
        stats = {
            "logp": logp.detach(),
            "clip_fraction": (is_clipped.float() * weights).sum() / denominator,
            "mean_kl": (kl * weights).sum() / denominator,
        }
        if entropy_coef != 0.0 or return_entropy:
            stats["entropy"] = entropy.detach()
    return loss, stats


def loss_normalizer(weights: torch.Tensor, normalizer: float | torch.Tensor | None) -> torch.Tensor:
    """The fp32 denominator of ``linear_grpo_loss`` on ``weights``' device: ``sum(weights)`` (at least 1) or the
    given normalizer (a number must be > 0; a tensor is not checked, which would cost a device sync)."""
    if normalizer is None:
        return weights.sum().clamp_min(1.0)
    if not torch.is_tensor(normalizer) and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return torch.as_tensor(normalizer, dtype=torch.float32, device=weights.device).reshape(())


def token_weights(mask: torch.Tensor, aggregation: str = "token-mean"):
    """Per-token weights [B, T] and normalizer that make ``linear_grpo_loss`` (which sees flat tokens) compute the
    ``grpo_loss`` aggregation of a [B, T] batch: token-mean is (mask, sum(mask)); sequence-mean is
    (mask / len_b, number of sequences with a token), i.e. each token weighs 1 / (len_b * num_seqs).

    For micro-batches, the weights are per row (a row is never split), but the normalizer must be the whole batch's.
    """
    mask = mask.to(torch.float32)
    if aggregation == "token-mean":
        return mask, mask.sum()
    if aggregation == "sequence-mean":
        lengths = mask.sum(-1, keepdim=True)
        return mask / lengths.clamp_min(1.0), (lengths > 0).float().sum()
    raise ValueError(f"aggregation must be 'token-mean' or 'sequence-mean', got {aggregation!r}")


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    if aggregation == "token-mean":
        return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    if aggregation == "sequence-mean":
        lengths = mask.sum(-1)
        per_seq = (per_token * mask).sum(-1) / lengths.clamp_min(1.0)
        has_tokens = (lengths > 0).float()
        return (per_seq * has_tokens).sum() / has_tokens.sum().clamp_min(1.0)
    raise ValueError(f"aggregation must be 'token-mean' or 'sequence-mean', got {aggregation!r}")


def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """(r - mean(r)) / (std(r) + eps) along the last dim; population std (see module docstring)."""
    rewards = rewards.float()
    if rewards.shape[-1] == 0:
        return rewards.clone()
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, keepdim=True, unbiased=False) if rewards.shape[-1] > 1 else torch.zeros_like(mean)
    # A group whose rewards are all equal carries no signal: its advantages are exactly 0. Without this, the
    # rounding of the mean (e.g. 12 distinct answers, each with reward 1/12 - alpha) divided by std + eps ~ eps
    # gave advantages of up to +-0.1.
    constant = rewards.amax(-1, keepdim=True) == rewards.amin(-1, keepdim=True)
    centered = torch.where(constant, torch.zeros_like(rewards), rewards - mean)
    return centered / (std + eps)


def answer_frequencies(answer_ids: torch.Tensor, invalid_id: int = -1):
    """Per rollout, the fraction of its group that gave the same valid answer (0 for invalid answers).

    Returns ``(freq[G, N], valid[G, N])``.
    """
    ids = answer_ids.long()
    valid = ids != invalid_id
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    freq = same.float().sum(-1) / ids.shape[-1]
    return freq, valid


def group_rewards(answer_ids: torch.Tensor, alpha: float = 0.75, invalid_id: int = -1):
    """Frequency + entropy rewards (docs/method.md §3) and group-normalised advantages for G groups of N answers.

    Returns ``(rewards[G, N], advantages[G, N], answer_entropy[G])``; the entropy is H(p) in nats.
    """
    if answer_ids.dim() != 2:
        raise ValueError(f"answer_ids must be [G, N], got shape {tuple(answer_ids.shape)}")
    freq, valid = answer_frequencies(answer_ids, invalid_id)
    # Each distinct valid answer a appears count(a) times, each time carrying p(a): summing -log p(a) / N over
    # the valid rollouts gives -sum_a p(a) log p(a) = H(p) without an explicit list of distinct answers.
    n = answer_ids.shape[-1]
    safe = torch.where(valid, freq, torch.ones_like(freq))
    entropy = -(torch.log(safe) * valid.float()).sum(-1) / n
    # K = number of distinct valid answers = sum over valid rollouts of 1 / count(a).
    counts = torch.where(valid, freq * n, torch.ones_like(freq))
    k = (valid.float() / counts).sum(-1).round()
    log_k = torch.log(k.clamp_min(1.0))
    r_ent = torch.where(k > 1, -entropy / torch.where(k > 1, log_k, torch.ones_like(log_k)), torch.zeros_like(k))
    rewards = freq + alpha * r_ent.unsqueeze(-1)
    return rewards, group_advantages(rewards), entropy


def majority_rewards(answer_ids: torch.Tensor, invalid_id: int = -1) -> torch.Tensor:
    """TTRL's reward: 1 for rollouts that give the group's most frequent valid answer, else 0.

    Ties go to the smallest answer id, so the result is deterministic. A group with no valid answer gets 0s.
    """
    freq, valid = answer_frequencies(answer_ids, invalid_id)
    ids = answer_ids.long()
    best = freq.max(-1, keepdim=True).values
    big = torch.iinfo(torch.long).max
    candidates = torch.where(valid & (freq == best), ids, torch.full_like(ids, big))
    majority = candidates.min(-1, keepdim=True).values
    return ((ids == majority) & valid).float()
