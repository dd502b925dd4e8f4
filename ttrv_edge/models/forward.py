"""Running a loaded VLM's pieces by hand: the model under the peft wrapper, its inner model, its vision tower, its
output projection, and a forward that stops before the logits.

- ``backbone_hidden_states`` runs the VLM's inner model (vision tower + connector + text model, final norm included)
  and returns the last hidden states without computing logits, so the fused lm_head+log-prob kernel can project
  them chunk by chunk: ``lm_head(model)(backbone_hidden_states(model, **inputs))`` equals the model's logits.
- transformers 5.24's Qwen2-VL needs ``mm_token_type_ids`` to compute its 3-D rope positions.
  ``LoadedVLM.prompt_inputs`` keeps it when the forward accepts it (``forward_params``), and
  ``backbone_hidden_states`` extends it with zeros (text) when completion tokens were appended to the prompt, or
  derives it from the image token when missing.
"""

from __future__ import annotations

import inspect

import torch

__all__ = [
    "VISION_TOWERS",
    "backbone_hidden_states",
    "base_model",
    "forward_params",
    "inner_model",
    "lm_head",
    "sequence_inputs",
    "vision_tower",
]

VISION_TOWERS = ("vision_model", "visual", "vision_tower")
"""Attribute names of the vision encoder on a VLM's inner model (Idefics3/SmolVLM, Qwen2-VL, LLaVA/InternVL)."""


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def inner_model(model):
    """The VLM's inner model (vision tower + connector + text model, no lm_head)."""
    base = base_model(model)
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if inner is None or inner is base:
        raise TypeError(f"{type(base).__name__} has no inner model under .{base.base_model_prefix}")
    return inner


def forward_params(model) -> set[str]:
    """The argument names the model's forward accepts."""
    return set(inspect.signature(base_model(model).forward).parameters)


def vision_tower(model):
    """The vision encoder module of a VLM (None when it has none of the known names)."""
    inner = inner_model(model)
    for name in VISION_TOWERS:
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def lm_head(model) -> torch.nn.Linear:
    """The output projection ([V, H] weight, tied or not), through a peft wrapper if any."""
    head = base_model(model).get_output_embeddings()
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head: its frozen projection
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"expected an nn.Linear output projection, got {type(head).__name__}")
    return head


def backbone_hidden_states(model, **inputs) -> torch.Tensor:
    """Last-layer hidden states [B, L, H] of the inner model (no logits), with LoRA active.

    ``inputs`` are what the model's forward takes (input_ids, attention_mask, pixel_values, ...). For Qwen2-VL the
    inner model computes the 3-D rope positions from input_ids and image_grid_thw; an ``mm_token_type_ids`` shorter
    than input_ids (prompt only, completions appended) is extended with zeros.
    """
    inputs = {k: v for k, v in inputs.items() if v is not None}
    inner = inner_model(model)
    params = set(inspect.signature(inner.forward).parameters)
    if "mm_token_type_ids" in params and "image_grid_thw" in inputs and "input_ids" in inputs:
        inputs["mm_token_type_ids"] = _mm_token_types(model, inputs["input_ids"], inputs.get("mm_token_type_ids"))
    else:
        inputs.pop("mm_token_type_ids", None)
    inputs.pop("logits_to_keep", None)
    out = inner(**inputs, use_cache=False, return_dict=True)
    return out.last_hidden_state


def sequence_inputs(prompt_inputs, sequences: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Forward inputs for ``sequences`` [B, P + T] = one prompt (batch 1, from ``prompt_inputs``) + B completions.

    Image tensors are repeated B times along dim 0 (this holds for Idefics3's [1, n, C, H, W] pixels and for
    Qwen2-VL's [patches, D] pixels with [n, 3] grids), ``mm_token_type_ids`` is extended with zeros. The image is
    re-encoded per row; the frozen vision tower makes that wasteful but exact.
    """
    batch = sequences.shape[0]
    out = {"input_ids": sequences}
    out["attention_mask"] = torch.ones_like(sequences) if attention_mask is None else attention_mask
    for key, value in prompt_inputs.items():
        if key in ("input_ids", "attention_mask") or not torch.is_tensor(value):
            continue
        if key == "mm_token_type_ids":
            pad = value.new_zeros(value.shape[0], sequences.shape[1] - value.shape[1])
            out[key] = torch.cat([value, pad], dim=1).repeat(batch // value.shape[0], 1)
        else:
            out[key] = value.repeat(batch, *([1] * (value.dim() - 1)))
    return out


def _mm_token_types(model, input_ids: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
    if types is None:
        config = base_model(model).config
        image_id = getattr(config, "image_token_id", None)
        return (input_ids == image_id).to(torch.int32) if image_id is not None else torch.zeros_like(input_ids)
    missing = input_ids.shape[1] - types.shape[1]
    if missing > 0:
        types = torch.cat([types, types.new_zeros(types.shape[0], missing)], dim=1)
    if types.shape[0] != input_ids.shape[0] and types.shape[0] == 1:
        types = types.expand(input_ids.shape[0], -1)
    return types
