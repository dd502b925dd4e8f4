"""SmolVLM2: Idefics3's graphs (``idefics3.py``): SigLIP tower + pixel-shuffle connector on full-size crops (every
crop of a split image is ``max_image_size`` square, so the patch mask is all ones), the Llama text model.

SmolVLM2's model keeps Idefics3's module names (``vision_model``, ``connector``, ``text_model``); only the
processor's name of the global-view token differs (``global_image_token``, Idefics3: ``global_image_tag``)."""

from __future__ import annotations

from .idefics3 import MROPE, image_config, text_model, vision_example, vision_graph

__all__ = ["MROPE", "image_config", "text_model", "vision_example", "vision_graph"]
