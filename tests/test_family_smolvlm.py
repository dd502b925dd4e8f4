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
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttrv_edge.api import TTRVModel
from ttrv_edge.export.graphs import probe_image
from ttrv_edge.export.onnx import export_onnx
from ttrv_edge.io.answers import Question
from ttrv_edge.io.inputs import Item
from ttrv_edge.memory import MemoryPlanner, model_costs
from ttrv_edge.memory.costs import WorkShape
from ttrv_edge.models import load_vlm
from ttrv_edge.models.families import TINY_NAMES
from ttrv_edge.models.lora import adapted_parts
from ttrv_edge.rl.sampling import generate_completions, sample_rollouts
from ttrv_edge.rl.scoring import completion_logprobs
from ttrv_edge.runtime.runner import OnnxVLM

MODEL_TYPE = "smolvlm"
FAST = dict(rollouts=4, views=1, steps=1, max_new_tokens=4, lr=5e-2, seed=3)
NEW_TOKENS = 8
QUESTIONS = (Question("Which shape is red?", choices=("circle", "square")), Question("How many?", numeric=True))


@dataclass(frozen=True)
class SignalQuestion(Question):
    """Answers "x", "x", "y", ... in call order, so a random model's group always carries a learning signal."""

    calls: list = field(default_factory=list, compare=False)

    def extract(self, text: str) -> str | None:
        self.calls.append(text)
        return "xxy"[len(self.calls) % 3]


def _images() -> list[Image.Image]:
    noise = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    return [probe_image(64), probe_image(100).resize((100, 40)), Image.fromarray(noise)]


@pytest.fixture(scope="module")
def model_dir(tiny_family_dir) -> Path:
    return Path(tiny_family_dir(MODEL_TYPE))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir), device="cpu", dtype=torch.float32)


def _lora(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------------------------- model


def test_real_classes_template_splitting_and_placeholders(vlm, model_dir, monkeypatch, tmp_path):
    from transformers import SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from ttrv_edge.models.builders import tiny_cache_dir
    from ttrv_edge.models.loading import resolve_model_path

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
    monkeypatch.setenv("TTRV_EDGE_CACHE", str(tmp_path))
    assert TINY_NAMES["tiny-smolvlm2"] == MODEL_TYPE
    shutil.copytree(model_dir, tiny_cache_dir(MODEL_TYPE))
    assert resolve_model_path("tiny-smolvlm2") == str(tiny_cache_dir(MODEL_TYPE))


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
    api = TTRVModel.from_pretrained(str(model_dir), **FAST)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    before = _lora(api.vlm.model)
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.logprob_gap is not None and record.logprob_gap < 1e-3
    after = _lora(api.vlm.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    api.loop.reset()
    assert all(torch.equal(before[n], p) for n, p in _lora(api.vlm.model).items())
    result = api.adapt(test_image, "Which shape?", choices=["circle", "square"])
    assert result.steps and result.after is not None
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        test_image.rotate(90 * i).save(paths[-1])
    items = [Item(str(p), SignalQuestion("Describe it.")) for p in paths]
    results = TTRVModel.from_pretrained(str(model_dir), epochs=1, **FAST).adapt_dataset(items)
    assert [r.image for r in results] == [str(p) for p in paths] and all(r.after is not None for r in results)
    assert sum(len(r.steps) for r in results) == 2


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_int8_base_adapts(model_dir, test_image):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    api = TTRVModel.from_pretrained(str(model_dir), quantize="int8", **FAST)
    quantized = [n for n, m in api.vlm.model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all("text_model" in n for n in quantized)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.logprob_gap < 1e-3


def test_shared_prefix_sampling_scoring_and_memory_plan(vlm, test_image):
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    plain = generate_completions(vlm, inputs, 1, max_new_tokens=8, temperature=None, shared_prefix=False).ids
    shared = generate_completions(vlm, inputs, 3, max_new_tokens=8, temperature=None, shared_prefix=True).ids
    assert all(row.tolist() == plain[0].tolist() for row in shared)
    rollouts = sample_rollouts(vlm, inputs, 4, temperature=1.0, max_new_tokens=6, seed=1)
    keep = rollouts.completion_mask.bool()
    with torch.no_grad():
        paths = [
            completion_logprobs(vlm, rollouts, temperature=1.0, backend="torch", **options)[0]
            for options in ({}, {"share_prefix": False}, {"share_prefix": False, "share_vision": False})
        ]
    for logp in paths:
        assert float((logp - rollouts.sampler_logp).abs()[keep].max()) < 1e-4
    planner = MemoryPlanner(vlm.model, None)
    shape = WorkShape(prompt_tokens=inputs["input_ids"].shape[1], new_tokens=16, vision_tokens=5 * 64)
    for phase in ("sample", "train"):
        assert planner.estimate(phase, 4, shape) > planner.estimate(phase, 1, shape) > 0


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The tiny model with LoRA everywhere and trained vision norms, all perturbed, exported once."""
    root = tmp_path_factory.mktemp("export-smolvlm")
    adapted = load_vlm(str(model_dir), device="cpu", dtype=torch.float32, lora_targets="all", train_norms=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapted.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    adapted.model.save_pretrained(root / "adapter", safe_serialization=True)
    manifest = export_onnx(root / "adapter", root / "onnx")
    return adapted, OnnxVLM(root / "onnx"), manifest


def _torch_greedy(vlm, image, prompt: str):
    inputs = vlm.prompt_inputs(image, prompt)
    with torch.no_grad():
        out = vlm.model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=vlm.eos_token_ids,
            pad_token_id=vlm.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return inputs, out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), [s[0].numpy() for s in out.logits]


def test_onnx_greedy_answers_equal_torch(exported):
    vlm, runner, manifest = exported
    assert manifest["architecture"] == MODEL_TYPE and manifest["check"]["tokens_equal"]
    assert manifest["preprocess"]["do_image_splitting"] and manifest["preprocess"]["image_seq_len"] == 4
    worst = 0.0
    cases = [(image, q.prompt()) for image in _images() for q in QUESTIONS] + [(_images()[:2], QUESTIONS[0].prompt())]
    for image, prompt in cases:
        inputs, tokens, logits = _torch_greedy(vlm, image, prompt)
        result = runner.generate(image, prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert result.token_ids == tokens and result.prompt_tokens == inputs["input_ids"].shape[1]
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(result.logits, logits)))
    assert worst < 1e-4


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
