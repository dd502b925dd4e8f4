"""Qwen2-VL: ViT with 2-D rope and a patch merger, Qwen2 text model with 3-D (multimodal) rope.

The processor is saved without a video processor (the video processor needs torchvision); it is rebuilt from its
parts by ``models.load_processor``.
"""

from __future__ import annotations

from ..processors import image_only_processor
from .tokenizer import text_config_with_tokens

__all__ = ["PADDING_SIDE", "SPECIAL", "TEMPLATE", "model_config_fields", "parts", "qwen2_text_config", "tiny_config"]

# Qwen2-VL's chat template, reduced to image + text content.
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = {
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "extra": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
}
PADDING_SIDE = "left"


def qwen2_text_config(config: dict, tokenizer) -> dict:
    """The Qwen2 text config with the ChatML token ids (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``), as
    Qwen2-VL, Qwen2.5-VL and InternVL3 use them."""
    ids = tokenizer.convert_tokens_to_ids
    return text_config_with_tokens(
        config,
        tokenizer,
        bos_token_id=ids("<|im_start|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
    )


def model_config_fields(config: dict, tokenizer) -> dict:
    """The config fields Qwen2-VL and Qwen2.5-VL share: text config with token ids, placeholder ids, tying."""
    ids = tokenizer.convert_tokens_to_ids
    text = qwen2_text_config(config, tokenizer)
    return {
        "vision_config": config["vision_config"],
        "text_config": text,
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
        "tie_word_embeddings": config.get("tie_word_embeddings", True),
    }


def image_processor(config: dict, settings: dict):
    """Qwen2-VL's PIL image processor (also Qwen2.5-VL's) with ``max_pixels`` from ``settings``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = config["vision_config"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * unit, "longest_edge": settings["max_pixels"]},
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    )


def parts(config: dict, settings: dict, tokenizer):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    model_config = Qwen2VLConfig(**model_config_fields(config, tokenizer))
    processor = image_only_processor(Qwen2VLProcessor)(  # its video processor needs torchvision
        image_processor=image_processor(config, settings), tokenizer=tokenizer, chat_template=TEMPLATE
    )
    return Qwen2VLForConditionalGeneration, model_config, processor


def text_config(hidden: int, layers: int, heads: int = 4) -> dict:
    """A tiny Qwen2 text config with 3-D rope sections that fit the head size."""
    half = hidden // heads // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    text.update(num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    return text


def tiny_config(image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    vision = {"depth": layers, "embed_dim": hidden, "hidden_size": hidden, "num_heads": 4, "mlp_ratio": 2}
    vision.update(patch_size=patch, spatial_merge_size=2, temporal_patch_size=2)
    text = text_config(hidden, layers)
    config = {"model_type": "qwen2_vl", "tie_word_embeddings": False, "text_config": text, "vision_config": vision}
    return config, {"max_pixels": image_size * image_size}
