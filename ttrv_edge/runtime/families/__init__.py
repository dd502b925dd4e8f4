"""How the ONNX runner prepares one prompt for each exported family, without torch or transformers.

Every family module has the same public names, which ``ttrv_edge.runtime.runner`` uses:

- ``MROPE``: True when the decoder takes 3-D position ids [3, 1, L] (then a decode step's position is repeated
  over the three rows), False for [1, L];
- ``prepare(image, prompt, pre, chat, image_token_id) -> Prepared``: token ids, vision-graph feeds and position ids
  of the rendered ``prompt`` (which holds the family's image marker once) for ``image`` (RGB PIL), with ``pre``
  the manifest's ``preprocess`` section and ``chat`` the ``ChatPrompt`` (its ``encode``);
- optionally ``prepare_many(images, prompt, pre, chat, image_token_id)``: the same for a prompt holding one marker
  per image, in order (multi-image prompts; the runner refuses several images for a family without it).

The manifest's ``architecture`` (the family's transformers ``model_type``) names the module.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["RUNTIME_FAMILIES", "runtime_family"]

RUNTIME_FAMILIES = ("idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "internvl", "llava")


def runtime_family(architecture: str) -> ModuleType:
    """The runtime module of an export's ``architecture``; ValueError naming --onnx otherwise."""
    if architecture not in RUNTIME_FAMILIES:
        known = ", ".join(RUNTIME_FAMILIES)
        raise ValueError(f"--onnx: this runtime cannot run architecture {architecture!r} ({known})")
    return importlib.import_module(f"{__name__}.{architecture}")
