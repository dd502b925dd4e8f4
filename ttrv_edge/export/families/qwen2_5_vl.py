"""Qwen2.5-VL: the vision blocks with window attention as one attention over all patches under block-diagonal
masks, instead of transformers' window reordering and split of the sequence per window with ``.tolist()``.

transformers reorders the patches window by window (``get_vision_window_index``: the merged-token grid cut into
``window_size // merge // patch`` squares, padded at the right and bottom edges), splits the sequence per window
(``cu_window_seqlens``) in the windowed blocks and per image (``cu_seqlens``) in the ``fullatt_block_indexes``
blocks, then undoes the reordering after the merger. None of that exports (data-dependent loops and splits). Here:

- the window of a patch is computed in the graph from its (row, col) rope position: ``position // span`` with
  ``span = window_size // merge // patch * merge`` patches (``window_of``), which is the window that
  ``get_vision_window_index`` puts it in; two patches share a window when they share the image (``segment_ids``)
  and both window coordinates;
- windowed blocks attend under the same-window mask, full-attention blocks under the same-image mask;
- the reordering is skipped: attention under a mask, RMSNorm, the MLP and the merger (which merges the
  merge x merge block of each merged token, contiguous in the processor's patch order as in the window order) are
  all equivariant to the order of the patches, so the output in patch order is transformers' output after its
  inverse permutation (up to float summation order).

Cost: every block scores all N x N patch pairs and masks them, so the windowed blocks lose the windows' savings
(N^2 instead of N x window); for the image sizes an edge export targets (a few hundred to a few thousand patches)
that is the price of a graph without data-dependent splits.

The runtime feeds the same inputs as for Qwen2-VL (``runtime.families.qwen2_vl``: patches, vision rope positions,
one segment per image), so the manifest needs nothing of the window settings: they are constants of the graph.
"""

from __future__ import annotations

import torch

from .qwen2_vl import MROPE, image_config, text_model, vision_example

__all__ = [
    "MROPE",
    "Qwen2_5_VLVisionGraph",
    "image_config",
    "text_model",
    "vision_example",
    "vision_graph",
    "window_of",
    "window_span",
]


def window_of(rope_positions: torch.Tensor, span: int) -> torch.Tensor:
    """[N, 2] (window row, window col) of each patch from its (row, col) vision rope position, for windows of
    ``span`` x ``span`` patches starting at the image's top-left corner."""
    return torch.div(rope_positions, span, rounding_mode="floor")


def window_span(vision_config) -> int:
    """Patches per window side: ``window_size // merge // patch`` merged tokens of ``merge`` patches."""
    merge = vision_config.spatial_merge_size
    return vision_config.window_size // merge // vision_config.patch_size * merge


class Qwen2_5_VLVisionGraph(torch.nn.Module):
    """Qwen2.5-VL's vision blocks with same-window / same-image masked attention instead of per-window splits."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual
        self.span = window_span(visual.config)
        self.full = {int(i) for i in visual.config.fullatt_block_indexes}

    def forward(self, pixel_values, rope_positions, segment_ids):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, rope_positions)
        window = window_of(rope_positions, self.span)
        same_image = segment_ids[:, None] == segment_ids[None, :]
        same_window = same_image & (window[:, None, :] == window[None, :, :]).all(-1)
        lowest = torch.finfo(hidden.dtype).min
        full_bias = torch.where(same_image, 0.0, lowest).to(hidden.dtype)[None, None]
        window_bias = torch.where(same_window, 0.0, lowest).to(hidden.dtype)[None, None]
        for index, block in enumerate(visual.blocks):
            attn = block.attn
            x = block.norm1(hidden)
            q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            bias = full_bias if index in self.full else window_bias
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
            hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(x.shape[0], -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


def vision_graph(merged) -> torch.nn.Module:
    return Qwen2_5_VLVisionGraph(merged.model.visual)
