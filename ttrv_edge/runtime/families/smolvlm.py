"""SmolVLM2 inputs without torch: exactly Idefics3's (``idefics3.py``). SmolVLM2's PIL image processor is
Idefics3's under a new name (longest edge resized, then ``max_image_size`` crops plus a global view, or one square
view), and ``SmolVLMProcessor`` expands ``<image>`` as Idefics3's does (``get_image_prompt_string``: the
``<fake_token_around_image><row_i_col_j>`` blocks, then ``<fake_token_around_image><global-img>`` and the
image tokens). Positions are 0..L-1. Several images in one prompt: their crops concatenated, as for Idefics3."""

from __future__ import annotations

from .idefics3 import MROPE, prepare, prepare_many

__all__ = ["MROPE", "prepare", "prepare_many"]
