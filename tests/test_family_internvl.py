"""InternVL (transformers-native) end to end on the tiny config (64 px tiles of 8 px patches, 16 tokens per tile):
build and load, LoRA placement, episodic / transductive / int8-base adaptation, shared-prefix sampling and scoring,
the memory planner, ONNX export answered by onnxruntime, and the torch-free preprocessing (dynamic tiling on and
off) against the transformers processor.

The images cover one tile (64x64, no thumbnail), 6 tiles + thumbnail (80x48) and 12 tiles + thumbnail (70x50 noise),
so every check runs through InternVL's tiling. Tolerances as in tests/test_export.py (onnxruntime vs torch logits
1e-4, measured ~1e-6; pixels 1e-6, measured 0)."""

import numpy as np
import pytest
import torch
from helpers import (
    SignalQuestion,
    check_int8_base_adapts,
    check_shared_prefix_greedy,
    export_perturbed,
    noise_image,
    parity_images,
    perturb,
    torch_greedy,
)

from ttrv_edge.api import TTRVModel
from ttrv_edge.export.graphs import image_config
from ttrv_edge.io.answers import Question
from ttrv_edge.io.inputs import Item
from ttrv_edge.models import base_model, load_vlm
from ttrv_edge.models.builders import random_vlm_parts, tiny_config
from ttrv_edge.models.families import TINY_NAMES
from ttrv_edge.rl.sampling import greedy_text, sample_rollouts, work_shape
from ttrv_edge.rl.scoring import completion_logprobs
from ttrv_edge.runtime.families import internvl as runtime
from ttrv_edge.runtime.runner import OnnxVLM

NEW_TOKENS = 8
FAST = dict(rollouts=4, views=1, steps=2, max_new_tokens=5, lr=5e-2, seed=3)
QUESTIONS = (
    Question("Which shape is red?", choices=("circle", "square", "star")),
    Question("How many shapes are there?", numeric=True),
)


@pytest.fixture(scope="module")
def model_dir(tiny_family_dir):
    return tiny_family_dir("internvl")


def _tokens(tokenizer, *names):
    return [tokenizer.convert_tokens_to_ids(name) for name in names]


# ------------------------------------------------------------------------------------------------ model


def test_tiny_internvl_is_the_real_family(model_dir):
    from transformers import InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    assert TINY_NAMES["tiny-internvl"] == "internvl"
    vlm = load_vlm(str(model_dir))
    model = base_model(vlm.model)
    assert isinstance(model, InternVLForConditionalGeneration)
    config = model.config
    assert config.text_config.model_type == "qwen2" and config.vision_config.model_type == "internvl_vision"
    assert config.downsample_ratio == 0.5 and config.image_seq_length == 16 == vlm.processor.image_seq_length
    assert type(vlm.processor).__name__ == "InternVLProcessor" and vlm.processor.video_processor is None
    assert isinstance(vlm.processor.image_processor, GotOcr2ImageProcessorPil)
    tokenizer = vlm.tokenizer
    context, start, end = _tokens(tokenizer, "<IMG_CONTEXT>", "<img>", "</img>")
    assert config.image_token_id == context == tokenizer.context_image_token_id
    assert (tokenizer.start_image_token, tokenizer.end_image_token) == ("<img>", "</img>")
    assert {context, start, end} <= set(vlm.suppress_token_ids)
    assert vlm.eos_token_ids == _tokens(tokenizer, "<|im_end|>")
    # the chat template places <IMG_CONTEXT>; the processor expands it to <img> + 16 x tiles + </img>
    inputs = vlm.prompt_inputs(parity_images()[1], "What is it?")
    assert inputs["pixel_values"].shape == (7, 3, 64, 64)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(context) == 7 * 16 and ids.count(start) == ids.count(end) == 1
    assert ids.index(end) - ids.index(start) == 7 * 16 + 1
    rendered = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\n<IMG_CONTEXT>\nHi?<|im_end|>\n<|im_start|>assistant\n"


def test_lora_targets_find_internvits_attention_and_the_projector(model_dir):
    vlm = load_vlm(str(model_dir), lora_targets="vision", train_norms=True)
    adapted = {n.split(".lora_")[0] for n, p in vlm.model.named_parameters() if p.requires_grad and "lora_" in n}
    leaves = {n.rsplit(".", 1)[-1] for n in adapted}
    assert leaves == {"q_proj", "k_proj", "v_proj", "projection_layer", "linear_1", "linear_2"}
    assert all("vision_tower.encoder.layer." in n or "multi_modal_projector" in n for n in adapted)
    norms = [n for n, p in vlm.model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    assert norms and all("layernorm_before" in n or "layernorm_after" in n for n in norms)
    language = load_vlm(str(model_dir))
    names = [n for n, p in language.model.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 4 * 2 and all("language_model.layers." in n for n in names)


# ------------------------------------------------------------------------------------------------ adaptation


def test_episodic_adaptation_updates_resets_and_plans_memory(model_dir):
    api = TTRVModel.from_pretrained(str(model_dir), **FAST)
    loop, vlm = api.loop, api.vlm
    item = loop.prepare("img", parity_images()[1], SignalQuestion("Describe it."))
    with torch.no_grad():
        reference = vlm.model(**item.inputs).logits
    result = loop.adapt_episode(item)
    updated = [s for s in result.steps if s.updated]
    assert updated and all(s.logprob_gap is not None and s.logprob_gap < 1e-3 for s in updated)
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(**item.inputs).logits, reference, rtol=0, atol=0)
    shape = work_shape(vlm, item.inputs, FAST["max_new_tokens"])
    assert shape.vision_tokens == 7 * 64  # 7 tiles of 8 x 8 patches
    planner = loop.memory
    assert planner.costs.patch == 8 and planner.costs.vision_layers == 2
    for phase in ("sample", "train"):
        assert planner.costs.dynamic_bytes(phase, 4, shape) > 0 and planner.estimate(phase, 4, shape) > 0


def test_transductive_adaptation_over_a_set(model_dir, tmp_path):
    api = TTRVModel.from_pretrained(str(model_dir), rollouts=4, views=1, epochs=1, max_new_tokens=4, lr=5e-2)
    paths = []
    for i, image in enumerate(parity_images()[:2]):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    results = api.adapt_dataset([Item(str(p), SignalQuestion("Describe it.")) for p in paths])
    assert [r.image for r in results] == [str(p) for p in paths]
    steps = [s for r in results for s in r.steps]
    assert len(steps) == 2 and any(s.updated for s in steps)
    assert all(s.logprob_gap < 1e-3 for s in steps if s.updated)


def test_int8_base_adapts(model_dir):
    api = check_int8_base_adapts(model_dir, parity_images()[0], FAST, quantized_under="language_model")
    api.reset()


def test_shared_prefix_sampling_and_scoring_are_exact(model_dir):
    """The prompt prefilled once for N rows (sampler) and run once for N rows (scorer) give the plain N-row
    results with a multi-tile image (pixel rows repeated per completion row: [N * tiles, 3, H, W])."""
    vlm = load_vlm(str(model_dir), lora_targets="all", train_norms=True)
    perturb(vlm.model, 0.05)
    inputs = vlm.prompt_inputs(parity_images()[1], "What is it?")
    check_shared_prefix_greedy(vlm, inputs, 2, max_new_tokens=6)
    rollouts = sample_rollouts(vlm, inputs, 3, temperature=1.0, max_new_tokens=6, seed=1)
    paths = [dict(share_prefix=True), dict(share_prefix=False, share_vision=True), dict(share_prefix=False)]
    with torch.no_grad():
        scored = [completion_logprobs(vlm, rollouts, temperature=1.0, backend="torch", **p)[0] for p in paths]
    for logp in scored[:2]:
        torch.testing.assert_close(logp, scored[2], atol=1e-5, rtol=1e-5)
    keep = rollouts.completion_mask.bool()
    assert float((scored[0] - rollouts.sampler_logp)[keep].abs().max()) < 1e-3


# ------------------------------------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """The tiny model with a perturbed adapter everywhere (LoRA on both sides, vision norms), exported once."""
    return export_perturbed(model_dir, tmp_path_factory.mktemp("export-internvl"))


def test_onnx_greedy_answers_equal_torch(exported):
    vlm, out, manifest = exported
    assert manifest["architecture"] == "internvl" and manifest["graphs"]["vision"]["inputs"][0]["shape"][0] == "tiles"
    assert manifest["check"]["tokens_equal"] and manifest["check"]["max_abs_logit_diff"] < 1e-4
    runner = OnnxVLM(out)
    worst, seen = 0.0, 0
    for image in [*parity_images(), parity_images()[:2]]:  # the last: a two-image prompt
        for question in QUESTIONS:
            inputs, tokens, logits = torch_greedy(vlm, image, question.prompt(), NEW_TOKENS)
            result = runner.generate(image, question.prompt(), max_new_tokens=NEW_TOKENS, return_logits=True)
            assert result.token_ids == tokens and result.prompt_tokens == inputs["input_ids"].shape[1]
            assert result.text == greedy_text(vlm, inputs, max_new_tokens=NEW_TOKENS)
            diffs = [float(np.abs(a - b).max()) for a, b in zip(result.logits, logits, strict=True)]
            worst, seen = max(worst, *diffs), seen + len(tokens)
    assert worst < 1e-4 and seen > 2 * len(QUESTIONS)


def test_onnx_preprocessing_matches_the_processor(exported):
    vlm, out, manifest = exported
    runner = OnnxVLM(out)
    assert manifest["preprocess"]["crop_to_patches"] and manifest["preprocess"]["max_patches"] == 12
    for image, tiles in zip(parity_images(), (1, 7, 13), strict=True):
        prompt = runner.chat.render(QUESTIONS[0].prompt())
        batch = vlm.processor(images=[image], text=[prompt], return_tensors="np")
        prepared = runner.prepare(image, QUESTIONS[0].prompt())
        assert prepared.vision_feeds["pixel_values"].shape == (tiles, 3, 64, 64)
        assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
        np.testing.assert_allclose(prepared.vision_feeds["pixel_values"], batch["pixel_values"], atol=1e-6, rtol=0)
        assert prepared.position_ids.tolist() == [list(range(prepared.input_ids.shape[1]))]
        # tiling off (the processor's call-time switch): one resized view
        flat = runtime.pixels(image, {**runner.pre, "crop_to_patches": False})
        off = vlm.processor(images=[image], text=[prompt], return_tensors="np", crop_to_patches=False)
        np.testing.assert_allclose(flat, off["pixel_values"], atol=1e-6, rtol=0)
        ids = runner.chat.encode(prompt.replace("<IMG_CONTEXT>", runtime.image_prompt(1, runner.pre)))
        assert ids.tolist() == off["input_ids"].tolist()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    assert runner.chat.render("Is it red?") == vlm.processor.apply_chat_template(messages, add_generation_prompt=True)


def test_tiling_off_setting_survives_save_and_reaches_the_runtime():
    """``settings["crop_to_patches"] = False`` builds a processor that never tiles (max_patches 1, which the
    processor's own crop_to_patches=True cannot override), and the export's preprocess section says the same."""
    config, settings = tiny_config("internvl", 64, 64, 2, 8)
    _, _, processor, _ = random_vlm_parts(config, {**settings, "crop_to_patches": False})
    cfg = image_config(processor, "internvl")
    image = noise_image()
    batch = processor(images=[image], text=["look <IMG_CONTEXT> here"], return_tensors="np")
    assert batch["pixel_values"].shape == (1, 3, 64, 64) and cfg["max_patches"] == 1
    np.testing.assert_allclose(runtime.pixels(image, cfg), batch["pixel_values"], atol=1e-6, rtol=0)
    assert runtime.tiled_canvas(50, 70, (64, 64), 1, 12) == (4, 3)
    assert runtime.tiled_canvas(64, 64, (64, 64), 1, 12) == (1, 1)  # ties favour more tiles only for large images
    assert runtime.tiled_canvas(200, 200, (64, 64), 1, 12) == (3, 3)


def test_vision_graph_with_qk_norm_exports(tmp_path):
    """The larger checkpoints' InternViT-6B uses RMSNorm and qk-norm: the same graph (the model's own
    get_image_features) exports with a dynamic tile count and agrees with torch."""
    import onnxruntime as ort

    from ttrv_edge.export.families import internvl as export_family

    config, settings = tiny_config("internvl", 64, 64, 1, 8)
    config["vision_config"].update(use_qk_norm=True, norm_type="rms_norm", attention_bias=False)
    model_cls, model_config, _, _ = random_vlm_parts(config, settings)
    torch.manual_seed(0)
    model = model_cls(model_config).eval()
    with torch.no_grad():  # away from the initial values (zero position embeddings, unit norms)
        for param in model.model.vision_tower.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    graph = export_family.vision_graph(model).eval()
    assert type(model.model.vision_tower.encoder.layer[0].attention.q_norm).__name__ == "InternVLVisionRMSNorm"
    tiles = torch.randn(3, 3, 64, 64)
    (example,), names, axes = export_family.vision_example({"pixel_values": tiles[:1]}, {})
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (example,), dynamo=True, input_names=names, dynamic_shapes=axes, opset_version=18, verbose=False
        )
        reference = graph(tiles).numpy()
    program.save(str(tmp_path / "vision.onnx"))
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"), providers=["CPUExecutionProvider"])
    features = session.run(None, {"pixel_values": tiles.numpy()})[0]
    assert features.shape == (3 * 16, 64)
    np.testing.assert_allclose(features, reference, atol=1e-4, rtol=0)
