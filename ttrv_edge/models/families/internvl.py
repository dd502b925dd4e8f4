"""InternVL (transformers-native, as OpenGVLab/InternVL3-1B-hf / 2B-hf): InternViT tower (layer scale, absolute
position embeddings, optional qk-norm), pixel shuffle (``downsample_ratio`` 0.5) + MLP projector, Qwen2 text model.

The processor is ``InternVLProcessor`` over ``GotOcr2ImageProcessorPil`` (the checkpoints ship the fast GotOcr2
image processor, which needs torchvision). Each ``<IMG_CONTEXT>`` the chat template places becomes
``<img>`` + ``<IMG_CONTEXT>`` x ``image_seq_length`` x tiles + ``</img>``. As in the checkpoints, the processor tiles
an image (``crop_to_patches``, up to ``max_patches`` tiles of the tower's input size plus a thumbnail) because
InternVLProcessor passes ``crop_to_patches=True`` to its image processor whatever the image processor's own setting.
Tiling is switched off by ``settings["crop_to_patches"] = False``, saved as ``max_patches`` 1 (the image processor
crops only when ``max_patches > 1``), so a reloaded processor does the same.

Deviations from the checkpoints: the chat template is the one transformers' conversion script gives InternVL3-hf
(no default system prompt) without its video branch; the tokenizer is the shared WordLevel one with InternVL's
special tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<video>``, Qwen2's ``<|im_start|>``/``<|im_end|>``); the
processor is saved without a video processor (rebuilt image-only by ``models.load_processor``); weights are random.
"""

from __future__ import annotations

from ..processors import image_only_processor
from .qwen2_vl import qwen2_text_config

__all__ = ["PADDING_SIDE", "SPECIAL", "TEMPLATE", "image_seq_length", "parts", "tiny_config"]

# InternVL3-hf's chat template (transformers' convert_internvl_weights_to_hf.py), reduced to image + text content.
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = {
    "bos": None,
    "eos": "<|im_end|>",
    "pad": "<|endoftext|>",
    "unk": "<unk>",
    "extra": ["<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
    "named": {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    },
}
PADDING_SIDE = "left"


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def image_seq_length(config: dict) -> int:
    """Tokens per tile: the tower's patches per tile times ``downsample_ratio`` squared."""
    vision = config["vision_config"]
    (height, width), (ph, pw) = _pair(vision["image_size"]), _pair(vision["patch_size"])
    ratio = float(config.get("downsample_ratio", 0.5))
    return int((height // ph) * (width // pw) * ratio * ratio)


def image_processor(config: dict, settings: dict):
    """GotOcr2's PIL image processor with InternVL3's settings (ImageNet mean/std, bicubic, tiles of the tower's
    input size, at most ``settings["max_patches"]`` (12) tiles; 1 when ``crop_to_patches`` is off)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    height, width = _pair(config["vision_config"]["image_size"])
    crop = settings.get("crop_to_patches", True)
    return GotOcr2ImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
        crop_to_patches=crop,
        min_patches=int(settings.get("min_patches", 1)),
        max_patches=int(settings.get("max_patches", 12)) if crop else 1,
    )


def parts(config: dict, settings: dict, tokenizer):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor

    ids = tokenizer.convert_tokens_to_ids
    text = qwen2_text_config(config, tokenizer)
    fields = {k: v for k, v in config.items() if k not in ("model_type", "text_config", "vision_config")}
    fields = {"tie_word_embeddings": False, "image_seq_length": image_seq_length(config), **fields}
    model_config = InternVLConfig(
        vision_config=config["vision_config"], text_config=text, image_token_id=ids("<IMG_CONTEXT>"), **fields
    )
    processor = image_only_processor(InternVLProcessor)(  # its video processor needs torchvision
        image_processor=image_processor(config, settings),
        tokenizer=tokenizer,
        chat_template=TEMPLATE,
        image_seq_length=fields["image_seq_length"],
    )
    return InternVLForConditionalGeneration, model_config, processor


def tiny_config(image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    vision = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    vision.update(num_attention_heads=4, image_size=[image_size, image_size], patch_size=[patch, patch])
    vision.update(attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_scale_init_value=0.1)
    text = {"model_type": "qwen2", "hidden_size": hidden, "intermediate_size": 2 * hidden}
    text.update(num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    text.update(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)
    config = {"model_type": "internvl", "downsample_ratio": 0.5, "projector_hidden_act": "gelu"}
    config.update(vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    return {**config, "text_config": text, "vision_config": vision}, {"crop_to_patches": True, "max_patches": 12}
