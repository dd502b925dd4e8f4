"""InternVL (transformers-native): the model's own ``get_image_features`` (InternViT tower, CLS dropped, pixel
shuffle, multi-modal projector) on a batch of tiles, flattened to one row per ``<IMG_CONTEXT>`` token.

Every tile has the tower's input size, so the absolute position embeddings are used as stored (no interpolation
branch is traced); the number of tiles is the graph's dynamic dimension.
"""

from __future__ import annotations

import torch

from . import pixel_batch_example

__all__ = ["MROPE", "InternVLVisionGraph", "image_config", "text_model", "vision_example", "vision_graph"]

MROPE = False


class InternVLVisionGraph(torch.nn.Module):
    """``get_image_features`` of the inner InternVL model: tiles [n, 3, S, S] -> features [n * tokens, H]."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values):
        features = self.inner.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        return features.reshape(-1, features.shape[-1])


def text_model(merged):
    return merged.model.language_model


def vision_graph(merged) -> torch.nn.Module:
    return InternVLVisionGraph(merged.model)


def image_config(processor) -> dict:
    """GotOcr2's tiling settings as InternVLProcessor applies them (its ``crop_to_patches`` default wins over the
    image processor's own), and InternVL's image tokens."""
    ip = processor.image_processor.to_dict()
    crop = dict(getattr(processor, "images_kwargs", None) or {}).get("crop_to_patches", ip.get("crop_to_patches"))
    return {
        "size": [int(ip["size"]["height"]), int(ip["size"]["width"])],
        "crop_to_patches": bool(crop),
        "min_patches": int(ip.get("min_patches") or 1),
        "max_patches": int(ip.get("max_patches") or 1),
        "image_seq_length": int(processor.image_seq_length),
        "image_token": processor.image_token,
        "start_image_token": processor.start_image_token,
        "end_image_token": processor.end_image_token,
    }


def vision_example(batch, image_cfg: dict):
    return pixel_batch_example(batch["pixel_values"], "tiles")
