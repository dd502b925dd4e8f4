"""Scoring rollouts: each completion token's log-prob and entropy under the current policy.

``completion_logprobs`` computes them from the language model's last hidden states through
``kernels.linear_logprob_entropy``, so the [N, T, V] logits of a plain forward never exist; it adds the same -inf
bias at the suppressed ids that the sampler applied (``LoadedVLM.logit_bias``), so tokens are scored under the
distribution they were drawn from. Those hidden states come from ``completion_hidden``, which the GRPO update
also calls to feed them to ``kernels.linear_grpo_loss`` directly (``loss.py``). The prompt's hidden states depend
on LoRA, so they are recomputed with grad, but only once per micro-batch: ``shared_prefix_hidden`` runs the prompt
(image included) once, batch 1, and the N completions attend to its KV cache expanded to N rows; autograd sums
their gradients through the shared prompt, so log-probs and gradients equal those of N rows of prompt + completion
(a test checks both) at the cost of P + N x T tokens instead of N x (P + T), in compute and in activation memory.
The N-row path remains (``share_prefix=False``);
there ``shared_vision`` runs the tower on one copy of the image and tiles its output for the N rows (forward hooks
on the tower module, removed on exit) instead of encoding the image N times. Both stay exact when the vision side
trains (``--lora-targets vision/all``, ``--train-norms``): the tiling and the cache expansion are differentiable, so
the one encoding receives the sum of the N rows' gradients, which is the N-row gradient (tests check it).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

from .. import kernels
from ..memory.backoff import chunks
from ..models.forward import backbone_hidden_states, inner_model, lm_head, sequence_inputs, vision_tower
from ..models.loading import LoadedVLM
from .sampling import Rollouts, cache_argument


def _take_first(value, copies: int):
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] % copies == 0:
        return value[: value.shape[0] // copies]
    return value


def _tile(value, copies: int):
    if torch.is_tensor(value):
        return value.repeat(copies, *([1] * (value.dim() - 1))) if value.dim() > 0 else value
    if isinstance(value, tuple) and not hasattr(value, "keys"):
        return type(value)(_tile(v, copies) for v in value)
    if hasattr(value, "keys"):  # a transformers ModelOutput
        for key in list(value.keys()):
            value[key] = _tile(value[key], copies)
        return value
    return value


@contextmanager
def shared_vision(model, copies: int):
    """Inside this block the vision tower encodes one of ``copies`` identical stacked image inputs and tiles its
    output ``copies`` times (``repeat``, differentiable): exact, gradients of a trained tower included (they sum
    over the copies as they would over N encodings), and ``copies - 1`` image encodings cheaper."""
    tower = vision_tower(model) if copies > 1 else None
    if tower is None:
        yield
        return

    def before(module, args, kwargs):
        return tuple(_take_first(a, copies) for a in args), {k: _take_first(v, copies) for k, v in kwargs.items()}

    def after(module, args, kwargs, output):
        return _tile(output, copies)

    handles = [
        tower.register_forward_pre_hook(before, with_kwargs=True),
        tower.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _cache_of(output):
    cache = output.get("cache", None) if "cache" in output else output.get("past_key_values", None)
    if cache is None:
        raise TypeError("the model returned no KV cache")
    return cache


def _continuation_positions(inner, start: int, length: int, rows: int, device) -> torch.Tensor | None:
    """Position ids of ``length`` text tokens after ``start`` cached ones, for models with 3-D rope (Qwen2-VL:
    the text position plus the ``rope_deltas`` the prompt forward stored, on all three axes); None otherwise."""
    deltas = getattr(inner, "rope_deltas", None)
    if deltas is None:
        return None
    text = torch.arange(start, start + length, device=device).view(1, -1).expand(rows, -1)
    return (text + deltas.to(device).view(-1, 1)).unsqueeze(0).expand(3, -1, -1)


def shared_prefix_hidden(vlm: LoadedVLM, prompt: dict, completions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [N, W, H] that predict the W completion tokens of N rows of one prompt, the prompt run once.

    The prompt (image included) is forwarded once, batch 1, with grad: its hidden states do not depend on the
    completions (causal attention) and its KV cache, expanded to the N rows (``repeat_interleave``, differentiable),
    is what the completion tokens attend to. Autograd sums the N rows' gradients through the shared prompt, so
    the result and its gradient equal the N-row forward of prompt + completion, at the cost of P + N x W tokens
    instead of N x (P + W).
    """
    inner = inner_model(vlm.model)
    accepted = set(inspect.signature(inner.forward).parameters)
    rows, width = completions.shape
    first = {k: v for k, v in prompt.items() if k in accepted and v is not None}
    out = inner(**first, use_cache=True, return_dict=True)
    last = out.last_hidden_state[:, -1:, :].expand(rows, -1, -1)
    if width == 1:
        return last
    cache = _cache_of(out)
    if rows > 1:
        cache.batch_repeat_interleave(rows)
    length = prompt["input_ids"].shape[1]
    attention = torch.cat(
        [prompt["attention_mask"].expand(rows, -1), mask[:, :-1].to(prompt["attention_mask"].dtype)], 1
    )
    step = {"input_ids": completions[:, :-1], "attention_mask": attention, cache_argument(vlm.model): cache}
    positions = _continuation_positions(inner, length, width - 1, rows, completions.device)
    if positions is not None:
        step["position_ids"] = positions
    rest = inner(**step, use_cache=True, return_dict=True).last_hidden_state
    return torch.cat([last, rest], dim=1)


def completion_hidden(
    vlm: LoadedVLM, rollouts: Rollouts, *, share_prefix: bool = True, share_vision: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden states [M, H] that predict the M unmasked completion tokens (row-major order), and the
    [N, T] bool mask of those tokens: ``completion_ids[keep]`` are their targets.

    Trailing all-padding columns are dropped before the forward. Differentiable w.r.t. the LoRA weights when grad
    is enabled. ``share_prefix``: run the prompt once for the N rows (``shared_prefix_hidden``); otherwise run N
    rows of prompt + completion, with ``share_vision`` encoding the image once for them (``shared_vision``)
    instead of N times.
    """
    ids, mask = rollouts.completion_ids, rollouts.completion_mask
    width = int(mask.sum(0).nonzero().max()) + 1 if bool(mask.any()) else 0
    full_keep = torch.zeros_like(mask, dtype=torch.bool)
    if width == 0:
        weight = lm_head(vlm.model).weight
        return weight.new_zeros(0, weight.shape[1]), full_keep
    kept_ids, kept_mask = ids[:, :width], mask[:, :width]
    prompt = rollouts.prompt_inputs
    if share_prefix:
        predicting = shared_prefix_hidden(vlm, prompt, kept_ids, kept_mask)
    else:
        sequences = torch.cat([prompt["input_ids"].expand(rollouts.num, -1), kept_ids], dim=1)
        prompt_mask = prompt["attention_mask"].expand(rollouts.num, -1)
        attention = torch.cat([prompt_mask, kept_mask.to(prompt_mask.dtype)], dim=1)
        with shared_vision(vlm.model, rollouts.num if share_vision else 1):
            hidden = backbone_hidden_states(vlm.model, **sequence_inputs(prompt, sequences, attention))
        start = rollouts.prompt_length - 1
        predicting = hidden[:, start : start + width]
    keep = kept_mask.bool()
    full_keep[:, :width] = keep
    return predicting[keep], full_keep


def completion_logprobs(
    vlm: LoadedVLM,
    rollouts: Rollouts,
    *,
    temperature: float,
    backend: str = "auto",
    share_prefix: bool = True,
    share_vision: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy [N, T] (fp32, zero where masked) of each completion token under the current policy.

    The unmasked tokens' hidden states (``completion_hidden``, which the prefix/vision options go to) are mapped to
    log-probs with the fused lm_head kernel. Differentiable w.r.t. the LoRA weights when grad is enabled.
    """
    ids = rollouts.completion_ids
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    entropy = torch.zeros_like(logp)
    hidden, keep = completion_hidden(vlm, rollouts, share_prefix=share_prefix, share_vision=share_vision)
    if hidden.shape[0] == 0:
        return logp, entropy
    logp_kept, entropy_kept = kernels.linear_logprob_entropy(
        hidden, lm_head(vlm.model).weight, ids[keep], vlm.logit_bias(), temperature=temperature, backend=backend
    )
    logp = logp.to(hidden.device).masked_scatter(keep, logp_kept)
    entropy = entropy.to(hidden.device).masked_scatter(keep, entropy_kept)
    return logp, entropy


def score_rollouts(
    vlm: LoadedVLM, rollouts: Rollouts, *, temperature: float, backend: str, micro_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logprobs`` without grad, ``micro_batch`` rows at a time: (logp, entropy) [N, T]."""
    logps, entropies = [], []
    with torch.no_grad():
        for rows in chunks(rollouts.num, micro_batch):
            logp, entropy = completion_logprobs(vlm, rollouts.select(rows), temperature=temperature, backend=backend)
            logps.append(logp)
            entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)
