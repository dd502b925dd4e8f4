"""Qwen2-VL: the vision blocks with one attention over all patches under a block-diagonal mask built in the graph
from ``segment_ids`` (one segment per image), instead of transformers' split of the sequence per image with
``.tolist()``, which does not export; the vision rope positions are an input (``runtime.families.qwen2_vl``
computes them in numpy, as it does the decoder's 3-D rope positions)."""

from __future__ import annotations

import torch

__all__ = ["MROPE", "Qwen2VLVisionGraph", "image_config", "text_model", "vision_example", "vision_graph"]

MROPE = True


class Qwen2VLVisionGraph(torch.nn.Module):
    """Qwen2-VL's vision blocks with one block-diagonal-masked attention instead of a split per image."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, rope_positions, segment_ids):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, rope_positions)
        same = segment_ids[:, None] == segment_ids[None, :]
        bias = torch.where(same, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[None, None]
        for block in visual.blocks:
            attn = block.attn
            x = block.norm1(hidden)
            q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
            hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(x.shape[0], -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


def text_model(merged):
    return merged.model.language_model


def vision_graph(merged) -> torch.nn.Module:
    return Qwen2VLVisionGraph(merged.model.visual)


def image_config(processor) -> dict:
    """Qwen2-VL's (and Qwen2.5-VL's) patching settings."""
    ip = processor.image_processor.to_dict()
    size = ip.get("size") or {}
    return {
        "min_pixels": int(size.get("shortest_edge") or ip["min_pixels"]),
        "max_pixels": int(size.get("longest_edge") or ip["max_pixels"]),
        "patch_size": int(ip["patch_size"]),
        "temporal_patch_size": int(ip["temporal_patch_size"]),
        "merge_size": int(ip["merge_size"]),
        "image_token": processor.image_token,
    }


def vision_example(batch, image_cfg: dict):
    """Pixels, vision rope positions and segment ids of the probe image (one segment)."""
    from ...runtime.families.qwen2_vl import vision_positions

    grid = tuple(int(x) for x in batch["image_grid_thw"][0])
    rope = torch.from_numpy(vision_positions(grid, image_cfg["merge_size"]))
    pixels = batch["pixel_values"].float()
    segments = torch.zeros(pixels.shape[0], dtype=torch.int64)
    axes = {"pixel_values": {0: "patches"}, "rope_positions": {0: "patches"}, "segment_ids": {0: "patches"}}
    return (pixels, rope, segments), ["pixel_values", "rope_positions", "segment_ids"], axes
