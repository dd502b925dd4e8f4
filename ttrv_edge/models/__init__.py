"""The model side of ttrv-edge: load a VLM with LoRA on its language model, and run its parts by hand.

``loading`` (``load_vlm`` -> ``LoadedVLM``, the policy's generation config), ``processors`` (processors without
torchvision), ``forward`` (inner model, vision tower, lm_head, hidden states without logits), ``lora`` (LoRA placement
and weight copies, snapshots), ``quantize`` (a quantized base under LoRA) and ``tiny`` (offline random VLMs).
The names below are the ones the rest of the package and its users need.
"""

from .forward import (
    VISION_TOWERS,
    backbone_hidden_states,
    base_model,
    forward_params,
    inner_model,
    lm_head,
    sequence_inputs,
    vision_tower,
)
from .loading import UNMODELLED_GENERATION_FIELDS, LoadedVLM, load_vlm, policy_generation_config, resolve_model_path
from .lora import (
    LORA_TARGET_REGEX,
    VISION_MARKERS,
    Snapshot,
    attach_lora,
    check_lora_placement,
    load_lora_state,
    lora_state,
    restore_snapshot,
    take_snapshot,
)
from .processors import image_only_processor, load_processor

__all__ = [
    "LORA_TARGET_REGEX",
    "UNMODELLED_GENERATION_FIELDS",
    "VISION_MARKERS",
    "VISION_TOWERS",
    "LoadedVLM",
    "Snapshot",
    "attach_lora",
    "backbone_hidden_states",
    "base_model",
    "check_lora_placement",
    "forward_params",
    "image_only_processor",
    "inner_model",
    "lm_head",
    "load_lora_state",
    "load_processor",
    "load_vlm",
    "lora_state",
    "policy_generation_config",
    "resolve_model_path",
    "restore_snapshot",
    "sequence_inputs",
    "take_snapshot",
    "vision_tower",
]
