"""Model loading: tiny random Idefics3 and Qwen2-VL built offline, LoRA placement, exact hidden-state path,
adapter and LoRA-state round trips, user errors, and trust_remote_code discipline."""

import re

import pytest
import torch
import transformers

from ttrv_edge import models
from ttrv_edge.models import (
    LORA_TARGET_REGEX,
    backbone_hidden_states,
    lm_head,
    load_lora_state,
    load_processor,
    load_vlm,
    lora_state,
    sequence_inputs,
)
from ttrv_edge.models.builders import build_tiny_vlm, ensure_tiny_vlm

ARCHS = ["idefics3", "qwen2_vl"]
PIXEL_KEYS = {"idefics3": {"pixel_values", "pixel_attention_mask"}, "qwen2_vl": {"pixel_values", "image_grid_thw"}}
VISION_PREFIXES = {"idefics3": ("model.vision_model", "model.connector"), "qwen2_vl": ("model.visual",)}


@pytest.fixture
def tiny_dir(request, tiny_idefics3_dir, tiny_qwen2vl_dir):
    return {"idefics3": tiny_idefics3_dir, "qwen2_vl": tiny_qwen2vl_dir}[request.param]


def _load(path, **kwargs):
    return load_vlm(str(path), **kwargs)


def _perturb_lora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


def _sequences(vlm, inputs, n=3, new=5):
    """The prompt followed by n random completions (no special tokens) of length ``new``."""
    gen = torch.Generator().manual_seed(0)
    completions = torch.randint(len(vlm.tokenizer.all_special_ids) + 40, len(vlm.tokenizer), (n, new), generator=gen)
    return torch.cat([inputs["input_ids"].repeat(n, 1), completions], dim=1)


@pytest.mark.parametrize("tiny_dir", ARCHS, indirect=True)
def test_only_language_model_lora_is_trainable(tiny_dir, request):
    arch = request.node.callspec.params["tiny_dir"]
    vlm = _load(tiny_dir)
    base = vlm.model.get_base_model()
    assert sum(p.numel() for p in base.parameters()) < 2_000_000
    trainable = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    text_key = "text_model" if arch == "idefics3" else "language_model"
    assert all(f".{text_key}.layers." in n for n in trainable)
    # one LoRA A and B per q/k/v/o projection of every text layer
    layers = base.config.get_text_config().num_hidden_layers
    assert len(trainable) == layers * 4 * 2
    vision = [(n, p) for n, p in base.named_parameters() if n.startswith(VISION_PREFIXES[arch])]
    assert vision and not any(p.requires_grad for _, p in vision)
    assert not any("lora_" in n for n, _ in vision)
    assert not vlm.model.training


@pytest.mark.parametrize("tiny_dir", ARCHS, indirect=True)
def test_lora_regex_matches_only_text_attention(tiny_dir, request):
    from transformers import AutoModelForImageTextToText

    arch = request.node.callspec.params["tiny_dir"]
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_dir))
    matched = [n for n, _ in base.named_modules() if re.fullmatch(LORA_TARGET_REGEX, n)]
    assert matched
    assert not any(n.startswith(VISION_PREFIXES[arch]) for n in matched)
    assert {n.rsplit(".", 1)[1] for n in matched} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # the vision towers have attention projections of their own that must stay out
    vision_attn = [n for n, _ in base.named_modules() if n.startswith(VISION_PREFIXES[arch]) and "attn" in n]
    assert vision_attn


@pytest.mark.parametrize("tiny_dir", ARCHS, indirect=True)
def test_prompt_inputs_generate_and_eos(tiny_dir, request, test_image):
    arch = request.node.callspec.params["tiny_dir"]
    vlm = _load(tiny_dir)
    inputs = vlm.prompt_inputs(test_image, "What shape is red? The answer is")
    expected = {"input_ids", "attention_mask"} | PIXEL_KEYS[arch]
    if arch == "qwen2_vl" and "mm_token_type_ids" in models.forward_params(vlm.model):
        expected.add("mm_token_type_ids")
    assert set(inputs.keys()) == expected
    assert inputs["input_ids"].shape[0] == 1 and inputs["pixel_values"].dtype == torch.float32
    image_id = vlm.model.get_base_model().config.image_token_id
    assert (inputs["input_ids"] == image_id).sum() > 0
    torch.manual_seed(0)
    with torch.no_grad():
        out = vlm.model.generate(**inputs, do_sample=True, max_new_tokens=16, num_return_sequences=8)
    new = out[:, inputs["input_ids"].shape[1] :]
    assert new.shape[0] == 8 and new.shape[1] >= 1
    is_eos = torch.isin(new, torch.tensor(vlm.eos_token_ids))
    before_eos = (is_eos.cumsum(-1) - is_eos.long()) == 0  # padding follows the first EOS
    assert not torch.isin(new, torch.tensor(vlm.suppress_token_ids))[before_eos].any()
    assert image_id in vlm.suppress_token_ids
    # EOS is an ordinary, reachable vocabulary token: positive probability, and generation stops on it
    eos = vlm.eos_token_ids
    assert eos and eos[0] not in vlm.suppress_token_ids and eos[0] < lm_head(vlm.model).out_features
    assert vlm.tokenizer.convert_ids_to_tokens(eos[0]) in ("<end_of_utterance>", "<|im_end|>")
    with torch.no_grad():
        probs = vlm.model(**inputs).logits[0, -1].softmax(-1)
    assert probs[eos[0]] > 1e-5
    with torch.no_grad():
        forced = vlm.model.generate(**inputs, max_new_tokens=8, sequence_bias={(eos[0],): 100.0})
    assert forced[0, inputs["input_ids"].shape[1] :].tolist() == [eos[0]]


@pytest.mark.parametrize("tiny_dir", ARCHS, indirect=True)
def test_backbone_hidden_states_give_the_model_logits(tiny_dir, test_image):
    vlm = _load(tiny_dir)
    _perturb_lora(vlm.model)  # LoRA B starts at zero: make sure the hidden states include the adapter
    inputs = vlm.prompt_inputs(test_image, "Which colour is the circle?")
    batch = sequence_inputs(inputs, _sequences(vlm, inputs))
    with torch.no_grad():
        logits = vlm.model(**batch).logits
        hidden = backbone_hidden_states(vlm.model, **batch)
        with vlm.model.disable_adapter():
            hidden_ref = backbone_hidden_states(vlm.model, **batch)
    assert hidden.shape == (*batch["input_ids"].shape, lm_head(vlm.model).in_features)
    torch.testing.assert_close(lm_head(vlm.model)(hidden), logits, rtol=0, atol=1e-5)
    assert not torch.allclose(hidden, hidden_ref)  # the adapter is active in the backbone path


def test_qwen_hidden_states_accept_prompt_length_mm_token_types(tiny_qwen2vl_dir, test_image):
    vlm = _load(tiny_qwen2vl_dir)
    inputs = vlm.prompt_inputs(test_image, "Count the shapes.")
    if "mm_token_type_ids" not in inputs:
        pytest.skip("this transformers version computes Qwen2-VL positions without mm_token_type_ids")
    batch = sequence_inputs(inputs, _sequences(vlm, inputs, n=2))
    short = dict(batch, mm_token_type_ids=inputs["mm_token_type_ids"])  # prompt-length types, batch 1
    missing = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        full = backbone_hidden_states(vlm.model, **batch)
        torch.testing.assert_close(backbone_hidden_states(vlm.model, **short), full, rtol=0, atol=0)
        torch.testing.assert_close(backbone_hidden_states(vlm.model, **missing), full, rtol=0, atol=0)


@pytest.mark.parametrize("tiny_dir", ARCHS, indirect=True)
def test_adapter_save_and_load_round_trip(tiny_dir, tmp_path, test_image):
    vlm = _load(tiny_dir)
    _perturb_lora(vlm.model)
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    with torch.no_grad():
        expected = vlm.model(**inputs).logits
    vlm.model.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "adapter").glob("*.bin"))
    fresh = _load(tiny_dir)
    with torch.no_grad():
        assert not torch.equal(fresh.model(**inputs).logits, expected)
    loaded = _load(tiny_dir, adapter=str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, expected)
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_state_restores_exact_outputs(tiny_idefics3_dir, test_image):
    vlm = _load(tiny_idefics3_dir)
    _perturb_lora(vlm.model, seed=3)
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    snapshot = lora_state(vlm.model)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
    _perturb_lora(vlm.model, seed=4)
    with torch.no_grad():
        assert not torch.equal(vlm.model(**inputs).logits, before)
    assert all(not t.requires_grad for t in snapshot.values())
    load_lora_state(vlm.model, snapshot)
    with torch.no_grad():
        assert torch.equal(vlm.model(**inputs).logits, before)
    with pytest.raises(ValueError, match="LoRA state"):
        load_lora_state(vlm.model, dict(list(snapshot.items())[1:]))


def test_lora_rank_and_alpha(tiny_idefics3_dir):
    vlm = _load(tiny_idefics3_dir, lora_rank=4)
    config = vlm.model.peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 8
    a = next(p for n, p in vlm.model.named_parameters() if "lora_A" in n)
    assert a.shape[0] == 4
    with pytest.raises(ValueError, match="--lora-rank"):
        _load(tiny_idefics3_dir, lora_rank=0)


def test_bad_model_paths_raise_value_error(tmp_path, tiny_idefics3_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for bad in (str(tmp_path / "missing" / "model"), str(tmp_path / "empty"), str(tmp_path / "file.txt"), "./nope"):
        with pytest.raises(ValueError, match="^--model: ") as info:
            load_vlm(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="^--adapter: "):
        load_vlm(str(tiny_idefics3_dir), adapter=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="^--model: "):
        build_tiny_vlm(tmp_path / "x", "gemma3")


def test_trust_remote_code_only_when_asked(tiny_qwen2vl_dir, monkeypatch):
    seen = []

    def spy(cls_name):
        auto = getattr(transformers, cls_name)
        try:
            original = auto.from_pretrained.__func__
        except ImportError:  # transformers 5.17 without torchvision: AutoImageProcessor is a placeholder
            return

        def wrapped(cls, *args, **kwargs):
            seen.append((cls_name, kwargs.get("trust_remote_code", False)))
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(wrapped))

    for name in ("AutoModelForImageTextToText", "AutoProcessor", "AutoTokenizer", "AutoImageProcessor"):
        spy(name)
    _load(tiny_qwen2vl_dir)
    assert {"AutoModelForImageTextToText", "AutoTokenizer"} <= {name for name, _ in seen}
    assert not any(flag for _, flag in seen)
    seen.clear()
    _load(tiny_qwen2vl_dir, trust_remote_code=True)
    assert seen and all(flag is True for _, flag in seen)


def test_qwen_processor_loads_without_a_video_processor(tiny_qwen2vl_dir, test_image):
    processor = load_processor(tiny_qwen2vl_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|image_pad|>" in text
    out = processor(images=[test_image], text=[text], return_tensors="pt")
    grid = out["image_grid_thw"][0]
    assert (out["input_ids"] == processor.image_token_id).sum() == grid.prod() // 4


def test_qwen_processor_falls_back_when_autoprocessor_wants_a_video_config(tiny_qwen2vl_dir, monkeypatch):
    """With torchvision installed, transformers 5.17's AutoProcessor raises OSError for a folder without a video
    processor config (seen on a GPU machine): the image-only processor is rebuilt instead of failing the load."""
    import transformers

    from ttrv_edge.models import processors

    def no_video_config(path, **kwargs):
        raise OSError(f"Can't load video processor for '{path}'")

    monkeypatch.setattr(processors, "_has_torchvision", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", no_video_config)
    processor = load_processor(tiny_qwen2vl_dir)
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.video_processor is None


def test_processor_is_rebuilt_from_the_pil_image_processor_when_auto_classes_need_torchvision(
    tiny_idefics3_dir, tiny_family_dir, monkeypatch, test_image
):
    """transformers 5.17 without torchvision: AutoProcessor and AutoImageProcessor both refuse. With this fallback
    the whole test suite passed against 5.17; this test stands in for that run on the versions CI installs."""
    import transformers

    def refuse(*args, **kwargs):
        raise ImportError("AutoImageProcessor requires the Torchvision library")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    try:
        monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    except ImportError:  # transformers 5.17 without torchvision: a placeholder that refuses by itself
        pass
    for path, expected in ((tiny_idefics3_dir, "Idefics3ImageProcessorPil"),
                           (tiny_family_dir("internvl"), "GotOcr2ImageProcessorPil")):  # fmt: skip
        processor = load_processor(path)
        assert type(processor.image_processor).__name__ == expected
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert processor(images=[test_image], text=[text], return_tensors="pt")["pixel_values"].numel() > 0


def test_a_broken_folder_reports_autoprocessors_error_not_the_rebuilds(tiny_idefics3_dir, tmp_path, monkeypatch):
    import shutil

    import transformers

    broken = tmp_path / "broken"
    shutil.copytree(tiny_idefics3_dir, broken)
    (broken / "tokenizer.json").unlink()

    def refuse(*args, **kwargs):
        raise ValueError("the first error")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)
    with pytest.raises(ValueError, match="the first error"):
        load_processor(broken)


def test_tokenizer_covers_answers_and_extra_words(tmp_path):
    path = build_tiny_vlm(tmp_path / "m", "idefics3", words=["zebra crossing", "Octagon!"])
    tokenizer = load_processor(path).tokenizer
    for text in ("The answer is (B).", "the answer is a red circle", "yes, 3 of 10: seven", "zebra crossing Octagon"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
    assert tokenizer.tokenize("The answer is (B).") == ["The", "answer", "is", "(", "B", ")", "."]
    assert tokenizer.unk_token_id in tokenizer("Quetzalcoatl", add_special_tokens=False)["input_ids"]
    template = load_processor(path).apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    assert template == "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"


def test_tiny_build_is_deterministic_in_the_seed(tmp_path):
    from safetensors.torch import load_file

    a = load_file(build_tiny_vlm(tmp_path / "a", "qwen2_vl", seed=5) / "model.safetensors")
    b = load_file(build_tiny_vlm(tmp_path / "b", "qwen2_vl", seed=5) / "model.safetensors")
    c = load_file(build_tiny_vlm(tmp_path / "c", "qwen2_vl", seed=6) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_aliases_use_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TTRV_EDGE_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny_vlm("idefics3")
    assert path == tmp_path / "cache" / "tiny-idefics3-v1" and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr("ttrv_edge.models.builders.build_tiny_vlm", lambda *a, **k: calls.append(a))
    assert models.resolve_model_path("tiny") == str(path)
    assert calls == [] and (path / "model.safetensors").stat().st_mtime_ns == stamp
