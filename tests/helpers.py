"""Test plumbing shared by several test files: a question that always gives a random model's group a learning signal,
the perturbed adapter and the torch greedy reference of the ONNX parity tests, their images, and the adaptation,
scoring and export checks that every tiny family runs the same way.

Not a test module (pytest collects test_*.py only); ``from helpers import ...`` works because pyproject's pytest
settings put tests/ on sys.path (``pythonpath``), and conftest.py has pytest rewrite its asserts like a test module's.
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ttrv_edge.export.graphs import probe_image
from ttrv_edge.io.answers import Question


@dataclass(frozen=True)
class SignalQuestion(Question):
    """Answers "x", "y", "x", "x", "y", "x", ... in call order (two "x" and one "y" in any three successive calls), so
    a random model's group always carries a learning signal."""

    calls: list = field(default_factory=list, compare=False)

    def extract(self, text: str) -> str | None:
        self.calls.append(text)
        return "xxy"[len(self.calls) % 3]


# ----------------------------------------------------------------------------------------------- images


def noise_image() -> Image.Image:
    """70 x 50 RGB noise (seeded): no shapes, odd size."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))


def parity_images() -> list[Image.Image]:
    """The ONNX parity tests' images: the 64 px probe, an 80 x 48 resize of the 96 px probe, and noise."""
    return [probe_image(64), probe_image(96).resize((80, 48)), noise_image()]


# ----------------------------------------------------------------------------------------------- adapters


def lora_snapshot(model) -> dict:
    """A clone of every LoRA weight, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def perturb(model, lora_scale: float, norm_scale: float | None = None, seed: int = 0) -> None:
    """lora_B starts at zero and the trained norms' copies at the base's values: set every lora_B to
    ``randn * lora_scale`` and, with ``norm_scale``, add ``randn * norm_scale`` to every trained norm, all drawn from
    one seeded generator in ``named_parameters`` order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * lora_scale)
            elif norm_scale is not None and ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * norm_scale)


def perturbed_adapter(model_dir, root: Path):
    """The tiny model with LoRA everywhere and trained vision norms that change its outputs, all perturbed (lora_B
    0.5, norms 0.2), saved under root/adapter: ``(vlm, root / "adapter")``."""
    from ttrv_edge.models import load_vlm

    vlm = load_vlm(str(model_dir), device="cpu", dtype=torch.float32, lora_targets="all", train_norms=True)
    perturb(vlm.model, 0.5, 0.2)
    vlm.model.save_pretrained(root / "adapter", safe_serialization=True)
    return vlm, root / "adapter"


def export_perturbed(model_dir, root: Path):
    """``perturbed_adapter`` exported to root/onnx: ``(vlm, root / "onnx", manifest)``."""
    from ttrv_edge.export.onnx import export_onnx

    vlm, adapter = perturbed_adapter(model_dir, root)
    manifest = export_onnx(adapter, root / "onnx")
    return vlm, root / "onnx", manifest


def torch_greedy(vlm, image, prompt: str, max_new_tokens: int):
    """torch's greedy reference: ``(inputs, new token ids, per-step logits of row 0 as numpy arrays)``."""
    inputs = vlm.prompt_inputs(image, prompt)
    with torch.no_grad():
        out = vlm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=vlm.eos_token_ids,
            pad_token_id=vlm.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    return inputs, tokens, [step[0].numpy() for step in out.logits]


# ----------------------------------------------------------------------------------------------- family checks


def check_shared_prefix_greedy(vlm, inputs, rows: int, max_new_tokens: int) -> None:
    """Greedy rows sampled from one shared prefill equal plain one-row generation."""
    from ttrv_edge.rl.sampling import generate_completions

    greedy = dict(max_new_tokens=max_new_tokens, temperature=None)
    plain = generate_completions(vlm, inputs, 1, shared_prefix=False, **greedy).ids
    shared = generate_completions(vlm, inputs, rows, shared_prefix=True, **greedy).ids
    assert all(row.tolist() == plain[0].tolist() for row in shared)


def check_tiny_name_resolves(tiny_name: str, model_type: str, model_dir, monkeypatch, tmp_path) -> None:
    """``--model <tiny_name>`` names ``model_type`` and resolves to the cached build of that family (the cache under
    tmp_path, holding a copy of model_dir)."""
    from ttrv_edge.models.builders import tiny_cache_dir
    from ttrv_edge.models.families import TINY_NAMES
    from ttrv_edge.models.loading import resolve_model_path

    monkeypatch.setenv("TTRV_EDGE_CACHE", str(tmp_path))
    assert TINY_NAMES[tiny_name] == model_type
    shutil.copytree(model_dir, tiny_cache_dir(model_type))
    assert resolve_model_path(tiny_name) == str(tiny_cache_dir(model_type))


def check_episodic_step_reset_and_transductive_run(model_dir, image, tmp_path, fast: dict) -> None:
    """A step changes LoRA with the sampler and the loss scoring the same tokens (gap < 1e-3), reset restores it
    bit-exactly, ``adapt`` runs, and a transductive epoch over two images takes one step per image."""
    from ttrv_edge.api import TTRVModel
    from ttrv_edge.io.inputs import Item

    api = TTRVModel.from_pretrained(str(model_dir), **fast)
    item = api.loop.prepare("img", image, SignalQuestion("Describe it."))
    before = lora_snapshot(api.vlm.model)
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.logprob_gap is not None and record.logprob_gap < 1e-3
    after = lora_snapshot(api.vlm.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    api.loop.reset()
    assert all(torch.equal(before[n], p) for n, p in lora_snapshot(api.vlm.model).items())
    result = api.adapt(image, "Which shape?", choices=["circle", "square"])
    assert result.steps and result.after is not None
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        image.rotate(90 * i).save(paths[-1])
    items = [Item(str(p), SignalQuestion("Describe it.")) for p in paths]
    results = TTRVModel.from_pretrained(str(model_dir), epochs=1, **fast).adapt_dataset(items)
    assert [r.image for r in results] == [str(p) for p in paths] and all(r.after is not None for r in results)
    assert sum(len(r.steps) for r in results) == 2


def check_int8_base_adapts(model_dir, image, fast: dict, quantized_under: str):
    """An int8 base (only modules under ``quantized_under`` quantized) takes an update with a log-prob gap < 1e-3;
    returns the API."""
    from optimum.quanto import QLinear

    from ttrv_edge.api import TTRVModel

    api = TTRVModel.from_pretrained(str(model_dir), quantize="int8", **fast)
    quantized = [n for n, m in api.vlm.model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all(quantized_under in n for n in quantized)
    item = api.loop.prepare("img", image, SignalQuestion("Describe it."))
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.logprob_gap < 1e-3
    return api


def check_shared_prefix_scoring_and_memory_plan(vlm, image, vision_tokens: int) -> None:
    """Shared-prefix greedy rows equal plain ones; every scoring path (shared prompt, shared image, neither) gives the
    sampler's log-probs within 1e-4; the memory estimate grows with the rollouts."""
    from ttrv_edge.memory import MemoryPlanner
    from ttrv_edge.memory.costs import WorkShape
    from ttrv_edge.rl.sampling import sample_rollouts
    from ttrv_edge.rl.scoring import completion_logprobs

    inputs = vlm.prompt_inputs(image, "What is it?")
    check_shared_prefix_greedy(vlm, inputs, 3, max_new_tokens=8)
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
    shape = WorkShape(prompt_tokens=inputs["input_ids"].shape[1], new_tokens=16, vision_tokens=vision_tokens)
    for phase in ("sample", "train"):
        assert planner.estimate(phase, 4, shape) > planner.estimate(phase, 1, shape) > 0


def check_onnx_greedy_equals_torch(vlm, runner, images: list, questions, new_tokens: int) -> None:
    """onnxruntime's greedy tokens and prompt length equal torch's for every image x question and a two-image prompt
    (the first two images), logits within 1e-4."""
    worst = 0.0
    cases = [(image, q.prompt()) for image in images for q in questions] + [(images[:2], questions[0].prompt())]
    for image, prompt in cases:
        inputs, tokens, logits = torch_greedy(vlm, image, prompt, new_tokens)
        result = runner.generate(image, prompt, max_new_tokens=new_tokens, return_logits=True)
        assert result.token_ids == tokens and result.prompt_tokens == inputs["input_ids"].shape[1]
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(result.logits, logits)))
    assert worst < 1e-4
