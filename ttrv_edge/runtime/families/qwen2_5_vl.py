"""Qwen2.5-VL inputs without torch: exactly Qwen2-VL's (``qwen2_vl.py``). Both use Qwen2-VL's image processor
(``smart_resize``, patches in merge-block order), expand ``<|image_pad|>`` to grid_h * grid_w / merge^2 tokens and
give image tokens the same 3-D rope positions (for images, ``get_rope_index`` does not scale the temporal axis).
The window attention needs no extra input: the vision graph computes each patch's window from its vision rope
position (``export/families/qwen2_5_vl.py``). Several images in one prompt: one segment each, as for Qwen2-VL
(windows never span two images)."""

from __future__ import annotations

from .qwen2_vl import MROPE, prepare, prepare_many

__all__ = ["MROPE", "prepare", "prepare_many"]
