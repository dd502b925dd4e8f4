"""LLaVA (``LlavaForConditionalGeneration``): a CLIP or SigLIP vision tower, a two-layer GELU MLP projector
(``multi_modal_projector``) and a Llama or Qwen2 text model; ``LlavaProcessor`` repeats ``<image>`` once per image
feature.

Two towers, picked by ``vision_config["model_type"]``:

- ``clip_vision_model`` (the tiny default, as llava-hf/llava-1.5-7b-hf): CLIP ViT with a CLS token, features from
  ``hidden_states[-2]`` with the CLS row dropped (``vision_feature_select_strategy="default"``), the PIL CLIP image
  processor (resize the shortest edge, center crop, rescale, normalise with the OpenAI CLIP mean/std), Llama text;
- ``siglip_vision_model`` (``tiny_config(..., tower="siglip")``, as llava-interleave-qwen / LLaVA-OneVision-style
  edge models): SigLIP ViT without CLS or pooling head, features from ``hidden_states[-1]``, all rows
  (``"full"``), the PIL SigLIP image processor (plain resize to the square input size), Qwen2 text.

Deviations from the real checkpoints, and why:

- Both variants use LLaVA-1.5's chat template ("USER: <image>\\n... ASSISTANT:", reduced to image + text content)
  and LLaVA-1.5's tokens (``<s>``, ``</s>``, ``<pad>``, ``<image>``); llava-interleave-qwen's Qwen template is not
  modelled (one template per family module).
- The WordLevel tokenizer (``tokenizer.py``) gets "USER" and "ASSISTANT" as added (non-special, whole-word) tokens,
  since its word list lacks the upper-case role names, and adds ``<s>`` in front like Llama's tokenizer
  (``add_bos_token``). Both happen here, on the tokenizer the builder passes in and then saves; with a
  ``vocab_size`` the vocabulary is two words larger than asked.
- With a 2-layer tower and ``vision_feature_layer=-2`` (CLIP), the tower's last layer computes nothing the model
  uses, exactly as in llava-1.5 (whose 24th CLIP layer is unused); vision LoRA attached there never trains.
"""

from __future__ import annotations

from .tokenizer import text_config_with_tokens

__all__ = ["PADDING_SIDE", "ROLE_WORDS", "SPECIAL", "TEMPLATE", "image_processor", "parts", "tiny_config"]

# llava-hf/llava-1.5-7b-hf's chat template, reduced to image + text content (images first, then the text).
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "extra": ["<image>"]}
PADDING_SIDE = "left"
ROLE_WORDS = ("USER", "ASSISTANT")
"""The template's role names, added to the WordLevel vocabulary."""


def _with_role_words(tokenizer):
    """Add the template's role names (whole words) and Llama's BOS-adding post-processor, in place."""
    from tokenizers import AddedToken

    missing = [w for w in ROLE_WORDS if tokenizer.convert_tokens_to_ids(w) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens([AddedToken(w, single_word=True) for w in missing])
    tokenizer.add_bos_token = True
    return tokenizer


def image_processor(config: dict, settings: dict):
    """CLIP's PIL image processor (shortest edge + center crop) or SigLIP's (plain resize), by the tower type."""
    vision = config["vision_config"]
    side = int(settings.get("image_size", vision["image_size"]))
    if vision.get("model_type") == "siglip_vision_model":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(size={"height": side, "width": side})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})


def parts(config: dict, settings: dict, tokenizer):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _with_role_words(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    text = text_config_with_tokens(
        config, tokenizer, bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")
    )
    strategy = config.get("vision_feature_select_strategy", "default")
    model_config = LlavaConfig(
        vision_config=config["vision_config"],
        text_config=text,
        image_token_index=ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.get("vision_feature_layer", -2),
        projector_hidden_act=config.get("projector_hidden_act", "gelu"),
        image_seq_length=image_seq_length(config),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    vision = config["vision_config"]
    processor = LlavaProcessor(
        image_processor=image_processor(config, settings),
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=_class_tokens(vision),
        chat_template=TEMPLATE,
    )
    return LlavaForConditionalGeneration, model_config, processor


def _class_tokens(vision: dict) -> int:
    """Tokens the tower adds in front of the patches: CLIP's CLS, none for SigLIP."""
    return 0 if vision.get("model_type") == "siglip_vision_model" else 1


def image_seq_length(config: dict) -> int:
    """Image tokens per image: patches, plus the CLS row unless the select strategy ("default") drops it."""
    vision = config["vision_config"]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + _class_tokens(vision)
    return tokens - (config.get("vision_feature_select_strategy", "default") == "default")


def tiny_config(image_size: int, hidden: int, layers: int, patch: int, tower: str = "clip") -> tuple[dict, dict]:
    """A tiny LLaVA: CLIP tower + Llama text (``tower="clip"``, LLaVA-1.5) or SigLIP + Qwen2 (``"siglip"``)."""
    if tower not in ("clip", "siglip"):
        raise ValueError(f"tower: 'clip' or 'siglip', got {tower!r}")
    sizes = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    vision = {**sizes, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
    text = {**sizes, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    config = {"model_type": "llava", "tie_word_embeddings": False, "projector_hidden_act": "gelu"}
    if tower == "siglip":
        vision.update(model_type="siglip_vision_model", vision_use_head=False)
        text.update(model_type="qwen2", tie_word_embeddings=False)
        config.update(vision_feature_layer=-1, vision_feature_select_strategy="full")
    else:
        vision.update(model_type="clip_vision_model", projection_dim=hidden)
        text.update(model_type="llama", tie_word_embeddings=False)
        config.update(vision_feature_layer=-2, vision_feature_select_strategy="default")
    return {**config, "text_config": text, "vision_config": vision}, {}
