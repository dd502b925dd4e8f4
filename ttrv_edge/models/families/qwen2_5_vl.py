"""Qwen2.5-VL: ViT with RMSNorm, gated SiLU MLPs and window attention (full attention in ``fullatt_block_indexes``
only), a patch merger, and the Qwen2 text model with 3-D (multimodal) rope, as in Qwen2-VL.

What it shares with Qwen2-VL comes from ``qwen2_vl.py``: the special tokens, the config fields (token ids, tying),
the PIL image processor (Qwen2.5-VL checkpoints use Qwen2-VL's image processor) and the tiny text config.

Deviations from the real checkpoints, and why:

- The chat template is Qwen2.5-VL-Instruct's, reduced to image + text content (no video, tools or
  ``add_vision_id``); it keeps the default system turn ("You are a helpful assistant."), whose words the tiny
  WordLevel vocabulary partly lacks (they become ``<unk>``, in torch and onnxruntime alike).
- Tiny sizes: 2 vision blocks, the second with full attention (like the last block of each group in
  ``fullatt_block_indexes``), the first windowed, with a 32 px window over 8 px patches (2 x 2 merged tokens, so
  a 64 px image has 4 windows; real checkpoints: 112 px over 14 px patches, 4 x 4 merged tokens).
- The processor is saved without its video processor (which needs torchvision) and rebuilt image-only by
  ``models.load_processor``.
"""

from __future__ import annotations

from ..processors import image_only_processor
from .qwen2_vl import PADDING_SIDE, SPECIAL, image_processor, model_config_fields, text_config

__all__ = ["PADDING_SIDE", "SPECIAL", "TEMPLATE", "parts", "tiny_config"]

# Qwen2.5-VL-Instruct's chat template, reduced to image + text content.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parts(config: dict, settings: dict, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    model_config = Qwen2_5_VLConfig(**model_config_fields(config, tokenizer))
    processor = image_only_processor(Qwen2_5_VLProcessor)(  # its video processor needs torchvision
        image_processor=image_processor(config, settings), tokenizer=tokenizer, chat_template=TEMPLATE
    )
    return Qwen2_5_VLForConditionalGeneration, model_config, processor


def tiny_config(image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    vision = {"depth": layers, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": 4}
    vision.update(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden)
    # windows of 2 x 2 merged tokens; the last block attends over the whole image
    vision.update(window_size=4 * patch, fullatt_block_indexes=[layers - 1], hidden_act="silu")
    text = text_config(hidden, layers)
    config = {"model_type": "qwen2_5_vl", "tie_word_embeddings": False, "text_config": text, "vision_config": vision}
    return config, {"max_pixels": image_size * image_size}
