"""ONNX export (LoRA merge, graphs, manifest, int8) and the torch-free onnxruntime runner, on tiny random VLMs.

Tolerances, all fp32 on CPU (the tiny models' logits are O(1)):
- merged model vs the same model with the LoRA adapter on: 1e-5 absolute on logits (measured ~2e-7);
- onnxruntime vs torch, every greedy step: 1e-4 absolute on logits (measured ~3e-7), tokens and texts identical;
- int8 graphs vs fp32 graphs, first step: 0.1 absolute on logits (measured ~0.03); int8 tokens are not required to
  agree on these random models, whose top logits are near ties.
Exporting is slow (tens of seconds per model on 2 shared cores), so each architecture is exported once, by a
module-scoped fixture, and shared by the tests. The exported adapter trains everything ttrv-edge can train
(``lora_targets="all"``: LoRA on the language model, the vision tower and the connector, plus ``train_norms``), all
of it perturbed, so the parity checks cover the vision side too.
"""

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import parity_images, perturbed_adapter, torch_greedy

from ttrv_edge.export.graphs import probe_image
from ttrv_edge.export.merge import base_model_for, merge_lora
from ttrv_edge.export.onnx import export_onnx
from ttrv_edge.io.answers import Question
from ttrv_edge.models import load_vlm, vision_tower
from ttrv_edge.rl.sampling import greedy_text
from ttrv_edge.runtime.families import idefics3 as idefics3_runtime
from ttrv_edge.runtime.families import qwen2_vl as qwen2_vl_runtime
from ttrv_edge.runtime.runner import OnnxVLM

NEW_TOKENS = 10
QUESTIONS = (
    Question("Which shape is red?", choices=("circle", "square", "star")),
    Question("How many shapes are there?", numeric=True),
    Question("What colour is the square?", labels=("red", "blue", "green")),
)


@dataclass
class Exported:
    arch: str
    model_dir: Path
    vlm: object  # LoadedVLM with the perturbed adapter on
    adapter_dir: Path
    out_dir: Path
    manifest: dict


@pytest.fixture(scope="module")
def qwen2vl_background(tmp_path_factory, tiny_qwen2vl_dir):
    """Starts `ttrv-edge export` of the Qwen2-VL adapter in a subprocess, so that it runs on the second core while
    the Idefics3 export runs in this process (exports are single-threaded tracing)."""
    root = tmp_path_factory.mktemp("export-qwen2_vl")
    vlm, adapter = perturbed_adapter(tiny_qwen2vl_dir, root)
    command = [sys.executable, "-m", "ttrv_edge", "export", str(adapter), str(root / "onnx"), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield Exported("qwen2_vl", Path(tiny_qwen2vl_dir), vlm, adapter, root / "onnx", {}), process
    if process.poll() is None:
        process.kill()
        process.communicate()


@pytest.fixture(scope="module")
def idefics3_export(tmp_path_factory, tiny_idefics3_dir, qwen2vl_background):
    root = tmp_path_factory.mktemp("export-idefics3")
    vlm, adapter = perturbed_adapter(tiny_idefics3_dir, root)
    manifest = export_onnx(adapter, root / "onnx", int8=True)
    return Exported("idefics3", Path(tiny_idefics3_dir), vlm, adapter, root / "onnx", manifest)


@pytest.fixture(scope="module")
def qwen2vl_export(qwen2vl_background):
    exported, process = qwen2vl_background
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)  # the CLI's --json output: exactly one JSON document
    assert summary["architecture"] == "qwen2_vl" and summary["int8"] is None
    exported.manifest = json.loads((exported.out_dir / "manifest.json").read_text())
    return exported


ARCHS = ("idefics3_export", "qwen2vl_export")


@pytest.mark.parametrize("fixture", ARCHS)
def test_greedy_answers_and_logits_match_torch(fixture, request):
    exported = request.getfixturevalue(fixture)
    runner = OnnxVLM(exported.out_dir)
    worst, tokens_seen = 0.0, 0
    for image in parity_images():
        for question in QUESTIONS:
            inputs, ref_tokens, ref_logits = torch_greedy(exported.vlm, image, question.prompt(), NEW_TOKENS)
            result = runner.generate(image, question.prompt(), max_new_tokens=NEW_TOKENS, return_logits=True)
            assert result.token_ids == ref_tokens
            assert result.prompt_tokens == inputs["input_ids"].shape[1]
            ref_text = greedy_text(exported.vlm, inputs, max_new_tokens=NEW_TOKENS)
            assert result.text == ref_text
            assert runner.answer(image, question, max_new_tokens=NEW_TOKENS)["answer"] == question.extract(ref_text)
            assert len(result.logits) == len(ref_logits)
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits)))
            tokens_seen += len(ref_tokens)
    assert worst < 1e-4
    assert tokens_seen > len(QUESTIONS) * 3  # the comparison covered decode steps, not just the prefill
    check = exported.manifest["check"]
    assert check["tokens_equal"] and check["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("fixture", ARCHS)
def test_merged_weights_equal_adapter_on_outputs(fixture, request):
    exported = request.getfixturevalue(fixture)
    vlm = exported.vlm
    inputs = vlm.prompt_inputs(probe_image(), QUESTIONS[0].prompt())
    features = []  # the vision tower's output: the adapter must change it too
    hook = vision_tower(vlm.model).register_forward_hook(
        lambda module, args, out: features.append(
            out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)
        )
    )
    with torch.no_grad():
        adapted = vlm.model(**inputs).logits
        with vlm.model.disable_adapter():
            base = vlm.model(**inputs).logits
    hook.remove()
    assert (features[0] - features[1]).abs().max() > 1e-2
    with torch.no_grad():
        fresh = load_vlm(str(exported.model_dir), adapter=str(exported.adapter_dir), device="cpu", dtype=torch.float32)
        merged_model = merge_lora(fresh.model)
        merged = merged_model(**inputs).logits
    assert not any("lora_" in name or "modules_to_save" in name for name, _ in merged_model.named_parameters())
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters, so equality below means something
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fixture", ARCHS)
def test_preprocessing_matches_the_transformers_processor(fixture, request):
    exported = request.getfixturevalue(fixture)
    runner, vlm = OnnxVLM(exported.out_dir), exported.vlm
    for image in parity_images():
        prompt = runner.chat.render(QUESTIONS[0].prompt())
        batch = vlm.processor(images=[image], text=[prompt], return_tensors="np")
        prepared = runner.prepare(image, QUESTIONS[0].prompt())
        assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
        pixels = batch["pixel_values"].reshape(prepared.vision_feeds["pixel_values"].shape)
        np.testing.assert_allclose(prepared.vision_feeds["pixel_values"], pixels, atol=1e-6, rtol=0)
        if exported.arch == "qwen2_vl":
            _check_qwen2vl_positions(vlm, batch, prepared)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it red?"}]}]
    assert runner.chat.render("Is it red?") == vlm.processor.apply_chat_template(messages, add_generation_prompt=True)


def _check_qwen2vl_positions(vlm, batch, prepared):
    from transformers.vision_utils import get_vision_position_ids

    grid = torch.from_numpy(batch["image_grid_thw"])
    inner = vlm.model.get_base_model().model
    positions, _ = inner.get_rope_index(
        torch.from_numpy(batch["input_ids"]),
        mm_token_type_ids=torch.from_numpy(batch["mm_token_type_ids"]),
        image_grid_thw=grid,
    )
    assert prepared.position_ids.tolist() == positions.tolist()
    assert prepared.next_position == int(positions.max()) + 1
    vision = get_vision_position_ids(grid, inner.visual.spatial_merge_size)
    assert prepared.vision_feeds["rope_positions"].tolist() == vision.tolist()
    ids = batch["input_ids"]
    grids = [tuple(int(x) for x in grid) for grid in batch["image_grid_thw"]]
    own, _ = qwen2_vl_runtime.text_positions(ids, vlm.model.config.image_token_id, grids, 2)
    assert own.tolist() == positions.tolist()
    assert qwen2_vl_runtime.vision_positions((1, 4, 6), 2).shape == (24, 2)


def test_idefics3_image_splitting_matches_the_processor(tiny_idefics3_dir):
    """SmolVLM checkpoints split large images into crops plus a global view; the tiny model does not, so this runs
    the split path on a processor configured like SmolVLM's (crops of 32 px, longest edge 96)."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": 96}, max_image_size={"longest_edge": 32}, resample=3
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_idefics3_dir)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)
    cfg = {
        **image_processor.to_dict(),
        "longest_edge": 96,
        "max_image_size": 32,
        "image_seq_len": 4,
        "image_token": "<image>",
        "fake_image_token": "<fake_token_around_image>",
        "global_image_token": "<global-img>",
    }
    image = probe_image(96).resize((90, 50))
    pixels, rows, cols = idefics3_runtime.pixels(image, cfg)
    batch = processor(images=[image], text=["look: <image> now"], return_tensors="np")
    assert (rows, cols) == (2, 3) and pixels.shape == (7, 3, 32, 32)
    np.testing.assert_allclose(pixels, batch["pixel_values"][0], atol=1e-6, rtol=0)
    ours = tokenizer(f"look: {idefics3_runtime.image_prompt(rows, cols, cfg)} now")["input_ids"]
    assert ours == batch["input_ids"][0].tolist()


def test_manifest_records_the_export(idefics3_export):
    manifest, out = idefics3_export.manifest, idefics3_export.out_dir
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["opset"] == 18 and manifest["architecture"] == "idefics3"
    assert manifest["source_model"] == str(idefics3_export.model_dir)
    weights = (idefics3_export.adapter_dir / "adapter_model.safetensors").read_bytes()
    assert manifest["adapter"]["sha256"] == hashlib.sha256(weights).hexdigest()
    assert manifest["adapter"]["lora_targets"] == "all" and manifest["adapter"]["train_norms"] is True
    decoder = manifest["graphs"]["decoder"]
    names = [i["name"] for i in decoder["inputs"]]
    layers = manifest["text"]["num_layers"]
    assert names[:4] == ["input_ids", "image_features", "attention_mask", "position_ids"]
    assert len(names) == 4 + 2 * layers and [o["name"] for o in decoder["outputs"]][0] == "logits"
    assert decoder["inputs"][0]["dtype"] == "int64" and decoder["inputs"][4]["shape"][2] == "past"
    assert manifest["graphs"]["vision"]["inputs"][0]["shape"][0] == "num_crops"
    for file in ("vision.onnx", "decoder.onnx", "tokenizer.json", "chat_template.jinja", "processor_config.json"):
        assert (out / file).is_file(), file


def test_int8_graphs_are_smaller_and_close(idefics3_export):
    sizes = idefics3_export.manifest["int8"]
    for name, entry in sizes.items():
        assert entry["bytes"] < 0.75 * entry["fp32_bytes"], name
    fp32 = OnnxVLM(idefics3_export.out_dir).generate(probe_image(), "What?", max_new_tokens=1, return_logits=True)
    int8 = OnnxVLM(idefics3_export.out_dir, int8=True).generate(
        probe_image(), "What?", max_new_tokens=1, return_logits=True
    )
    diff = float(np.abs(fp32.logits[0] - int8.logits[0]).max())
    assert 0 < diff < 0.1  # quantized (not a copy), and still close
    assert "int8_tokens_equal" in idefics3_export.manifest["check"]


def test_answer_command_does_not_import_torch(idefics3_export, tmp_path):
    image = parity_images()[1]
    image.save(tmp_path / "image.png")
    question = QUESTIONS[0]
    code = (
        "import json, sys\n"
        "from ttrv_edge.cli import main\n"
        f"rc = main(['answer', {str(tmp_path / 'image.png')!r}, '--onnx', {str(idefics3_export.out_dir)!r},"
        f" '--question', {question.text!r}, '--choices', {','.join(question.choices)!r}, '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft'))\n"
        "sys.stderr.write(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    status = json.loads(done.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "heavy": []}
    report = json.loads(done.stdout)
    ref = greedy_text(
        idefics3_export.vlm, idefics3_export.vlm.prompt_inputs(image, question.prompt()), max_new_tokens=16
    )
    assert report["text"] == ref and report["answer"] == question.extract(ref)


def test_cli_errors_are_one_line(idefics3_export, qwen2vl_export, tmp_path, capsys):
    from ttrv_edge.cli import main

    image = tmp_path / "image.png"
    probe_image().save(image)
    cases = [
        (["export", str(tmp_path), str(tmp_path / "out")], "ADAPTER_DIR"),
        (["answer", str(image), "--onnx", str(tmp_path)], "--onnx"),
        (["answer", str(image), "--onnx", str(qwen2vl_export.out_dir), "--int8"], "--int8"),
        (["answer", str(tmp_path / "missing.png"), "--onnx", str(idefics3_export.out_dir)], "no such file"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err


def test_base_model_defaults_to_the_adapters_local_base(idefics3_export, tmp_path):
    assert base_model_for(idefics3_export.adapter_dir) == str(idefics3_export.model_dir)
    assert base_model_for(idefics3_export.adapter_dir, "tiny") == "tiny"
    config = json.loads((idefics3_export.adapter_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolVLM-256M-Instruct"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--model"):
        base_model_for(tmp_path)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft asks transformers
def test_quantized_base_is_dequantized_before_the_merge(idefics3_export):
    """An adapter adapted on an int8 (optimum-quanto) base is merged into the dequantized base: the merged model
    reproduces the quantized model with the adapter on, not the fp32 base plus the adapter."""
    from optimum.quanto import freeze, qint8, quantize
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    def adapted(quantized: bool):
        base = AutoModelForImageTextToText.from_pretrained(idefics3_export.model_dir, dtype=torch.float32).eval()
        if quantized:
            quantize(base.model.text_model, weights=qint8)
            freeze(base.model.text_model)
        return PeftModel.from_pretrained(base, str(idefics3_export.adapter_dir)).eval()

    inputs = idefics3_export.vlm.prompt_inputs(probe_image(), QUESTIONS[0].prompt())
    with torch.no_grad():
        quantized = adapted(quantized=True)
        reference = quantized(**inputs).logits
        merged = merge_lora(quantized)
        fp32_merged = merge_lora(adapted(quantized=False))
        assert type(merged.model.text_model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert torch.allclose(merged(**inputs).logits, reference, atol=1e-5, rtol=0)
        assert (fp32_merged(**inputs).logits - reference).abs().max() > 1e-5  # quantization did change the weights


@pytest.mark.parametrize("fixture", ARCHS)
def test_two_image_prompts_match_torch(fixture, request, tmp_path):
    exported = request.getfixturevalue(fixture)
    runner, vlm = OnnxVLM(exported.out_dir), exported.vlm
    pictures = parity_images()[:2]
    prompt = QUESTIONS[0].prompt()
    batch = vlm.processor(images=[pictures], text=[runner.chat.render(prompt, images=2)], return_tensors="np")
    prepared = runner.prepare(pictures, prompt)
    assert prepared.input_ids.tolist() == batch["input_ids"].tolist()
    pixels = batch["pixel_values"].reshape(prepared.vision_feeds["pixel_values"].shape)
    np.testing.assert_allclose(prepared.vision_feeds["pixel_values"], pixels, atol=1e-6, rtol=0)
    if exported.arch == "qwen2_vl":
        _check_qwen2vl_positions(vlm, batch, prepared)
    inputs, ref_tokens, ref_logits = torch_greedy(vlm, pictures, prompt, NEW_TOKENS)
    result = runner.generate(pictures, prompt, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert result.token_ids == ref_tokens and result.prompt_tokens == inputs["input_ids"].shape[1]
    assert max(float(np.abs(a - b).max()) for a, b in zip(result.logits, ref_logits)) < 1e-4
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for picture, path in zip(pictures, paths):
        picture.save(path)
    out = subprocess.run(
        [sys.executable, "-m", "ttrv_edge.runtime.cli", str(exported.out_dir), *map(str, paths), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["image"] == f"{paths[0]} + {paths[1]}"
