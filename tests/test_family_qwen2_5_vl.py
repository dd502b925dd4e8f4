"""Qwen2.5-VL end to end on the tiny config: the real classes with window attention, LoRA placement, episodic,
transductive and int8 adaptation (log-prob gap < 1e-3), shared-prefix sampling and scoring, the memory estimate,
and ONNX export answered by onnxruntime with the same greedy tokens as torch.

The tiny vision tower has 2 blocks, the first windowed (32 px windows: 4 on a 64 px image, 6 uneven ones on an
80 x 48 image), the second with full attention. The export is done once (module fixture) on an adapter that trains
everything (LoRA on the language model, the vision tower and the merger, plus the vision norms), all perturbed.
Tolerances as in test_export.py: onnxruntime vs torch logits 1e-4 (measured ~1e-6), pixels 1e-6.
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    check_episodic_step_reset_and_transductive_run,
    check_int8_base_adapts,
    check_onnx_greedy_equals_torch,
    check_shared_prefix_scoring_and_memory_plan,
    check_tiny_name_resolves,
    export_perturbed,
    parity_images,
)

from ttrv_edge.export.families.qwen2_5_vl import window_of, window_span
from ttrv_edge.io.answers import Question
from ttrv_edge.memory import model_costs
from ttrv_edge.models import load_vlm, vision_tower
from ttrv_edge.models.lora import adapted_parts
from ttrv_edge.runtime.runner import OnnxVLM

MODEL_TYPE = "qwen2_5_vl"
FAST = dict(rollouts=4, views=1, steps=1, max_new_tokens=4, lr=5e-2, seed=3)
NEW_TOKENS = 8
QUESTIONS = (Question("Which shape is red?", choices=("circle", "square")), Question("How many?", numeric=True))


@pytest.fixture(scope="module")
def model_dir(tiny_family_dir) -> Path:
    return Path(tiny_family_dir(MODEL_TYPE))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir), device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- model


def test_real_classes_template_and_placeholders(vlm, model_dir, monkeypatch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = vlm.model.get_base_model()
    assert type(base) is Qwen2_5_VLForConditionalGeneration
    assert type(vlm.processor).__name__ == "Qwen2_5_VLProcessor" and vlm.processor.video_processor is None
    assert type(vlm.processor.image_processor) is Qwen2VLImageProcessorPil
    vision = base.config.vision_config
    assert list(vision.fullatt_block_indexes) == [1] and vision.depth == 2 and vision.hidden_act == "silu"
    assert sum(p.numel() for p in base.parameters()) < 2_000_000
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all(
        re.search(r"language_model\.layers\.\d\.self_attn\.[qkvo]_proj\.lora_", n) for n in trainable
    )
    ids = vlm.tokenizer.convert_tokens_to_ids
    placeholders = {ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert placeholders <= set(vlm.suppress_token_ids)
    assert set(base.generation_config.suppress_tokens) == set(vlm.suppress_token_ids)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Is it red?<|im_end|>\n<|im_start|>assistant\n"
    )
    # --model tiny-qwen2.5-vl resolves to the cached build of this family
    check_tiny_name_resolves("tiny-qwen2.5-vl", MODEL_TYPE, model_dir, monkeypatch, tmp_path)


def test_vision_lora_and_norms_land_on_the_window_attention_tower(model_dir):
    vlm = load_vlm(str(model_dir), lora_targets="vision", train_norms=True)
    lora, norms = adapted_parts(vlm.model)
    short = {n.split("model.visual.")[-1] for n in lora}
    assert short == {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"} | {
        "merger.mlp.0",
        "merger.mlp.2",
    }
    assert {n.split("model.visual.")[-1] for n in norms} == {
        "blocks.0.norm1",
        "blocks.0.norm2",
        "blocks.1.norm1",
        "blocks.1.norm2",
        "merger.ln_q",
    }
    costs = model_costs(vlm.model)
    assert (costs.vision_layers, costs.vision_hidden, costs.vision_intermediate, costs.vision_heads) == (2, 64, 128, 4)
    assert costs.vision_trained


def test_window_partition_matches_transformers():
    """The graph's window of a patch (its rope position // span) is the window get_vision_window_index puts it in,
    for the tiny config, uneven edges and a real checkpoint's 112 px windows over 14 px patches."""
    from types import SimpleNamespace

    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    for grid, window_size, patch in [((1, 8, 8), 32, 8), ((1, 6, 10), 32, 8), ((1, 36, 50), 112, 14)]:
        grid_thw = torch.tensor([grid])
        index, cu = get_vision_window_index(grid_thw, 2, window_size, patch)
        sizes = ((cu[1:] - cu[:-1]) // 4).numpy()
        per_merged = np.empty(index.numel(), dtype=np.int64)
        per_merged[index.numpy()] = np.repeat(np.arange(sizes.size), sizes)
        theirs = np.repeat(per_merged, 4)
        span = window_span(SimpleNamespace(spatial_merge_size=2, window_size=window_size, patch_size=patch))
        ours = window_of(get_vision_position_ids(grid_thw, 2), span).numpy()
        same_theirs = theirs[:, None] == theirs[None, :]
        same_ours = (ours[:, None, :] == ours[None, :, :]).all(-1)
        assert sizes.size > 1 and (same_theirs == same_ours).all(), grid


# ----------------------------------------------------------------------------------------------- adaptation


def test_episodic_step_reset_and_transductive_run(model_dir, test_image, tmp_path):
    check_episodic_step_reset_and_transductive_run(model_dir, test_image, tmp_path, FAST)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_int8_base_adapts(model_dir, test_image):
    pytest.importorskip("optimum.quanto")
    check_int8_base_adapts(model_dir, test_image, FAST, quantized_under="language_model")


def test_shared_prefix_sampling_scoring_and_memory_plan(vlm, test_image):
    check_shared_prefix_scoring_and_memory_plan(vlm, test_image, vision_tokens=64)


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The tiny model with LoRA everywhere and trained vision norms, all perturbed, exported once."""
    vlm, out, manifest = export_perturbed(model_dir, tmp_path_factory.mktemp("export-qwen2_5_vl"))
    return vlm, OnnxVLM(out), manifest


def test_onnx_greedy_answers_equal_torch(exported):
    vlm, runner, manifest = exported
    assert manifest["architecture"] == MODEL_TYPE and manifest["check"]["tokens_equal"]
    check_onnx_greedy_equals_torch(vlm, runner, parity_images(), QUESTIONS, NEW_TOKENS)


def test_onnx_inputs_and_image_features_equal_the_processor_and_tower(exported):
    """Token ids, pixels, 3-D positions and vision rope positions equal transformers'; the vision graph's features
    equal the tower's (window attention included: an all-full-attention tower gives other features)."""
    from transformers.vision_utils import get_vision_position_ids

    vlm, runner, _ = exported
    inner = vlm.model.get_base_model().model
    for image in parity_images()[1:2] + [parity_images()[:2]]:
        images = image if isinstance(image, list) else [image]
        prompt = runner.chat.render("Is it red?", images=len(images))
        batch = vlm.processor(images=[images] if len(images) > 1 else images, text=[prompt], return_tensors="pt")
        prepared = runner.prepare(image, "Is it red?")
        assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
        feeds = prepared.vision_feeds
        np.testing.assert_allclose(feeds["pixel_values"], batch["pixel_values"].numpy(), atol=1e-6, rtol=0)
        grid = batch["image_grid_thw"]
        positions, _ = inner.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=grid
        )
        assert prepared.position_ids.tolist() == positions.tolist()
        assert feeds["rope_positions"].tolist() == get_vision_position_ids(grid, 2).tolist()
        with torch.no_grad():
            reference = inner.visual(batch["pixel_values"], grid_thw=grid).pooler_output
            visual = inner.visual
            windowed = visual.fullatt_block_indexes
            visual.fullatt_block_indexes = list(range(len(visual.blocks)))
            try:
                all_full = visual(batch["pixel_values"], grid_thw=grid).pooler_output
            finally:
                visual.fullatt_block_indexes = windowed
        features = runner.image_features(prepared)
        assert np.abs(features - reference.numpy()).max() < 1e-4  # features of size ~5: ~1e-5 float32 noise
        assert (all_full - reference).abs().max() > 1e-2, float((all_full - reference).abs().max())
    assert vision_tower(vlm.model) is inner.visual
