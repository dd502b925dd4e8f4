"""What TTRV trains (``lora_targets``, ``train_norms``) on tiny Idefics3 and Qwen2-VL models: where LoRA and the
trainable norms land, what a GRPO step changes, save/load/reset/resume round trips, exact gradients through the
shared-prompt and shared-image scoring paths, and the memory estimate of a trained vision tower. The ONNX export of
a vision LoRA + norms adapter is checked in test_export.py (its adapter trains everything)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttrv_edge.api import TTRVModel
from ttrv_edge.config import TTRVConfig
from ttrv_edge.io.answers import Question
from ttrv_edge.io.checkpoints import check_adapter_dir
from ttrv_edge.io.inputs import Item
from ttrv_edge.memory.costs import WorkShape
from ttrv_edge.memory.planner import MemoryPlanner
from ttrv_edge.models import load_vlm, lora_state, vision_tower
from ttrv_edge.models.lora import (
    LORA_TARGET_REGEX,
    adapted_parts,
    check_lora_placement,
    is_adapted_param,
    restore_snapshot,
    take_snapshot,
)
from ttrv_edge.rl.sampling import sample_rollouts
from ttrv_edge.rl.scoring import completion_logprobs

FAST = dict(rollouts=6, max_new_tokens=5, lr=5e-2, seed=3)
ARCHS = ("tiny_idefics3_dir", "tiny_qwen2vl_dir")

# The modules each target must reach on the tiny models (2 vision layers, 2 text layers), relative to ``model.``.
LANGUAGE = {
    "tiny_idefics3_dir": {f"text_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"},
    "tiny_qwen2vl_dir": {f"language_model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"},
}
VISION = {
    "tiny_idefics3_dir": {
        f"vision_model.encoder.layers.{i}.self_attn.{p}"
        for i in (0, 1)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    | {"connector.modality_projection.proj"},
    "tiny_qwen2vl_dir": {f"visual.blocks.{i}.attn.{p}" for i in (0, 1) for p in ("qkv", "proj")}
    | {"visual.merger.mlp.0", "visual.merger.mlp.2"},
}
NORMS = {
    "tiny_idefics3_dir": {f"vision_model.encoder.layers.{i}.layer_norm{j}" for i in (0, 1) for j in (1, 2)}
    | {"vision_model.post_layernorm"},
    "tiny_qwen2vl_dir": {f"visual.blocks.{i}.norm{j}" for i in (0, 1) for j in (1, 2)} | {"visual.merger.ln_q"},
}


@dataclass(frozen=True)
class TextLengthQuestion(Question):
    """Answers depend on the sampled text, so groups carry signal and the run depends on the weights."""

    calls: list = field(default_factory=list, compare=False)

    def extract(self, text: str) -> str | None:
        return "xyz"[len(text) % 3]


def _short(name: str) -> str:
    return name.split("base_model.model.model.", 1)[-1]


def _load(arch_dir: Path, targets: str, norms: bool):
    return load_vlm(str(arch_dir), device="cpu", dtype=torch.float32, lora_targets=targets, train_norms=norms)


def _randomise(model, scale: float = 0.05, seed: int = 0) -> None:
    """lora_B starts at zero (so lora_A gets no gradient) and the norm copies equal the base: move both."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


# ------------------------------------------------------------------------------------------------ placement


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "targets, norms", [("language", False), ("vision", False), ("all", False), ("vision", True), ("none", True)]
)
def test_lora_lands_where_asked_and_nowhere_else(arch, targets, norms, request):
    vlm = _load(request.getfixturevalue(arch), targets, norms)
    lora, norm_modules = adapted_parts(vlm.model)
    want = (LANGUAGE[arch] if targets in ("language", "all") else set()) | (
        VISION[arch] if targets in ("vision", "all") else set()
    )
    assert {_short(n) for n in lora} == want
    assert {_short(n) for n in norm_modules} == (NORMS[arch] if norms else set())
    trainable = {n for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in vlm.model.named_parameters() if is_adapted_param(n)}
    assert set(lora_state(vlm.model)) == trainable
    for name in trainable:  # each trainable tensor belongs to a module that was asked for
        module = re.sub(r"\.(lora_[AB]\.default|modules_to_save\.default)\.(weight|bias)$", "", name)
        assert _short(module) in want | (NORMS[arch] if norms else set()), name
    if targets == "language":
        assert all(re.fullmatch(LORA_TARGET_REGEX, n) for n in lora)


def test_lora_targets_and_train_norms_are_validated():
    with pytest.raises(ValueError, match="--lora-targets must be one of language, vision, all, none"):
        TTRVConfig(lora_targets="text")
    with pytest.raises(ValueError, match="--lora-targets none .* only with --train-norms"):
        TTRVConfig(lora_targets="none")
    with pytest.raises(ValueError, match="--train-norms must be true or false"):
        TTRVConfig(train_norms="yes")
    assert TTRVConfig(lora_targets="none", train_norms=True).train_norms


def test_placement_check_refuses_lora_where_it_was_not_asked(tiny_idefics3_dir):
    vlm = _load(tiny_idefics3_dir, "all", True)
    with pytest.raises(ValueError, match="--lora-targets language: LoRA would touch the vision side"):
        check_lora_placement(vlm.model, "language", True)
    with pytest.raises(ValueError, match="--lora-targets vision: LoRA landed on 'all'"):
        check_lora_placement(vlm.model, "vision", True)
    with pytest.raises(ValueError, match="--train-norms"):
        check_lora_placement(vlm.model, "all", False)
    assert len(check_lora_placement(vlm.model, None, None)) == 17


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_changes_only_the_chosen_weights(arch, request, test_image):
    api = TTRVModel.from_pretrained(str(request.getfixturevalue(arch)), lora_targets="vision", train_norms=True, **FAST)
    _randomise(api.vlm.model)
    before = {n: p.detach().clone() for n, p in api.vlm.model.named_parameters()}
    item = api.loop.prepare("img", test_image, TextLengthQuestion("Describe it."))
    record = api.loop.step([item], step=0, seed=1)
    assert record.updated and record.loss is not None
    after = dict(api.vlm.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= {n for n in before if is_adapted_param(n)}, sorted(changed - set(lora_state(api.vlm.model)))
    assert any(".modules_to_save." in n for n in changed) and any("lora_" in n for n in changed)
    assert any("connector" in n or "merger" in n for n in changed)  # the connector LoRA trains too
    assert not any("language_model" in n or "text_model" in n for n in changed)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_reset_round_trip_with_norms(arch, request, test_image, tmp_path):
    model_dir = str(request.getfixturevalue(arch))
    options = dict(lora_targets="all", train_norms=True, **FAST)
    api = TTRVModel.from_pretrained(model_dir, **options)
    start = lora_state(api.vlm.model)
    item = api.loop.prepare("img", test_image, TextLengthQuestion("Describe it."))
    with torch.no_grad():
        reference = api.vlm.model(**item.inputs).logits
    _randomise(api.vlm.model, scale=0.2)
    api.loop.step([item], step=0, seed=1)
    adapted = lora_state(api.vlm.model)
    assert any(not torch.equal(adapted[k], start[k]) for k in start if ".modules_to_save." in k)

    out = api.save_adapter(tmp_path / "adapter")
    assert sorted(p.suffix for p in out.iterdir() if p.suffix in (".safetensors", ".bin")) == [".safetensors"]
    saved = load_file(out / "adapter_model.safetensors")
    assert sum(k.endswith(("norm1.weight", "layer_norm1.weight")) for k in saved) == 2  # one per vision layer
    check_adapter_dir(out)
    loaded = TTRVModel.from_pretrained(model_dir, adapter=str(out), **options)
    theirs = lora_state(loaded.vlm.model)
    assert theirs.keys() == adapted.keys() and all(torch.equal(theirs[k], adapted[k]) for k in adapted)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.vlm.model(**item.inputs).logits, api.vlm.model(**item.inputs).logits, rtol=0, atol=0
        )
    with pytest.raises(ValueError, match=r"--adapter: .* was saved with --lora-targets all --train-norms"):
        TTRVModel.from_pretrained(model_dir, adapter=str(out), **FAST)

    api.reset()  # back to the weights it was loaded with, norms included
    now = lora_state(api.vlm.model)
    assert all(torch.equal(now[k], start[k]) for k in start)
    with torch.no_grad():
        torch.testing.assert_close(api.vlm.model(**item.inputs).logits, reference, rtol=0, atol=0)


def test_snapshot_restores_the_norms(tiny_qwen2vl_dir):
    api = TTRVModel.from_pretrained(str(tiny_qwen2vl_dir), lora_targets="none", train_norms=True, **FAST)
    snapshot = take_snapshot(api.vlm.model, api.loop.optimizer)
    assert snapshot.lora and all(".modules_to_save." in k for k in snapshot.lora)
    _randomise(api.vlm.model, scale=1.0)
    restore_snapshot(api.vlm.model, api.loop.optimizer, snapshot)
    now = lora_state(api.vlm.model)
    assert all(torch.equal(now[k], snapshot.lora[k]) for k in now)


def test_adapter_training_other_modules_is_refused(tiny_idefics3_dir, tmp_path):
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), lora_targets="vision", train_norms=True, **FAST)
    out = api.save_adapter(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, out / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="--adapter: the adapter trains lm_head, outside the vision tower"):
        check_adapter_dir(out)


def test_transductive_run_resumes_with_norms(tiny_qwen2vl_dir, test_image, tmp_path):
    """Checkpoints hold the norms: a run cut after 2 of its 4 steps resumes to the uninterrupted run's weights."""
    options = dict(epochs=2, lora_targets="vision", train_norms=True, **FAST)
    for k in range(2):
        test_image.rotate(90 * k).save(tmp_path / f"{k}.png")
    items = [Item(str(tmp_path / f"{k}.png"), TextLengthQuestion("What?")) for k in range(2)]
    reference = TTRVModel.from_pretrained(str(tiny_qwen2vl_dir), **options)
    reference.adapt_dataset(items, checkpoint_dir=tmp_path / "ref")

    class Interrupted(Exception):
        pass

    cut = TTRVModel.from_pretrained(str(tiny_qwen2vl_dir), **options)
    step, calls = cut.loop.step, []

    def counting(*args, **kwargs):
        if len(calls) == 2:
            raise Interrupted
        calls.append(1)
        return step(*args, **kwargs)

    cut.loop.step = counting
    with pytest.raises(Interrupted):
        cut.adapt_dataset(items, checkpoint_dir=tmp_path / "cut")
    resumed = TTRVModel.from_pretrained(str(tiny_qwen2vl_dir), **options)
    resumed.adapt_dataset(items, checkpoint_dir=tmp_path / "cut", resume=True)
    assert resumed.run_info["resumed_from_step"] == 2
    ours, theirs = lora_state(resumed.vlm.model), lora_state(reference.vlm.model)
    start = lora_state(TTRVModel.from_pretrained(str(tiny_qwen2vl_dir), **options).vlm.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert any(not torch.equal(theirs[k], start[k]) for k in theirs if ".modules_to_save." in k)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_scoring_paths_give_the_n_row_gradients_of_a_trained_tower(arch, request, test_image):
    """With vision LoRA and norms trained, the prompt run once (``shared_prefix_hidden``) and the image encoded once
    (``shared_vision``) still give the log-probs and the gradients of N plain rows: autograd sums the rows'
    gradients through the expanded cache and the tiled tower output."""
    vlm = _load(request.getfixturevalue(arch), "all", True)
    _randomise(vlm.model)
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    r = sample_rollouts(vlm, inputs, 4, temperature=1.0, max_new_tokens=6, seed=1)
    assert r.completion_mask.sum() > 4
    params = {n: p for n, p in vlm.model.named_parameters() if p.requires_grad}
    paths = {
        "shared prefix": dict(share_prefix=True),
        "N rows, image once": dict(share_prefix=False, share_vision=True),
        "N rows, image N times": dict(share_prefix=False, share_vision=False),
    }
    tower_rows = []
    hook = vision_tower(vlm.model).register_forward_hook(  # sees the inputs after shared_vision's slicing
        lambda module, args, kwargs, out: tower_rows.append(int((list(args) + list(kwargs.values()))[0].shape[0])),
        with_kwargs=True,
    )
    results = {}
    try:
        for name, options in paths.items():
            for p in params.values():
                p.grad = None
            logp, entropy = completion_logprobs(vlm, r, temperature=1.0, backend="torch", **options)
            (logp.sum() + entropy.sum()).backward()
            results[name] = (logp.detach(), {n: p.grad.clone() for n, p in params.items()})
    finally:
        hook.remove()
    assert tower_rows[2] == 4 * tower_rows[0] and tower_rows[1] == tower_rows[0], tower_rows
    reference = results["N rows, image N times"]
    vision_grads = [n for n in params if "vision" in n or "visual" in n or "connector" in n]
    assert any(".modules_to_save." in n for n in vision_grads) and any("lora_A" in n for n in vision_grads)
    assert all(float(reference[1][n].abs().max()) > 0 for n in vision_grads)
    for name in ("shared prefix", "N rows, image once"):
        logp, grads = results[name]
        torch.testing.assert_close(logp, reference[0], atol=1e-5, rtol=1e-5, msg=name)
        for n in params:
            torch.testing.assert_close(grads[n], reference[1][n], atol=1e-5, rtol=1e-4, msg=f"{name}: {n}")


# ------------------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("arch", ARCHS)
def test_memory_estimate_grows_when_the_vision_tower_trains(arch, request):
    model_dir = request.getfixturevalue(arch)
    shape = WorkShape(prompt_tokens=80, new_tokens=16, vision_tokens=256)
    plans = {}
    for targets, norms in (("language", False), ("none", True), ("all", True)):
        planner = MemoryPlanner(_load(model_dir, targets, norms).model)
        plans[(targets, norms)] = planner
        assert planner.report()["trains_vision"] == (targets != "language")
    language, norms_only, everything = plans.values()
    for rows in (1, 4):
        base = language.costs.dynamic_bytes("train", rows, shape)  # what the planner fits to the budget
        assert base < norms_only.costs.train_bytes(rows, shape) < everything.costs.train_bytes(rows, shape)
        assert language.costs.sample_bytes(rows, shape) == norms_only.costs.sample_bytes(rows, shape)
        # the same model costs with only the tower's grad switched on: the activations of all its layers join
        trained = dataclasses.replace(language.costs, vision_trained=True)
        growth = trained.train_bytes(rows, shape) - base
        assert growth == trained.vision_train_bytes(256) - trained.vision_bytes(256)
        assert growth >= trained.vision_layers * 256 * (9 * trained.vision_hidden) * trained.dtype_bytes
