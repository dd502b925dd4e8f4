"""Step 1 of the layout change (moves only): the old ``ttrv_edge.models`` names."""

from .loading import (
    LORA_TARGET_REGEX,
    LoadedVLM,
    backbone_hidden_states,
    lm_head,
    load_lora_state,
    load_processor,
    load_vlm,
    lora_state,
    policy_generation_config,
    resolve_model_path,
    sequence_inputs,
)

__all__ = [
    "LORA_TARGET_REGEX",
    "LoadedVLM",
    "backbone_hidden_states",
    "lm_head",
    "load_lora_state",
    "load_processor",
    "load_vlm",
    "lora_state",
    "policy_generation_config",
    "resolve_model_path",
    "sequence_inputs",
]
