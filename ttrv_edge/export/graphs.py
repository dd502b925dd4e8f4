"""The modules ``ttrv_edge.export.onnx`` hands to ``torch.onnx.export``, and the per-architecture details around them.

Each graph is a thin wrapper that calls the model's own submodules (so the merged weights and the model code are
what gets traced), with the parts that do not trace replaced by inputs or plain ops:

- ``DecoderGraph``: embedding lookup, image features written into the image-token rows (the models'
  ``masked_scatter`` as cumsum + gather + where, which also works with zero features in decode steps), the text
  model with a ``DynamicCache`` rebuilt from flat past tensors, the lm_head on the last position. Mask and position
  ids are inputs: transformers' mask helpers branch on shapes, and Qwen2-VL's 3-D rope positions come from a loop
  over the prompt (``ttrv_edge.runtime.families.qwen2_vl`` computes them in numpy).
- the vision graphs, one per family: ``export/families/``.

Example inputs use sizes of at least 2 in every dynamic dimension: ``torch.export`` specialises a size-1 dimension.
"""

from __future__ import annotations

import inspect

import torch
from PIL import Image, ImageDraw

from .families import export_family

__all__ = [
    "DecoderGraph",
    "architecture",
    "decoder_example",
    "image_config",
    "probe_image",
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


# ----------------------------------------------------------------------------------------------- architectures


def probe_image(size: int = 64) -> Image.Image:
    """A fixed synthetic image (red circle, blue square on white) used for example inputs and the self-check."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(220, 30, 30))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.9), fill=(30, 60, 220))
    return image


def architecture(model) -> str:
    """The family key (transformers ``model_type``) of a VLM that export supports; ValueError naming --model."""
    model_type = model.config.model_type
    export_family(model_type)
    return model_type


def image_config(processor, arch: str) -> dict:
    """The manifest's ``preprocess`` section: the processor's image settings, flattened for runtime/families/."""
    ip = processor.image_processor.to_dict()
    common = {k: ip.get(k) for k in ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean")}
    common.update(image_std=ip.get("image_std"), resample=int(ip.get("resample") or 3), kind=arch)
    return common | export_family(arch).image_config(processor)


def decoder_example(text_config, mrope: bool, image_token_id: int, seq: int = 5, past: int = 3):
    """Example inputs (5 tokens, 2 of them image tokens, a past of 3), names, dynamic axes and the KV layout."""
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layers = text_config.num_hidden_layers
    ids = torch.tensor([[1, image_token_id, image_token_id, 2, 3]], dtype=torch.int64)[:, :seq]
    features = torch.randn(2, text_config.hidden_size)
    mask = torch.zeros(1, 1, seq, past + seq)
    positions = torch.arange(past, past + seq)[None]
    positions = positions[None].expand(3, 1, seq).contiguous() if mrope else positions
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
