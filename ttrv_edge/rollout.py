"""Sampling rollouts and scoring their completion tokens.

``sample_rollouts`` draws N answers for one prompt; ``completion_logprobs`` computes each completion token's
log-prob and entropy under the current policy from the language model's last hidden states through
``kernels.linear_logprob_entropy``, so the [N, T, V] logits tensor of a plain forward never exists.

Sampling uses the full distribution at the given temperature (no top-k or top-p truncation), so the sampling
policy is the policy whose log-probs the loss uses, with one exception: image placeholders and padding
(``LoadedVLM.suppress_token_ids``, set in the generation config by ``load_vlm``) are never sampled. A trained model
never emits them, a random or shifted one may, and an image token in a completion would break the next forward.
Their probability mass is tiny for a real model, so the log-probs of the loss ignore the suppression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels
from .models import LoadedVLM, backbone_hidden_states, lm_head, sequence_inputs


@dataclass
class Rollouts:
    """N sampled completions of one prompt."""

    prompt_inputs: dict  # the processor's output for the single prompt (batch of 1)
    completion_ids: torch.Tensor  # [N, T] long, padded after EOS
    completion_mask: torch.Tensor  # [N, T] float, 1 up to and including EOS
    texts: list[str]

    @property
    def num(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def prompt_length(self) -> int:
        return self.prompt_inputs["input_ids"].shape[1]


def completion_mask(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1.0 for every token up to and including the first EOS of each row, 0.0 after it."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device))
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).float()


def _generate(vlm: LoadedVLM, inputs: dict, num: int, max_new_tokens: int, temperature: float | None):
    sampling = temperature is not None
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        num_return_sequences=num,
        eos_token_id=vlm.eos_token_ids,
        pad_token_id=vlm.pad_token_id,
    )
    if sampling:
        kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
    with torch.no_grad():
        sequences = vlm.model.generate(**inputs, **kwargs)
    completions = sequences[:, inputs["input_ids"].shape[1] :]
    mask = completion_mask(completions, vlm.eos_token_ids)
    texts = decode(vlm, completions, mask)
    return completions, mask, texts


def decode(vlm: LoadedVLM, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The completions' text, special tokens (EOS, padding) removed."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completions, mask)]
    return vlm.tokenizer.batch_decode(rows, skip_special_tokens=True)


def sample_rollouts(
    vlm: LoadedVLM, inputs: dict, num: int, *, temperature: float, max_new_tokens: int, seed: int
) -> Rollouts:
    """Sample ``num`` completions of the prompt ``inputs`` (batch of 1) at ``temperature``, reproducibly."""
    torch.manual_seed(seed)
    completions, mask, texts = _generate(vlm, inputs, num, max_new_tokens, temperature)
    return Rollouts(prompt_inputs=inputs, completion_ids=completions, completion_mask=mask, texts=texts)


def greedy_text(vlm: LoadedVLM, inputs: dict, *, max_new_tokens: int) -> str:
    """The greedy (temperature 0) answer text for the prompt ``inputs``."""
    _, _, texts = _generate(vlm, inputs, 1, max_new_tokens, None)
    return texts[0]


def completion_logprobs(
    vlm: LoadedVLM, rollouts: Rollouts, *, temperature: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob and entropy [N, T] (fp32, zero where masked) of each completion token under the current policy.

    Runs the backbone on prompt + completion, takes the hidden states that predict the completion tokens, keeps
    only the unmasked ones, and maps them to log-probs with the fused lm_head kernel. Differentiable w.r.t. the
    LoRA weights when grad is enabled.
    """
    ids, mask = rollouts.completion_ids, rollouts.completion_mask
    prompt = rollouts.prompt_inputs
    sequences = torch.cat([prompt["input_ids"].expand(rollouts.num, -1), ids], dim=1)
    prompt_mask = prompt["attention_mask"].expand(rollouts.num, -1)
    attention = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    hidden = backbone_hidden_states(vlm.model, **sequence_inputs(prompt, sequences, attention))
    start = rollouts.prompt_length - 1
    predicting = hidden[:, start : start + ids.shape[1]]
    keep = mask.bool()
    head = lm_head(vlm.model)
    logp_kept, entropy_kept = kernels.linear_logprob_entropy(
        predicting[keep], head.weight, ids[keep], head.bias, temperature=temperature, backend=backend
    )
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
    entropy = torch.zeros_like(logp)
    logp = logp.masked_scatter(keep, logp_kept)
    entropy = entropy.masked_scatter(keep, entropy_kept)
    return logp, entropy
