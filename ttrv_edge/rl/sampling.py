"""Sampling rollouts from a shared prompt prefix, and scoring their completion tokens.

``sample_rollouts`` draws N answers for one prompt. The image is encoded and the prompt prefilled once (batch 1,
``input_ids[:, :-1]`` into a KV cache); the cache is then expanded to each micro-batch of rows and the N
continuations are sampled from it by ``generate``, which feeds only the last prompt token and the new ones. Plain
``generate(num_return_sequences=N)`` instead repeats the inputs, image included, N times before the prefill. With
Qwen2-VL the 3-D rope offset (``rope_deltas``) that the prefill stores on the model carries over to the decode
steps; a test checks that the decode logits equal plain ``generate``'s. The cache argument is named ``cache`` from
transformers 5.24 (``past_key_values`` before); both are supported.

``completion_logprobs`` computes each completion token's log-prob and entropy under the current policy from the
language model's last hidden states through ``kernels.linear_logprob_entropy``, so the [N, T, V] logits of a plain
forward never exist. The prompt's hidden states depend on LoRA, so they are recomputed with grad, but only once per
micro-batch: ``shared_prefix_hidden`` runs the prompt (image included) once, batch 1, and the N completions attend
to its KV cache expanded to N rows; autograd sums their gradients through the shared prompt, so log-probs and
gradients equal those of N rows of prompt + completion (a test checks both) at the cost of P + N x T tokens instead
of N x (P + T), in compute and in activation memory. The N-row path remains (``share_prefix=False``); there
``shared_vision`` runs the frozen tower on one copy of the image and tiles its output for the N rows (forward hooks
on the tower module, removed on exit) instead of encoding the image N times.

Sampling and training use one distribution: softmax((logits + b) / T), where b is -inf at the suppressed ids
(image placeholders and padding, ``LoadedVLM.suppress_token_ids``: a sampled image token would break the next
forward) and 0 elsewhere. ``generate`` gets an explicit ``GenerationConfig`` built here (EOS, pad, max new tokens,
the suppressed ids, no top-k/top-p) and one logits processor of ours, ``PolicyWarper``, which applies the
temperature last and records the log-prob of every sampled token under the final, post-processor distribution
(``Rollouts.sampler_logp``). The loss passes the same b into the fused lm_head op (``LoadedVLM.logit_bias``), and
the update reports the largest difference between the two as ``logprob_gap``. Settings of a checkpoint's
generation config that the loss cannot model (repetition penalty, n-gram blocking, min-p, ...) are dropped by
``load_vlm``, which says so once on stderr.

Micro-batches change how the sampler's random stream is consumed: the same seed and the same micro-batch size give
the same rollouts; a different micro-batch size gives different (equally valid) rollouts.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .. import kernels
from ..memory.planner import MemoryPlanner, WorkShape, chunks, run_with_backoff
from ..models.loading import (
    UNMODELLED_GENERATION_FIELDS,
    LoadedVLM,
    _base,
    _inner,
    backbone_hidden_states,
    lm_head,
    sequence_inputs,
)

VISION_TOWERS = ("vision_model", "visual", "vision_tower")
"""Attribute names of the vision encoder on a VLM's inner model (Idefics3/SmolVLM, Qwen2-VL, LLaVA/InternVL)."""


@dataclass
class Rollouts:
    """N sampled completions of one prompt."""

    prompt_inputs: dict  # the processor's output for the single prompt (batch of 1)
    completion_ids: torch.Tensor  # [N, T] long, padded after EOS
    completion_mask: torch.Tensor  # [N, T] float, 1 up to and including EOS
    texts: list[str]
    sampler_logp: torch.Tensor | None = None  # [N, T] fp32: each token's log-prob under the sampler (after all
    # logits processors), for ``logprob_gap``; None for rollouts built by hand

    @property
    def num(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_inputs["input_ids"].shape[1]

    def select(self, rows: slice) -> Rollouts:
        """The rollouts ``rows`` of this group (same prompt)."""
        return replace(
            self,
            completion_ids=self.completion_ids[rows],
            completion_mask=self.completion_mask[rows],
            texts=self.texts[rows],
            sampler_logp=None if self.sampler_logp is None else self.sampler_logp[rows],
        )


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1.0 for every token up to and including the first EOS of each row, 0.0 after it."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def decode(vlm: LoadedVLM, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The completions' text, special tokens (EOS, padding) removed."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completions, mask)]
    return vlm.tokenizer.batch_decode(rows, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- sampling


def cache_argument(model) -> str:
    """The name under which this transformers version's forward/generate takes a KV cache."""
    return "cache" if "cache" in inspect.signature(_base(model).forward).parameters else "past_key_values"


class PolicyWarper(LogitsProcessor):
    """The last logits processor of sampling: divides by the temperature and records, for every row, the log-prob
    of each sampled token under the final distribution (after every processor, as ``output_scores`` reports it).

    transformers appends its own temperature warper after custom processors, so the temperature is applied here
    instead (the generation config keeps T = 1). A call sees the previous step's chosen token as the last column of
    ``input_ids``; ``finish`` gathers the last step's. Memory: one [rows, V] log-softmax, not one per step.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature if self.temperature != 1.0 else scores
        if self.previous is not None:
            self.logps.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, t] log-probs of ``new_tokens`` (the generated columns) under the sampling distribution."""
        if self.previous is not None and len(self.logps) < new_tokens.shape[1]:
            self.logps.append(self.previous.gather(1, new_tokens[:, -1:]).squeeze(1))
        self.previous = None
        if not self.logps:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.logps[: new_tokens.shape[1]], dim=1)


def generation_config(vlm: LoadedVLM, max_new_tokens: int, temperature: float | None) -> GenerationConfig:
    """The complete sampling (or greedy, temperature None) configuration: nothing is left for transformers to fill
    in from the model's generation config, and no processor but the suppression of ``vlm.suppress_token_ids``."""
    sampling_only = ("top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # flagged by greedy configs
    neutral = {
        k: v
        for k, v in UNMODELLED_GENERATION_FIELDS.items()
        if v is not None and k != "min_new_tokens" and (temperature is not None or k not in sampling_only)
    }
    return GenerationConfig(
        **neutral,
        max_new_tokens=max_new_tokens,
        do_sample=temperature is not None,
        temperature=1.0,
        num_beams=1,
        eos_token_id=vlm.eos_token_ids,
        pad_token_id=vlm.pad_token_id,
        suppress_tokens=vlm.suppress_token_ids or None,
    )


def prefill(vlm: LoadedVLM, inputs: dict):
    """KV cache of the prompt minus its last token, image included (batch 1, no grad, no logits)."""
    prefix = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in prefix and torch.is_tensor(prefix[key]):
            prefix[key] = prefix[key][:, :-1]
    prefix = {k: v for k, v in prefix.items() if v is not None}
    inner = _inner(vlm.model)
    if "mm_token_type_ids" in prefix and "mm_token_type_ids" not in inspect.signature(inner.forward).parameters:
        del prefix["mm_token_type_ids"]
    with torch.no_grad():
        out = inner(**prefix, use_cache=True, return_dict=True)
    cache = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
    if cache is None:
        raise TypeError(f"{type(inner).__name__} returned no KV cache from its prefill")
    return cache


def expand_cache(cache, rows: int):
    expanded = copy.deepcopy(cache)
    if rows > 1:
        expanded.batch_repeat_interleave(rows)
    return expanded


def _generate(vlm: LoadedVLM, call: dict, prompt_length: int, config, temperature: float | None):
    """One ``generate`` call under ``config``: the new tokens [rows, t] and their sampler log-probs (None when
    greedy)."""
    warper = PolicyWarper(temperature) if temperature is not None else None
    processors = LogitsProcessorList([warper] if warper is not None else [])
    with torch.no_grad():
        sequences = vlm.model.generate(**call, generation_config=config, logits_processor=processors)
    new = sequences[:, prompt_length:]
    return new, (warper.finish(new) if warper is not None else None)


def _decode_from(vlm: LoadedVLM, inputs: dict, cache, rows: int, config, temperature: float | None):
    """``rows`` continuations of the prompt decoded from its prefilled ``cache``: ([rows, t] tokens, log-probs)."""
    ids = inputs["input_ids"]
    attention = inputs.get("attention_mask")
    call = {"input_ids": ids.repeat(rows, 1), cache_argument(vlm.model): expand_cache(cache, rows)}
    if attention is not None:
        call["attention_mask"] = attention.repeat(rows, 1)
    return _generate(vlm, call, ids.shape[1], config, temperature)


def _decode_plain(vlm: LoadedVLM, inputs: dict, rows: int, config, temperature: float | None):
    """``rows`` continuations by plain ``generate(num_return_sequences=rows)`` (inputs and image repeated)."""
    config = copy.deepcopy(config)
    config.num_return_sequences = rows
    return _generate(vlm, dict(inputs), inputs["input_ids"].shape[1], config, temperature)


def _pad_columns(parts: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    width = max(p.shape[1] for p in parts)
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=pad_id) for p in parts]
    return torch.cat(padded, dim=0)


def work_shape(vlm: LoadedVLM, inputs: dict, new_tokens: int) -> WorkShape:
    """The ``WorkShape`` of one prompt (for the memory planner)."""
    vision = getattr(_base(vlm.model).config, "vision_config", None)
    patch = int(getattr(vision, "patch_size", 0) or 0)
    temporal = int(getattr(vision, "temporal_patch_size", 1) or 1)
    return WorkShape.of(inputs, new_tokens, patch, temporal)


@dataclass
class Completions:
    """Decoded completions of one prompt: tokens, masks and (when sampled) the sampler's log-probs."""

    ids: torch.Tensor  # [num, T] long, padded after EOS
    mask: torch.Tensor  # [num, T] float, 1 up to and including EOS
    sampler_logp: torch.Tensor | None  # [num, T] fp32, log-prob of each token under the sampling distribution


def generate_completions(
    vlm: LoadedVLM,
    inputs: dict,
    num: int,
    *,
    max_new_tokens: int,
    temperature: float | None,
    seed: int | None = None,
    micro_batch: int | None = None,
    shared_prefix: bool = True,
    memory: MemoryPlanner | None = None,
) -> Completions:
    """``num`` completions, decoded in micro-batches (greedy when temperature is None).

    ``shared_prefix``: prefill the prompt once and decode every micro-batch from that cache; otherwise plain
    ``generate(num_return_sequences=...)``. The micro-batch size is ``micro_batch``, else the planner's choice,
    else ``num``; an out-of-memory error halves it and restarts sampling from ``seed``.
    """
    config = generation_config(vlm, max_new_tokens, temperature)
    shape = work_shape(vlm, inputs, max_new_tokens)
    rows = micro_batch or (memory.micro_batch("sample", num, shape) if memory is not None else num)
    prefix = None

    def attempt(size: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        nonlocal prefix
        if seed is not None:
            torch.manual_seed(seed)
        if shared_prefix and prefix is None:
            prefix = prefill(vlm, inputs)
        parts = []
        for part in chunks(num, size):
            count = part.stop - part.start
            if shared_prefix:
                parts.append(_decode_from(vlm, inputs, prefix, count, config, temperature))
            else:
                parts.append(_decode_plain(vlm, inputs, count, config, temperature))
        return parts

    parts, _ = run_with_backoff(attempt, min(rows, num), phase="sample", shape=shape, planner=memory, device=vlm.device)
    ids = _pad_columns([tokens for tokens, _ in parts], vlm.pad_token_id)
    logps = None if temperature is None else _pad_columns([logp for _, logp in parts], 0.0)
    return Completions(ids, completion_mask(ids, vlm.eos_token_ids), logps)


def sample_rollouts(
    vlm: LoadedVLM,
    inputs: dict,
    num: int,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    micro_batch: int | None = None,
    shared_prefix: bool = True,
    memory: MemoryPlanner | None = None,
) -> Rollouts:
    """Sample ``num`` completions of the prompt ``inputs`` (batch of 1) at ``temperature``, reproducibly."""
    sampled = generate_completions(
        vlm,
        inputs,
        num,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=seed,
        micro_batch=micro_batch,
        shared_prefix=shared_prefix,
        memory=memory,
    )
    texts = decode(vlm, sampled.ids, sampled.mask)
    return Rollouts(inputs, sampled.ids, sampled.mask, texts, sampled.sampler_logp)


def greedy_text(vlm: LoadedVLM, inputs: dict, *, max_new_tokens: int) -> str:
    """The greedy (temperature 0) answer text for the prompt ``inputs`` (one row: nothing to share)."""
    greedy = generate_completions(vlm, inputs, 1, max_new_tokens=max_new_tokens, temperature=None, shared_prefix=False)
    return decode(vlm, greedy.ids, greedy.mask)[0]


# ---------------------------------------------------------------------------------------------- scoring


def vision_tower(model):
    """The vision encoder module of a VLM (None when it has none of the known names)."""
    inner = _inner(model)
    for name in VISION_TOWERS:
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


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
    output ``copies`` times: exact for a frozen tower, and ``copies - 1`` image encodings cheaper."""
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
    inner = _inner(vlm.model)
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

    Computes the hidden states that predict the completion tokens (trailing all-padding columns dropped), keeps
    only the unmasked ones, and maps them to log-probs with the fused lm_head kernel. Differentiable w.r.t. the
    LoRA weights when grad is enabled. ``share_prefix``: run the prompt once for the N rows
    (``shared_prefix_hidden``); otherwise run N rows of prompt + completion, with ``share_vision`` encoding the image
    once for them (``shared_vision``) instead of N times.
    """
    ids, mask = rollouts.completion_ids, rollouts.completion_mask
    width = int(mask.sum(0).nonzero().max()) + 1 if bool(mask.any()) else 0
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    entropy = torch.zeros_like(logp)
    if width == 0:
        return logp, entropy
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
    head = lm_head(vlm.model)
    logp_kept, entropy_kept = kernels.linear_logprob_entropy(
        predicting[keep], head.weight, kept_ids[keep], vlm.logit_bias(), temperature=temperature, backend=backend
    )
    full_keep = torch.zeros_like(mask, dtype=torch.bool)
    full_keep[:, :width] = keep
    logp = logp.to(predicting.device).masked_scatter(full_keep, logp_kept)
    entropy = entropy.to(predicting.device).masked_scatter(full_keep, entropy_kept)
    return logp, entropy


# ---------------------------------------------------------------------------------------------- the loss, micro-batched


def train_shape(vlm: LoadedVLM, groups: list[Rollouts]) -> WorkShape:
    """The ``WorkShape`` of a loss forward over ``groups`` (longest prompt, widest completion)."""
    first = work_shape(vlm, groups[0].prompt_inputs, 0)
    prompt = max(r.prompt_length for r in groups)
    width = max(r.completion_ids.shape[1] for r in groups)
    return WorkShape(prompt, width, first.vision_tokens)


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
