"""LLaVA (``LlavaForConditionalGeneration``) end to end on tiny random models, with both towers: CLIP + Llama (the
default ``tiny-llava``, as llava-1.5) and SigLIP + Qwen2 (as llava-interleave-qwen).

What is checked: the tiny model is built like llava-hf's (classes, template, tokens, image-token count); LoRA lands
on the text attention, or on the tower's attention and the projector; episodic and transductive adaptation run with
the sampler and the loss scoring the same tokens (``logprob_gap`` < 1e-3); the shared-prefix sampler and the scoring
paths are exact; the memory planner estimates; an int8 base adapts; the ONNX export (LoRA everywhere + trained norms,
all perturbed) answers with onnxruntime exactly as torch does (greedy tokens identical, logits within 1e-4: measured
~1e-6), one and two images per prompt, and its torch-free preprocessing equals ``LlavaProcessor``'s.
Each tower is exported once (module-scoped fixture).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    SignalQuestion,
    check_shared_prefix_greedy,
    export_perturbed,
    lora_snapshot,
    parity_images,
    perturb,
    torch_greedy,
)
from PIL import Image

from ttrv_edge.api import TTRVModel
from ttrv_edge.config import TTRVConfig
from ttrv_edge.export.graphs import probe_image
from ttrv_edge.io.inputs import Item
from ttrv_edge.memory import MemoryPlanner, model_costs
from ttrv_edge.models import load_vlm, vision_tower
from ttrv_edge.models.builders import build_random_vlm
from ttrv_edge.models.families import TINY_NAMES, llava
from ttrv_edge.rl.loop import AdaptationLoop
from ttrv_edge.rl.sampling import sample_rollouts, work_shape
from ttrv_edge.rl.scoring import completion_logprobs
from ttrv_edge.runtime.families import llava as llava_runtime
from ttrv_edge.runtime.runner import OnnxVLM

TOWERS = ("clip", "siglip")
FAST = dict(rollouts=4, views=1, max_new_tokens=4, lr=5e-2, seed=3)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def llava_dirs(tiny_family_dir, tmp_path_factory):
    config, settings = llava.tiny_config(64, 64, 2, 8, tower="siglip")
    siglip = build_random_vlm(tmp_path_factory.mktemp("tiny-llava-siglip"), config, settings)
    return {"clip": Path(tiny_family_dir("llava")), "siglip": Path(siglip)}


def _images() -> list[Image.Image]:
    return [*parity_images(), probe_image(96).resize((40, 90))]


# ----------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("tower", TOWERS)
def test_tiny_llava_is_built_like_llava_hf(tower, llava_dirs, test_image):
    vlm = load_vlm(str(llava_dirs[tower]), device="cpu", dtype=torch.float32)
    model, config = vlm.model.get_base_model(), vlm.model.get_base_model().config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(vlm.processor).__name__ == "LlavaProcessor"
    expected = {"clip": ("clip_vision_model", "llama", "CLIPImageProcessorPil", -2, "default", 1)}
    expected["siglip"] = ("siglip_vision_model", "qwen2", "SiglipImageProcessorPil", -1, "full", 0)
    vision_type, text_type, processor_type, layer, strategy, extra = expected[tower]
    assert (config.vision_config.model_type, config.text_config.model_type) == (vision_type, text_type)
    assert type(vlm.processor.image_processor).__name__ == processor_type
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (layer, strategy)
    assert vlm.processor.num_additional_image_tokens == extra and vlm.processor.patch_size == 8
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    prompt = vlm.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat is it? ASSISTANT:"
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    tokens = vlm.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    assert tokens[:3] == ["<s>", "USER", ":"] and tokens[-2:] == ["ASSISTANT", ":"]
    assert tokens.count("<image>") == 64 == config.image_seq_length  # 8 x 8 patches (CLIP: + CLS - CLS)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)
    ids = vlm.tokenizer.convert_tokens_to_ids
    assert config.image_token_id == ids("<image>") and vlm.eos_token_ids == [ids("</s>")]
    assert {ids("<image>"), ids("<pad>")} <= set(vlm.suppress_token_ids)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert features[0].shape == (64, config.text_config.hidden_size)


def test_tiny_llava_name_builds_offline(tmp_path, monkeypatch):
    from ttrv_edge.export.families import EXPORTABLE
    from ttrv_edge.models.loading import resolve_model_path
    from ttrv_edge.runtime.families import RUNTIME_FAMILIES

    assert TINY_NAMES["tiny-llava"] == "llava" and "llava" in EXPORTABLE and "llava" in RUNTIME_FAMILIES
    monkeypatch.setenv("TTRV_EDGE_CACHE", str(tmp_path))
    path = Path(resolve_model_path("tiny-llava"))
    assert path.parent == tmp_path and json.loads((path / "config.json").read_text())["model_type"] == "llava"
    with pytest.raises(ValueError, match="tower"):
        llava.tiny_config(64, 64, 2, 8, tower="vit")


@pytest.mark.parametrize("tower", TOWERS)
def test_lora_lands_on_the_text_attention_or_the_tower_and_projector(tower, llava_dirs):
    def adapted(**options):
        vlm = load_vlm(str(llava_dirs[tower]), device="cpu", dtype=torch.float32, **options)
        params = [n.removeprefix("base_model.model.model.") for n, _ in vlm.model.named_parameters()]
        names = {n.rsplit(".lora_A", 1)[0] for n in params if "lora_A" in n}
        norms = {n.split(".modules_to_save")[0] for n in params if ".modules_to_save." in n}
        return names, {n for n in norms if "norm" in n and "vision_tower" in n}

    language, _ = adapted()
    assert language == {f"language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    vision, norms = adapted(lora_targets="vision", train_norms=True)
    attention = {f"vision_tower.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj")}
    attention |= {f"vision_tower.encoder.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("v_proj", "out_proj")}
    assert vision == attention | {"multi_modal_projector.linear_1", "multi_modal_projector.linear_2"}
    layer_norms = {f"vision_tower.encoder.layers.{i}.layer_norm{j}" for i in (0, 1) for j in (1, 2)}
    assert layer_norms | {"vision_tower.post_layernorm"} <= norms


# ----------------------------------------------------------------------------------------------- adaptation


@pytest.mark.parametrize("tower", TOWERS)
def test_episodic_and_transductive_adaptation(tower, llava_dirs, test_image, tmp_path):
    api = TTRVModel.from_pretrained(str(llava_dirs[tower]), steps=2, lora_targets="all", **FAST)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    result = api.loop.adapt_episode(item, index=0)
    updated = [s for s in result.steps if s.updated]
    assert updated and all(s.logprob_gap is not None and s.logprob_gap < 1e-3 for s in updated)
    assert result.after is not None
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        test_image.rotate(90 * i).save(paths[-1])
    results = api.adapt_dataset([Item(str(p), SignalQuestion("Describe it.")) for p in paths], epochs=1)
    steps = [s for r in results for s in r.steps]
    assert len(steps) == 2 and any(s.updated for s in steps)  # batch size 1: one step per item
    assert all(s.logprob_gap < 1e-3 for s in steps if s.updated)
    assert all(r.after is not None for r in results)


def test_shared_prefix_sampling_and_scoring_are_exact(llava_dirs, test_image):
    """The prompt prefilled once and the image encoded once give plain generate's tokens, and the N-row forward's
    log-probs and gradients, with the tower and the projector trained."""
    vlm = load_vlm(str(llava_dirs["clip"]), device="cpu", dtype=torch.float32, lora_targets="all", train_norms=True)
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    check_shared_prefix_greedy(vlm, inputs, 3, max_new_tokens=8)
    perturb(vlm.model, 0.05)
    rollouts = sample_rollouts(vlm, inputs, 4, temperature=1.0, max_new_tokens=6, seed=1)
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    results = []
    for options in (dict(share_prefix=True), dict(share_prefix=False, share_vision=True), dict(share_prefix=False)):
        for p in params:
            p.grad = None
        logp, entropy = completion_logprobs(vlm, rollouts, temperature=1.0, backend="torch", **options)
        (logp.sum() + entropy.sum()).backward()
        results.append((logp.detach(), [None if p.grad is None else p.grad.clone() for p in params]))
    reference = results[-1]
    tower = {id(p) for p in vision_tower(vlm.model).encoder.layers[0].parameters() if p.requires_grad}
    assert any(g is not None and g.abs().max() > 0 for p, g in zip(params, reference[1]) if id(p) in tower)
    for logp, grads in results[:-1]:
        torch.testing.assert_close(logp, reference[0], atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, reference[1]):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    planner = MemoryPlanner(vlm.model, None)
    shape = work_shape(vlm, inputs, 16)
    assert shape.vision_tokens == 64 and planner.estimate("train", 4, shape) > planner.estimate("train", 1, shape) > 0
    costs = model_costs(vlm.model)
    assert (costs.vision_layers, costs.patch, costs.vision_trained) == (2, 8, True)


def test_int8_base_adapts(llava_dirs, test_image):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    vlm = load_vlm(str(llava_dirs["clip"]), quantize="int8")
    base = vlm.model.get_base_model().model
    assert isinstance(base.language_model.layers[0].mlp.down_proj, QLinear)
    assert type(base.vision_tower.encoder.layers[0].mlp.fc1) is torch.nn.Linear
    assert type(base.multi_modal_projector.linear_1) is torch.nn.Linear
    loop = AdaptationLoop(vlm, TTRVConfig(rollouts=4, max_new_tokens=4, lr=5e-2, quantize="int8"))
    before = lora_snapshot(vlm.model)
    record = loop.step([loop.prepare("img", test_image, SignalQuestion("Describe it."))], 0, seed=1)
    assert record.updated and record.logprob_gap < 1e-3
    assert any(not torch.equal(p, before[n]) for n, p in vlm.model.named_parameters() if n in before)


# ----------------------------------------------------------------------------------------------- export


@dataclass
class Exported:
    vlm: object  # LoadedVLM with the perturbed adapter on
    out_dir: Path
    manifest: dict


@pytest.fixture(scope="module", params=TOWERS)
def exported(request, llava_dirs, tmp_path_factory):
    """The tiny model with LoRA everywhere and trained vision norms, all perturbed (lora_B starts at zero, the norm
    copies at the base's values), exported once per tower."""
    root = tmp_path_factory.mktemp(f"export-llava-{request.param}")
    return Exported(*export_perturbed(llava_dirs[request.param], root))


def test_onnx_greedy_answers_equal_torch(exported):
    runner, vlm = OnnxVLM(exported.out_dir), exported.vlm
    assert exported.manifest["architecture"] == "llava" and exported.manifest["check"]["tokens_equal"]
    assert exported.manifest["check"]["max_abs_logit_diff"] < 1e-4
    worst, tokens_seen = 0.0, 0
    cases = [(image, "Which shape is red?") for image in _images()] + [(_images()[:2], "Are they the same?")]
    for image, prompt in cases:
        _, ref_tokens, ref_logits = torch_greedy(vlm, image, prompt, NEW_TOKENS)
        result = runner.generate(image, prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
        assert result.token_ids == ref_tokens
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits)))
        tokens_seen += len(ref_tokens)
    assert worst < 1e-4 and tokens_seen > 2 * len(cases)
    inputs = vlm.prompt_inputs(probe_image(), "What?")  # the adapter changes the image features: parity covers them
    inner = vlm.model.get_base_model().model
    with torch.no_grad():
        adapted = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        with vlm.model.disable_adapter():
            base = inner.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert (adapted - base).abs().max() > 1e-2


def test_onnx_preprocessing_equals_the_llava_processor(exported):
    runner, vlm = OnnxVLM(exported.out_dir), exported.vlm
    cases = [[image] for image in _images()] + [_images()[1:3]]
    for images in cases:
        prompt = runner.chat.render("Which shape is red?", images=len(images))
        batch = vlm.processor(images=[images] if len(images) > 1 else images, text=[prompt], return_tensors="np")
        prepared = runner.prepare(images if len(images) > 1 else images[0], "Which shape is red?")
        assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
        np.testing.assert_allclose(prepared.vision_feeds["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)
        assert prepared.position_ids.tolist() == [list(range(prepared.input_ids.shape[1]))]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    assert runner.chat.render("Is it red?") == vlm.processor.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize(
    "size, crop, image_size",
    [(48, (64, 64), (50, 70)), (72, (64, 48), (45, 91)), (64, (64, 64), (90, 33)), (None, None, (37, 80))],
)
def test_runtime_pixels_equal_clip_and_siglip_processors(size, crop, image_size):
    """The crop-after-resize paths the tiny model does not take: a crop larger than the resized image (zero padding),
    non-square crops, odd sizes; and SigLIP's plain resize to a non-square size."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if size is None:
        processor = SiglipImageProcessorPil(size={"height": 48, "width": 32})
        cfg = {**processor.to_dict(), "size_height": 48, "size_width": 32, "do_center_crop": False}
    else:
        processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": crop[0], "width": crop[1]})
        cfg = {**processor.to_dict(), "size_shortest_edge": size, "crop_height": crop[0], "crop_width": crop[1]}
    noise = np.random.default_rng(1).integers(0, 256, (*image_size, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    ours = llava_runtime.pixels(image, cfg)
    np.testing.assert_allclose(ours, processor(images=[image], return_tensors="np")["pixel_values"][0], atol=1e-6)
    tokens = {"patch_size": 8, "num_additional_image_tokens": 1, "vision_feature_select_strategy": "full"}
    assert (
        llava_runtime.image_tokens(ours.shape[1], ours.shape[2], tokens)
        == ours.shape[1] // 8 * (ours.shape[2] // 8) + 1
    )
