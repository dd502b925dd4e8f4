"""Sampling rollouts from a shared prompt prefix.

``sample_rollouts`` draws N answers for one prompt. The image is encoded and the prompt prefilled once (batch 1,
``input_ids[:, :-1]`` into a KV cache); the cache is then expanded to each micro-batch of rows and the N
continuations are sampled from it by ``generate``, which feeds only the last prompt token and the new ones. Plain
``generate(num_return_sequences=N)`` instead repeats the inputs, image included, N times before the prefill. With
Qwen2-VL the 3-D rope offset (``rope_deltas``) that the prefill stores on the model carries over to the decode
steps; a test checks that the decode logits equal plain ``generate``'s. The cache argument is named ``cache`` from
transformers 5.24 (``past_key_values`` before); both are supported.

Sampling and training use one distribution: softmax((logits + b) / T), where b is -inf at the suppressed ids
(image placeholders and padding, ``LoadedVLM.suppress_token_ids``: a sampled image token would break the next
forward) and 0 elsewhere. ``generate`` gets an explicit ``GenerationConfig`` built here (EOS, pad, max new tokens,
the suppressed ids, no top-k/top-p) and one logits processor of ours, ``PolicyWarper``, which applies the
temperature last and records the log-prob of every sampled token under the final, post-processor distribution
(``Rollouts.sampler_logp``). The loss passes the same b into the fused lm_head op (``LoadedVLM.logit_bias``,
``scoring.py``), and the update reports the largest difference between the two as ``logprob_gap`` (``loss.py``).
Settings of a checkpoint's generation config that the loss cannot model (repetition penalty, n-gram blocking,
min-p, ...) are dropped by ``load_vlm``, which says so once on stderr.

Micro-batches change how the sampler's random stream is consumed: the same seed and the same micro-batch size give
the same rollouts; a different micro-batch size gives different (equally valid) rollouts.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..memory.backoff import chunks, run_with_backoff
from ..memory.costs import WorkShape
from ..memory.planner import MemoryPlanner
from ..models.forward import base_model, inner_model
from ..models.loading import UNMODELLED_GENERATION_FIELDS, LoadedVLM


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


def cache_argument(model) -> str:
    """The name under which this transformers version's forward/generate takes a KV cache."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


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
    inner = inner_model(vlm.model)
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
    vision = getattr(base_model(vlm.model).config, "vision_config", None)
    patch = getattr(vision, "patch_size", 0) or 0
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)  # InternViT's is (height, width)
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
