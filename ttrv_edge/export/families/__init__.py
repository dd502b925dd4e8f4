"""What ONNX export needs of each VLM family, one module each (keyed by transformers ``model_type``).

Every family module has the same public names, which ``ttrv_edge.export.onnx`` uses:

- ``MROPE``: True when the decoder takes 3-D (multimodal rope) position ids [3, 1, L], False for [1, L];
- ``text_model(merged)``: the language model (decoder stack + final norm, no lm_head);
- ``vision_graph(merged)``: the module exported as vision.onnx (pixels -> image features [n, H], one row per
  image token, in prompt order);
- ``image_config(processor)``: the family's settings for the manifest's ``preprocess`` section (what
  ``ttrv_edge.runtime.families`` reads to prepare inputs without torch);
- ``vision_example(batch, image_cfg)``: (example inputs, input names, dynamic axes) of the vision graph, from the
  processor's output for the probe image.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ...models.families import FAMILIES

__all__ = ["EXPORTABLE", "export_family", "pixel_batch_example"]

EXPORTABLE = tuple(FAMILIES)
"""The model types ``ttrv-edge export`` supports."""


def export_family(model_type: str) -> ModuleType:
    """The export module of ``model_type``; ValueError naming --model and the supported families otherwise."""
    if model_type not in EXPORTABLE:
        names = ", ".join(FAMILIES[t] for t in EXPORTABLE)
        raise ValueError(f"--model: ONNX export supports {names}, not {model_type!r}")
    return importlib.import_module(f"{__name__}.{model_type}")


def pixel_batch_example(pixels, axis: str):
    """The example inputs, names and dynamic axes of a vision graph fed one batch of images (crops, tiles) along
    dim 0, named ``axis``; a single image is doubled (flipped), since ``torch.export`` specialises a size-1 dim."""
    import torch

    pixels = pixels.float()
    pixels = torch.cat([pixels, pixels.flip(-1)]) if pixels.shape[0] == 1 else pixels
    return (pixels,), ["pixel_values"], {"pixel_values": {0: axis}}
