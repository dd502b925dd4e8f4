"""SmolVLM2 (transformers' ``smolvlm``): SigLIP tower, pixel-shuffle connector, Llama text model, as Idefics3.

SmolVLM2's model and image processor are Idefics3's under new names (the modeling, the PIL image processor and
the prompt expansion of ``SmolVLMProcessor`` are line for line Idefics3's), so this module reuses ``idefics3.py``:
special tokens, text-config token ids and image-processor construction. Where SmolVLM2 differs:

- ``SmolVLMProcessor`` owns a video processor (it needs torchvision): it is saved without it and rebuilt image-only
  by ``models.load_processor``, whose ``apply_chat_template`` skips SmolVLM2's override (that override only fills
  video frame settings). Its marker attributes name tokens (``fake_image_token``, ``global_image_token``) where
  Idefics3's processor also keeps ids (``fake_image_token_id``, ``row_col_ids``).
- The checkpoints split images into ``max_image_size`` crops plus a global view (``do_image_splitting`` on), and
  the small ones (256M, 500M) shuffle pixels with ``scale_factor`` 4. The tiny model does both: 64 px crops of an
  image resized to a longest edge of 128 px (2 x 2 crops + the global view for a square image), 8 x 8 patches
  per crop shuffled 4 x 4, so 4 image tokens per crop.
- The chat template is Idefics3's (``<|im_start|>User:<image>...<end_of_utterance>``, then ``Assistant:``): it
  renders image + text turns exactly as the template transformers ships for SmolVLM2 (``processing_smolvlm.
  DEFAULT_CHAT_TEMPLATE``, which SmolVLMProcessor switches to for videos; it differs by a video branch and by no
  branch for string content), as tests/test_family_smolvlm.py checks.
- Its special tokens are Idefics3's (``<|im_start|>``, ``<end_of_utterance>``, ``<fake_token_around_image>``,
  ``<image>``, ``<global-img>``, ``<row_i_col_j>``), and so are the text config's token ids.
- Bicubic resampling (checkpoints: Lanczos), as for the tiny Idefics3: cheaper, and the runtime uses the same.
"""

from __future__ import annotations

from ..processors import image_only_processor
from .idefics3 import PADDING_SIDE, SPECIAL, TEMPLATE, image_processor, image_seq_len, token_ids
from .tokenizer import text_config_with_tokens

__all__ = ["PADDING_SIDE", "SPECIAL", "TEMPLATE", "parts", "tiny_config"]


def parts(config: dict, settings: dict, tokenizer):
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    model_config = SmolVLMConfig(
        vision_config=config["vision_config"],
        text_config=text_config_with_tokens(config, tokenizer, **token_ids(tokenizer)),
        scale_factor=config["scale_factor"],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<pad>"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )
    processor = image_only_processor(SmolVLMProcessor)(  # its video processor needs torchvision
        image_processor=image_processor(SmolVLMImageProcessorPil, config, settings),
        tokenizer=tokenizer,
        image_seq_len=image_seq_len(config),
        chat_template=TEMPLATE,
    )
    return SmolVLMForConditionalGeneration, model_config, processor


def tiny_config(image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    tower = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers}
    vision = {**tower, "num_attention_heads": 4, "image_size": image_size, "patch_size": patch}
    text = {"model_type": "llama", **tower, "num_attention_heads": 4, "num_key_value_heads": 2}
    text.update(max_position_embeddings=512, tie_word_embeddings=False)
    config = {"model_type": "smolvlm", "scale_factor": 4, "tie_word_embeddings": False}
    settings = {"image_splitting": True, "longest_edge": 2 * image_size}
    return {**config, "text_config": text, "vision_config": vision}, settings
