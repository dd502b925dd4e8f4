"""Idefics3 (SmolVLM): SigLIP tower + pixel-shuffle connector on full-size crops (patch mask all ones)."""

from __future__ import annotations

import torch

from . import pixel_batch_example

__all__ = ["MROPE", "Idefics3VisionGraph", "image_config", "text_model", "vision_example", "vision_graph"]

MROPE = False


class Idefics3VisionGraph(torch.nn.Module):
    """SigLIP tower + pixel-shuffle connector; every crop is full size, so the patch mask is all ones."""

    def __init__(self, inner):
        super().__init__()
        self.vision, self.connector = inner.vision_model, inner.connector

    def forward(self, pixel_values):
        features = self.connector(self.vision(pixel_values=pixel_values).last_hidden_state)
        return features.reshape(-1, features.shape[-1])


def text_model(merged):
    return merged.model.text_model


def vision_graph(merged) -> torch.nn.Module:
    return Idefics3VisionGraph(merged.model)


def image_config(processor) -> dict:
    """The crop and prompt-expansion settings (also SmolVLM2's, whose processor names the global-view token
    ``global_image_token`` where Idefics3's says ``global_image_tag``)."""
    ip = processor.image_processor.to_dict()
    return {
        "longest_edge": int(ip["size"]["longest_edge"]),
        "max_image_size": int(ip["max_image_size"]["longest_edge"]),
        "do_image_splitting": bool(ip.get("do_image_splitting")),
        "image_seq_len": int(processor.image_seq_len),
        "image_token": processor.image_token,
        "fake_image_token": processor.fake_image_token,
        "global_image_token": getattr(processor, "global_image_tag", None) or processor.global_image_token,
    }


def vision_example(batch, image_cfg: dict):
    pixels = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:])
    return pixel_batch_example(pixels, "num_crops")
