"""The VLM families ttrv-edge builds offline, one module each: chat template, special tokens, model + processor
construction from config fields, and the tiny config used by the tests and ``--model tiny-<family>``.

Every family module has the same public names, which ``ttrv_edge.models.builders`` uses:

- ``TEMPLATE``: the chat template (the family's own, reduced to image + text content);
- ``SPECIAL``: ``{"bos", "eos", "pad", "unk", "extra"}`` special tokens of its tokenizer;
- ``PADDING_SIDE``: the tokenizer's padding side;
- ``parts(config, settings, tokenizer) -> (model class, model config, processor)``;
- ``tiny_config(image_size, hidden, layers, patch) -> (config, image-processor settings)``.

The real checkpoints' tokenizers are BPEs; the builders use a WordLevel tokenizer for every family (``tokenizer.py``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["FAMILIES", "TINY_NAMES", "family"]

FAMILIES = {
    "idefics3": "Idefics3 (SmolVLM)",
    "smolvlm": "SmolVLM2",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "internvl": "InternVL (transformers-native)",
    "llava": "LLaVA",
}
"""transformers ``model_type`` -> the family's name as users know it."""

TINY_NAMES = {
    "tiny": "idefics3",
    "tiny-idefics3": "idefics3",
    "tiny-smolvlm2": "smolvlm",
    "tiny-qwen2-vl": "qwen2_vl",
    "tiny-qwen2_vl": "qwen2_vl",  # the name earlier versions recorded in adapters
    "tiny-qwen2.5-vl": "qwen2_5_vl",
    "tiny-internvl": "internvl",
    "tiny-llava": "llava",
}
"""``--model`` names of the offline tiny models ("tiny" is tiny-idefics3) -> model type."""


def family(model_type: str) -> ModuleType:
    """The builder module of ``model_type``; ValueError naming the known families otherwise."""
    if model_type not in FAMILIES:
        raise ValueError(f"no offline builder for model type {model_type!r} ({', '.join(FAMILIES)})")
    return importlib.import_module(f"{__name__}.{model_type}")
