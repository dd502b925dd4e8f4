"""SmolVLM2 (transformers' ``smolvlm``) end to end on the tiny config: the real classes, SmolVLM2's chat template,
image splitting (crops + global view, ``<row_i_col_j>`` markers, all suppressed), LoRA placement, episodic,
transductive and int8 adaptation (log-prob gap < 1e-3), shared-prefix sampling and scoring, the memory estimate, and
ONNX export answered by onnxruntime with the same greedy tokens as torch.

The tiny processor splits like the checkpoints: a 64 px image is resized to a longest edge of 128 px and cut into
2 x 2 crops of 64 px plus the global view (5 crops), a 100 x 40 banner into 1 x 2 crops plus the global view; each
crop is 4 image tokens (8 x 8 patches, pixel shuffle 4). The export is done once (module fixture) on an adapter that
trains everything (LoRA on the language model, the vision tower and the connector, plus the vision norms), all
perturbed. Tolerances as in test_export.py: onnxruntime vs torch logits 1e-4 (measured ~1e-6), pixels 1e-6.
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
    noise_image,
)
from PIL import Image

from ttrv_edge.export.graphs import probe_image
from ttrv_edge.io.answers import Question
from ttrv_edge.memory import model_costs
from ttrv_edge.models import load_vlm
from ttrv_edge.models.lora import adapted_parts
from ttrv_edge.runtime.runner import OnnxVLM

MODEL_TYPE = "smolvlm"
FAST = dict(rollouts=4, views=1, steps=1, max_new_tokens=4, lr=5e-2, seed=3)
NEW_TOKENS = 8
QUESTIONS = (Question("Which shape is red?", choices=("circle", "square")), Question("How many?", numeric=True))


def _images() -> list[Image.Image]:
    return [probe_image(64), probe_image(100).resize((100, 40)), noise_image()]


@pytest.fixture(scope="module")
def model_dir(tiny_family_dir) -> Path:
    return Path(tiny_family_dir(MODEL_TYPE))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir), device="cpu", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- model


def test_real_classes_template_splitting_and_placeholders(vlm, model_dir, monkeypatch, tmp_path):
    from transformers import SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    base = vlm.model.get_base_model()
    assert type(base) is SmolVLMForConditionalGeneration and base.config.scale_factor == 4
    processor = vlm.processor  # rebuilt image-only from the saved parts: its own settings survive
    assert type(processor).__name__ == "SmolVLMProcessor" and processor.video_processor is None
    assert type(processor.image_processor) is SmolVLMImageProcessorPil and processor.image_processor.do_image_splitting
    assert processor.image_seq_len == 4
    assert sum(p.numel() for p in base.parameters()) < 2_000_000
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all(re.search(r"text_model\.layers\.\d\.self_attn\.[qkvo]_proj\.lora_", n) for n in trainable)
    # SmolVLM2's template (its video branch aside) renders image + text turns like ours
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == vlm.tokenizer.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>User:<image>Is it red?<end_of_utterance>\nAssistant:"
    ids = vlm.prompt_inputs(probe_image(), "Is it red?")["input_ids"][0].tolist()
    tokens = vlm.tokenizer.convert_ids_to_tokens(ids)
    assert tokens.count("<image>") == 5 * 4 and tokens.count("<global-img>") == 1
    assert [t for t in tokens if t.startswith("<row_")] == [
        "<row_1_col_1>",
        "<row_1_col_2>",
        "<row_2_col_1>",
        "<row_2_col_2>",
    ]
    markers = ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>", "<pad>"]
    assert set(vlm.tokenizer.convert_tokens_to_ids(markers)) <= set(vlm.suppress_token_ids)
    assert set(base.generation_config.suppress_tokens) == set(vlm.suppress_token_ids)
    # --model tiny-smolvlm2 resolves to the cached build of this family
    check_tiny_name_resolves("tiny-smolvlm2", MODEL_TYPE, model_dir, monkeypatch, tmp_path)


def test_vision_lora_and_norms_land_on_the_siglip_tower_and_connector(model_dir):
    vlm = load_vlm(str(model_dir), lora_targets="vision", train_norms=True)
    lora, norms = adapted_parts(vlm.model)
    short = {re.search(r"(vision_model|connector)\..*", n).group(0) for n in lora}
    attention = {f"vision_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj")}
    attention |= {f"vision_model.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("v_proj", "out_proj")}
    assert short == attention | {"connector.modality_projection.proj"}
    assert {re.search(r"vision_model\..*", n).group(0) for n in norms} == {
        f"vision_model.encoder.layers.{i}.layer_norm{j}" for i in (0, 1) for j in (1, 2)
    } | {"vision_model.post_layernorm"}
    costs = model_costs(vlm.model)
    assert (costs.vision_layers, costs.vision_hidden, costs.vision_intermediate, costs.patch) == (2, 64, 128, 8)


# ----------------------------------------------------------------------------------------------- adaptation


def test_episodic_step_reset_and_transductive_run(model_dir, test_image, tmp_path):
    check_episodic_step_reset_and_transductive_run(model_dir, test_image, tmp_path, FAST)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_int8_base_adapts(model_dir, test_image):
    pytest.importorskip("optimum.quanto")
    check_int8_base_adapts(model_dir, test_image, FAST, quantized_under="text_model")


def test_shared_prefix_sampling_scoring_and_memory_plan(vlm, test_image):
    check_shared_prefix_scoring_and_memory_plan(vlm, test_image, vision_tokens=5 * 64)


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The tiny model with LoRA everywhere and trained vision norms, all perturbed, exported once."""
    vlm, out, manifest = export_perturbed(model_dir, tmp_path_factory.mktemp("export-smolvlm"))
    return vlm, OnnxVLM(out), manifest


def test_onnx_greedy_answers_equal_torch(exported):
    vlm, runner, manifest = exported
    assert manifest["architecture"] == MODEL_TYPE and manifest["check"]["tokens_equal"]
    assert manifest["preprocess"]["do_image_splitting"] and manifest["preprocess"]["image_seq_len"] == 4
    check_onnx_greedy_equals_torch(vlm, runner, _images(), QUESTIONS, NEW_TOKENS)


def test_onnx_inputs_equal_the_processor(exported):
    """Token ids (row/col blocks included) and crops equal SmolVLMProcessor's, for 5-crop, 3-crop and two-image
    prompts; the rendered prompt equals the processor's chat template."""
    vlm, runner, _ = exported
    crops = []
    for image in _images()[:2] + [_images()[:2]]:
        images = image if isinstance(image, list) else [image]
        prompt = runner.chat.render("Is it red?", images=len(images))
        batch = vlm.processor(images=[images], text=[prompt], return_tensors="np")
        prepared = runner.prepare(image, "Is it red?")
        assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
        pixels = prepared.vision_feeds["pixel_values"]
        np.testing.assert_allclose(pixels, batch["pixel_values"].reshape(pixels.shape), atol=1e-6, rtol=0)
        assert batch["pixel_attention_mask"].all()  # full-size crops only: the graph's all-ones patch mask holds
        crops.append(pixels.shape[0])
    assert crops == [5, 3, 8]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    assert runner.chat.render("Is it red?") == vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
