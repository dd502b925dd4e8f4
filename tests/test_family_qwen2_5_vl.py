"""Qwen2.5-VL end to end on the tiny config: the real classes with window attention, LoRA placement, episodic,
transductive and int8 adaptation (log-prob gap < 1e-3), shared-prefix sampling and scoring, the memory estimate,
and ONNX export answered by onnxruntime with the same greedy tokens as torch.

The tiny vision tower has 2 blocks, the first windowed (32 px windows: 4 on a 64 px image, 6 uneven ones on an
80 x 48 image), the second with full attention. The export is done once (module fixture) on an adapter that trains
everything (LoRA on the language model, the vision tower and the merger, plus the vision norms), all perturbed.
Tolerances as in test_export.py: onnxruntime vs torch logits 1e-4 (measured ~1e-6), pixels 1e-6.
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
from ttrv_edge.export.families.qwen2_5_vl import window_of, window_span
from ttrv_edge.export.graphs import probe_image
from ttrv_edge.export.onnx import export_onnx
from ttrv_edge.io.answers import Question
from ttrv_edge.io.inputs import Item
from ttrv_edge.memory import MemoryPlanner, model_costs
from ttrv_edge.memory.costs import WorkShape
from ttrv_edge.models import load_vlm, vision_tower
from ttrv_edge.models.families import TINY_NAMES
from ttrv_edge.models.lora import adapted_parts
from ttrv_edge.rl.sampling import generate_completions, sample_rollouts
from ttrv_edge.rl.scoring import completion_logprobs
from ttrv_edge.runtime.runner import OnnxVLM

MODEL_TYPE = "qwen2_5_vl"
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
    return [probe_image(64), probe_image(96).resize((80, 48)), Image.fromarray(noise)]


@pytest.fixture(scope="module")
def model_dir(tiny_family_dir) -> Path:
    return Path(tiny_family_dir(MODEL_TYPE))


@pytest.fixture(scope="module")
def vlm(model_dir):
    return load_vlm(str(model_dir), device="cpu", dtype=torch.float32)


def _lora(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


# ----------------------------------------------------------------------------------------------- model


def test_real_classes_template_and_placeholders(vlm, model_dir, monkeypatch, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ttrv_edge.models.builders import tiny_cache_dir
    from ttrv_edge.models.loading import resolve_model_path

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
    monkeypatch.setenv("TTRV_EDGE_CACHE", str(tmp_path))
    assert TINY_NAMES["tiny-qwen2.5-vl"] == MODEL_TYPE
    shutil.copytree(model_dir, tiny_cache_dir(MODEL_TYPE))
    assert resolve_model_path("tiny-qwen2.5-vl") == str(tiny_cache_dir(MODEL_TYPE))


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
    assert quantized and all("language_model" in n for n in quantized)
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
    shape = WorkShape(prompt_tokens=inputs["input_ids"].shape[1], new_tokens=16, vision_tokens=64)
    for phase in ("sample", "train"):
        assert planner.estimate(phase, 4, shape) > planner.estimate(phase, 1, shape) > 0


# ----------------------------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The tiny model with LoRA everywhere and trained vision norms, all perturbed, exported once."""
    root = tmp_path_factory.mktemp("export-qwen2_5_vl")
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
    worst = 0.0
    cases = [(image, q.prompt()) for image in _images() for q in QUESTIONS] + [(_images()[:2], QUESTIONS[0].prompt())]
    for image, prompt in cases:
        inputs, tokens, logits = _torch_greedy(vlm, image, prompt)
        result = runner.generate(image, prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert result.token_ids == tokens and result.prompt_tokens == inputs["input_ids"].shape[1]
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(result.logits, logits)))
    assert worst < 1e-4


def test_onnx_inputs_and_image_features_equal_the_processor_and_tower(exported):
    """Token ids, pixels, 3-D positions and vision rope positions equal transformers'; the vision graph's features
    equal the tower's (window attention included: an all-full-attention tower gives other features)."""
    from transformers.vision_utils import get_vision_position_ids

    vlm, runner, _ = exported
    inner = vlm.model.get_base_model().model
    for image in _images()[1:2] + [_images()[:2]]:
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
