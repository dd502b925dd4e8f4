"""Fused ops of ttrv-edge, installed as ``ttrv_edge.kernels``.

Every op takes ``backend``: ``"torch"`` runs the pure-torch reference (``reference.py``), ``"triton"`` the fused
Triton kernel, ``"auto"`` picks triton for CUDA tensors when a Triton backend is available and torch otherwise.
All backends take bf16/fp16/fp32 inputs and return fp32 outputs.

The Triton implementations live in ``*_triton.py`` modules, imported lazily on the first Triton call (so CPU runs
never import triton). They are deliberately not named like the public functions: importing a submodule
``ttrv_edge.kernels.logprob_entropy`` would rebind the package attribute ``logprob_entropy`` to the module and
shadow the function below.
"""

from __future__ import annotations

from . import reference
from .dispatch import resolve_backend

__all__ = [
    "logprob_entropy",
    "linear_logprob_entropy",
    "grpo_loss",
    "linear_grpo_loss",
    "group_rewards",
    "resolve_backend",
]


def logprob_entropy(logits, targets, temperature: float = 1.0, backend: str = "auto"):
    """Per-row log-prob of ``targets`` and entropy of softmax(logits / T).

    logits [N, V] (bf16/fp16/fp32), targets [N] int -> (logp [N] fp32, entropy [N] fp32); differentiable
    w.r.t. logits.
    """
    if resolve_backend(backend, logits) == "triton":
        from .logprob_entropy_triton import triton_logprob_entropy

        return triton_logprob_entropy(logits, targets, temperature)
    return reference.logprob_entropy(logits, targets, temperature)


def linear_logprob_entropy(
    hidden,
    weight,
    targets,
    bias=None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_rows: int | None = None,
):
    """``logprob_entropy(hidden @ weight.T + bias)`` without ever holding the [N, V] logits.

    hidden [N, H], weight [V, H], bias [V] or None, targets [N] -> (logp [N], entropy [N]) fp32. When
    ``weight`` does not require grad (LoRA never trains lm_head) no weight-gradient buffer is allocated.
    ``chunk_rows`` rows are turned into logits at once (extra memory ~ chunk_rows x V); None picks a default.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if resolve_backend(backend, hidden) == "triton":
        from .linear_logprob_entropy_triton import triton_linear_logprob_entropy

        return triton_linear_logprob_entropy(hidden, weight, targets, bias, temperature, chunk_rows=chunk_rows)
    chunk = reference.DEFAULT_ROW_CHUNK if chunk_rows is None else chunk_rows
    return reference.linear_logprob_entropy(hidden, weight, targets, bias, temperature, chunk_rows=chunk)


def grpo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp=None,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    backend: str = "auto",
):
    """Clipped GRPO loss. logp/old_logp/mask/ref_logp [B, T], advantages [B] -> (loss scalar, stats dict)."""
    if resolve_backend(backend, logp) == "triton":
        from .grpo_loss_triton import triton_grpo_loss

        return triton_grpo_loss(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp, beta, aggregation)
    return reference.grpo_loss(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp, beta, aggregation)


def linear_grpo_loss(
    hidden,
    weight,
    targets,
    old_logp,
    advantages,
    mask,
    ref_logp=None,
    bias=None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    entropy_coef: float = 0.0,
    normalizer=None,
    backend: str = "auto",
    chunk_rows: int | None = None,
    return_entropy: bool = False,
):
    """The GRPO loss straight from hidden states: ``grpo_loss`` of ``linear_logprob_entropy``'s log-probs, fused.

    hidden [N, H] and weight [V, H] (bias [V] or None, -inf allowed) give the logits of N flat tokens, targets [N];
    old_logp [N] (None: on-policy, ratio 1), advantages [N] (per token: a rollout's advantage repeated over its
    tokens), mask [N] (float values weight the tokens), ref_logp [N] or None. Returns ``(loss, stats)``: loss is
    ``sum(per_token * mask) / normalizer`` (normalizer None: ``sum(mask)``, the token-mean; micro-batches pass the
    whole batch's count so that their losses add up to the batch's); stats has ``logp`` [N] (detached),
    ``entropy`` [N] (when ``entropy_coef != 0`` or ``return_entropy``), ``clip_fraction`` and ``mean_kl`` (with the
    loss's normalizer). ``aggregation`` must be "token-mean": the op sees flat tokens, so a sequence-mean is
    expressed by per-token weights 1 / (len_b * num_seqs), e.g. ``mask, normalizer =
    reference.token_weights(mask_bt, "sequence-mean")`` flattened to the kept tokens. Gradients flow to hidden and,
    only if they require grad, to weight and bias; the Triton backend computes them during the forward, chunk by
    chunk, and never holds [N, V] logits (``linear_grpo_loss_triton``).
    """
    if aggregation != "token-mean":
        raise ValueError(
            f"linear_grpo_loss takes aggregation='token-mean' (got {aggregation!r}): for a sequence-mean pass the "
            "per-token weights and normalizer of reference.token_weights(mask, 'sequence-mean') as mask/normalizer"
        )
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    args = (hidden, weight, targets, old_logp, advantages, mask, ref_logp, bias, temperature, eps_low, eps_high)
    kwargs = {"beta": beta, "entropy_coef": entropy_coef, "normalizer": normalizer, "return_entropy": return_entropy}
    if resolve_backend(backend, hidden) == "triton":
        from .linear_grpo_loss_triton import triton_linear_grpo_loss

        return triton_linear_grpo_loss(*args, chunk_rows=chunk_rows, **kwargs)
    chunk = reference.DEFAULT_ROW_CHUNK if chunk_rows is None else chunk_rows
    return reference.linear_grpo_loss(*args, chunk_rows=chunk, **kwargs)


def group_rewards(answer_ids, alpha: float = 0.75, invalid_id: int = -1, backend: str = "auto"):
    """Frequency + entropy rewards. answer_ids [G, N] int -> (rewards [G, N], advantages [G, N], entropy [G])."""
    if resolve_backend(backend, answer_ids) == "triton":
        from .group_rewards_triton import triton_group_rewards

        return triton_group_rewards(answer_ids, alpha, invalid_id)
    return reference.group_rewards(answer_ids, alpha, invalid_id)
