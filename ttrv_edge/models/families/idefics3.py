"""Idefics3 (SmolVLM-256M/500M/2B): SigLIP tower, pixel-shuffle connector, Llama text model.

The image processor is ``Idefics3ImageProcessorPil`` built directly (torchvision is not installed) with image
splitting off unless asked, so one image is ``image_seq_len`` tokens.
"""

from __future__ import annotations

from .tokenizer import text_config_with_tokens

__all__ = ["PADDING_SIDE", "SPECIAL", "TEMPLATE", "parts", "tiny_config"]

# SmolVLM's chat template, reduced to image + text content.
TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL = {
    "bos": "<|im_start|>",
    "eos": "<end_of_utterance>",
    "pad": "<pad>",
    "unk": "<unk>",
    "extra": ["<fake_token_around_image>", "<image>", "<global-img>"]
    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
}
PADDING_SIDE = "right"


def token_ids(tokenizer) -> dict:
    """The text config's special ids (shared with SmolVLM2, which uses the same tokens)."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "pad_token_id": ids("<pad>"),
        "bos_token_id": ids("<|im_start|>"),
        "eos_token_id": ids("<end_of_utterance>"),
    }


def image_processor(processor_cls, config: dict, settings: dict):
    """An Idefics3-style image processor: longest edge resized, splitting off unless ``settings`` ask for it."""
    vision = config["vision_config"]
    return processor_cls(
        do_image_splitting=settings.get("image_splitting", False),
        size={"longest_edge": settings.get("longest_edge", vision["image_size"])},
        max_image_size={"longest_edge": vision["image_size"]},
        resample=3,  # bicubic: cheaper than the default Lanczos, identical for 64 px inputs
    )


def image_seq_len(config: dict) -> int:
    """Tokens per image crop: patches per crop over the pixel-shuffle factor squared."""
    vision = config["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 // config["scale_factor"] ** 2


def parts(config: dict, settings: dict, tokenizer):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ids = tokenizer.convert_tokens_to_ids
    model_config = Idefics3Config(
        vision_config=config["vision_config"],
        text_config=text_config_with_tokens(config, tokenizer, **token_ids(tokenizer)),
        scale_factor=config["scale_factor"],
        image_token_id=ids("<image>"),
        pad_token_id=ids("<pad>"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    processor = Idefics3Processor(
        image_processor=image_processor(Idefics3ImageProcessorPil, config, settings),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len(config),
        chat_template=TEMPLATE,
    )
    return Idefics3ForConditionalGeneration, model_config, processor


def tiny_config(image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    vision = {**tower, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
    text = {"model_type": "llama", **tower, "num_attention_heads": 4, "num_key_value_heads": 2}
    text.update(max_position_embeddings=512, tie_word_embeddings=False)
    config = {"model_type": "idefics3", "scale_factor": 2, "tie_word_embeddings": False}
    return {**config, "text_config": text, "vision_config": vision}, {}
