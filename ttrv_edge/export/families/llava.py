"""LLaVA: the vision tower (CLIP or SigLIP) run layer by layer up to ``vision_feature_layer``, the select strategy
(``"default"`` drops CLIP's CLS row), then the ``multi_modal_projector``.

The graph calls the tower's own embeddings, pre-norm (CLIP's ``pre_layrnorm``) and encoder layers instead of the
tower's forward, because LLaVA reads ``hidden_states[vision_feature_layer]`` through transformers' output-capturing
hooks (a context variable and forward hooks, which ``torch.export`` does not trace); the hidden state after k layers
is what those hooks record as ``hidden_states[k]``. Layers after the last selected one are not run (nor exported).
"""

from __future__ import annotations

import torch

from . import pixel_batch_example

__all__ = ["MROPE", "LlavaVisionGraph", "image_config", "text_model", "vision_example", "vision_graph"]

MROPE = False


class LlavaVisionGraph(torch.nn.Module):
    """Tower layers up to the selected hidden state(s), select strategy, projector: pixels [n, 3, S, S] -> image
    features [n * tokens, H]."""

    def __init__(self, inner, config):
        super().__init__()
        self.tower, self.projector = inner.vision_tower, inner.multi_modal_projector
        layers = config.vision_feature_layer
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        count = len(self.tower.encoder.layers) + 1  # hidden states: the embeddings, then one per layer
        self.indices = [i % count for i in self.layers]
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        tower = self.tower
        hidden = tower.embeddings(pixel_values)
        pre_norm = getattr(tower, "pre_layrnorm", None)  # CLIP's; SigLIP has none
        if pre_norm is not None:
            hidden = pre_norm(hidden)
        states = [hidden]
        for layer in tower.encoder.layers[: max(self.indices)]:
            hidden = layer(hidden, None)
            states.append(hidden)
        selected = [states[i][:, 1:] if self.drop_cls else states[i] for i in self.indices]
        features = self.projector(torch.cat(selected, dim=-1))
        return features.reshape(-1, features.shape[-1])


def text_model(merged):
    return merged.model.language_model


def vision_graph(merged) -> torch.nn.Module:
    return LlavaVisionGraph(merged.model, merged.config)


def image_config(processor) -> dict:
    """The image processor's geometry (CLIP: shortest edge + center crop; SigLIP: plain resize) and the image token
    count (``LlavaProcessor``'s patches + additional tokens - 1 for the "default" strategy)."""
    ip = processor.image_processor.to_dict()
    size = ip.get("size") or {}
    crop = ip.get("crop_size") or {}
    sizes = {}
    for key in ("shortest_edge", "height", "width"):
        if size.get(key) is not None:
            sizes[f"size_{key}"] = int(size[key])
    return {
        **sizes,
        "do_center_crop": bool(ip.get("do_center_crop", False)),
        "crop_height": int(crop["height"]) if crop else None,
        "crop_width": int(crop["width"]) if crop else None,
        "patch_size": int(processor.patch_size),
        "num_additional_image_tokens": int(processor.num_additional_image_tokens or 0),
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "image_token": processor.image_token,
    }


def vision_example(batch, image_cfg: dict):
    return pixel_batch_example(batch["pixel_values"], "images")
