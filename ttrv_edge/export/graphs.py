"""The modules ``ttrv_edge.export.onnx`` hands to ``torch.onnx.export``, and the per-architecture details around them.

Each graph is a thin wrapper that calls the model's own submodules (so the merged weights and the model code are
what gets traced), with the parts that do not trace replaced by inputs or plain ops:

- ``DecoderGraph``: embedding lookup, image features written into the image-token rows (the models'
  ``masked_scatter`` as cumsum + gather + where, which also works with zero features in decode steps), the text
  model with a ``DynamicCache`` rebuilt from flat past tensors, the lm_head on the last position. Mask and position
  ids are inputs: transformers' mask helpers branch on shapes, and Qwen2-VL's 3-D rope positions come from a loop
  over the prompt (``ttrv_edge.runtime.preprocess`` computes them in numpy).
- ``Idefics3VisionGraph``: SigLIP tower + pixel-shuffle connector on full-size crops (patch mask all ones).
- ``Qwen2VLVisionGraph``: Qwen2-VL's vision blocks with one attention over all patches under a block-diagonal mask
  built in the graph from ``segment_ids`` (one segment per image), instead of transformers' split of the sequence
  per image with ``.tolist()``, which does not export; rope positions are an input.

Example inputs use sizes of at least 2 in every dynamic dimension: ``torch.export`` specialises a size-1 dimension.
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image, ImageDraw

IDEFICS3_TYPES = ("idefics3",)  # SmolVLM(-256M/500M/2B) checkpoints are Idefics3; SmolVLM2 is not tested
QWEN2_VL_TYPES = ("qwen2_vl",)

__all__ = [
    "DecoderGraph",
    "Idefics3VisionGraph",
    "Qwen2VLVisionGraph",
    "architecture",
    "decoder_example",
    "image_config",
    "probe_image",
    "text_model",
    "vision_example",
]


class DecoderGraph(torch.nn.Module):
    """Embedding + image-feature merge + text model + lm_head, with the KV cache as flat tensors.

    The merge is the models' ``masked_scatter`` written with plain ops that also work with zero features (decode
    steps): the k-th image token takes row k of ``image_features`` (padded with one zero row so the gather never
    reads an empty tensor)."""

    def __init__(self, text_model, head, image_token_id: int):
        super().__init__()
        self.text, self.head, self.config = text_model, head, text_model.config
        self.embed = text_model.get_input_embeddings()
        self.image_token_id = image_token_id
        # transformers 5.24 names the cache argument `cache`, earlier 5.x `past_key_values`
        params = inspect.signature(text_model.forward).parameters
        self.cache_argument = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, image_features, attention_mask, position_ids, past):
        from transformers import DynamicCache

        embeds = self.embed(input_ids)
        is_image = input_ids == self.image_token_id
        index = (torch.cumsum(is_image.to(torch.int64), dim=-1) - 1).clamp(min=0)
        padded = torch.cat([image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])])
        embeds = torch.where(is_image[..., None], padded[index], embeds)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.config)
        kwargs = {self.cache_argument: cache}
        out = self.text(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
        )
        logits = self.head(out.last_hidden_state[:, -1])
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


class Idefics3VisionGraph(torch.nn.Module):
    """SigLIP tower + pixel-shuffle connector; every crop is full size, so the patch mask is all ones."""

    def __init__(self, inner):
        super().__init__()
        self.vision, self.connector = inner.vision_model, inner.connector

    def forward(self, pixel_values):
        features = self.connector(self.vision(pixel_values=pixel_values).last_hidden_state)
        return features.reshape(-1, features.shape[-1])


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


# ----------------------------------------------------------------------------------------------- architectures


def probe_image(size: int = 64) -> Image.Image:
    """A fixed synthetic image (red circle, blue square on white) used for example inputs and the self-check."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(220, 30, 30))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.9), fill=(30, 60, 220))
    return image


def architecture(model) -> str:
    """ "idefics3" or "qwen2_vl" for a transformers VLM; ValueError naming --model for anything else."""
    model_type = model.config.model_type
    if model_type in IDEFICS3_TYPES:
        return "idefics3"
    if model_type in QWEN2_VL_TYPES:
        return "qwen2_vl"
    raise ValueError(f"--model: ONNX export supports Idefics3 (SmolVLM) and Qwen2-VL, not {model_type!r}")


def text_model(model, arch: str):
    """The language model (decoder stack + final norm, no lm_head) of a merged VLM."""
    return model.model.text_model if arch == "idefics3" else model.model.language_model


def image_config(processor, arch: str) -> dict:
    """The manifest's ``preprocess`` section: the processor's image settings, flattened for runtime/preprocess.py."""
    ip = processor.image_processor.to_dict()
    common = {k: ip.get(k) for k in ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean")}
    common.update(image_std=ip.get("image_std"), resample=int(ip.get("resample") or 3), kind=arch)
    if arch == "idefics3":
        return common | {
            "longest_edge": int(ip["size"]["longest_edge"]),
            "max_image_size": int(ip["max_image_size"]["longest_edge"]),
            "do_image_splitting": bool(ip.get("do_image_splitting")),
            "image_seq_len": int(processor.image_seq_len),
            "image_token": processor.image_token,
            "fake_image_token": processor.fake_image_token,
            "global_image_token": processor.global_image_tag,
        }
    size = ip.get("size") or {}
    return common | {
        "min_pixels": int(size.get("shortest_edge") or ip["min_pixels"]),
        "max_pixels": int(size.get("longest_edge") or ip["max_pixels"]),
        "patch_size": int(ip["patch_size"]),
        "temporal_patch_size": int(ip["temporal_patch_size"]),
        "merge_size": int(ip["merge_size"]),
        "image_token": processor.image_token,
    }


def vision_example(arch: str, batch, image_cfg: dict):
    """Example inputs and dynamic axes of the vision graph, from the processor's output for the probe image."""
    if arch == "idefics3":
        pixels = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:]).float()
        pixels = torch.cat([pixels, pixels.flip(-1)]) if pixels.shape[0] == 1 else pixels  # a size-1 dim would freeze
        return (pixels,), ["pixel_values"], {"pixel_values": {0: "num_crops"}}
    from ..runtime.preprocess import qwen2vl_vision_positions

    grid = tuple(int(x) for x in batch["image_grid_thw"][0])
    rope = torch.from_numpy(qwen2vl_vision_positions(grid, image_cfg["merge_size"]))
    pixels = batch["pixel_values"].float()
    segments = torch.zeros(pixels.shape[0], dtype=torch.int64)
    axes = {"pixel_values": {0: "patches"}, "rope_positions": {0: "patches"}, "segment_ids": {0: "patches"}}
    return (pixels, rope, segments), ["pixel_values", "rope_positions", "segment_ids"], axes


def decoder_example(text_config, arch: str, image_token_id: int, seq: int = 5, past: int = 3):
    """Example inputs (5 tokens, 2 of them image tokens, a past of 3), names, dynamic axes and the KV layout."""
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layers = text_config.num_hidden_layers
    ids = torch.tensor([[1, image_token_id, image_token_id, 2, 3]], dtype=torch.int64)[:, :seq]
    features = torch.randn(2, text_config.hidden_size)
    mask = torch.zeros(1, 1, seq, past + seq)
    positions = torch.arange(past, past + seq)[None]
    positions = positions[None].expand(3, 1, seq).contiguous() if arch == "qwen2_vl" else positions
    pasts = [torch.randn(1, kv_heads, past, head_dim) for _ in range(2 * layers)]
    names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    axes = {"input_ids": {1: "sequence"}, "image_features": {0: "image_tokens"}}
    axes["attention_mask"] = {2: "sequence", 3: "total"}
    axes["position_ids"] = {positions.dim() - 1: "sequence"}
    axes["past"] = [{2: "past"} for _ in names]
    inputs = ["input_ids", "image_features", "attention_mask", "position_ids", *names]
    outputs = ["logits"] + [name.replace("past_", "present_") for name in names]
    info = {
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": text_config.hidden_size,
    }
    return (ids, features, mask, positions, pasts), inputs, outputs, axes, info
