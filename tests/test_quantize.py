"""A quantized base under LoRA: what is quantized, what is not, and that a step changes only LoRA."""

from pathlib import Path

import pytest
import torch
from helpers import SignalQuestion, perturb

from ttrv_edge.config import TTRVConfig
from ttrv_edge.memory import model_costs
from ttrv_edge.models import lm_head, load_vlm, vision_tower
from ttrv_edge.models.quantize import check_quantize, is_quantized
from ttrv_edge.rl.loop import AdaptationLoop

pytest.importorskip("optimum.quanto", reason="optimum-quanto is a dev dependency of the quantized path")


def _snapshot(model) -> dict[str, list[torch.Tensor]]:
    """Every tensor of every parameter, looking inside quantized tensors (data and scales), cloned."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "__tensor_flatten__") and type(p) not in (torch.Tensor, torch.nn.Parameter):
            inner, _ = p.__tensor_flatten__()
            out[name] = [getattr(p, n).detach().clone() for n in inner]
        else:
            out[name] = [p.detach().clone()]
    return out


@pytest.fixture(scope="module")
def int8_vlm(tiny_idefics3_dir):
    return load_vlm(str(tiny_idefics3_dir), quantize="int8")


def test_int8_quantizes_the_language_model_only(int8_vlm):
    from optimum.quanto import QLinear

    model = int8_vlm.model
    quantized = [n for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all("text_model" in n for n in quantized)
    assert any(n.endswith("q_proj.base_layer") for n in quantized) and any("mlp" in n for n in quantized)
    assert not any(isinstance(m, QLinear) for m in vision_tower(model).modules())
    assert type(lm_head(model).weight) is torch.nn.Parameter  # the fused kernel reads it directly
    assert all(type(p) is torch.nn.Parameter for n, p in model.named_parameters() if "lora_" in n)
    assert is_quantized(model)


def test_int8_weights_are_smaller_and_outputs_close(int8_vlm, tiny_idefics3_dir, test_image):
    full = load_vlm(str(tiny_idefics3_dir))
    assert model_costs(int8_vlm.model).weights_bytes < 0.9 * model_costs(full.model).weights_bytes
    inputs = full.prompt_inputs(test_image, "What is it?")
    with torch.no_grad():
        reference = full.model(**inputs).logits
        quantized = int8_vlm.model(**inputs).logits
    error = (quantized - reference).norm() / reference.norm()
    assert 0 < float(error) < 0.05, f"int8 logits off by {float(error):.3f} (relative)"


def test_int8_step_changes_only_lora(int8_vlm, test_image):
    loop = AdaptationLoop(int8_vlm, TTRVConfig(rollouts=6, max_new_tokens=5, lr=5e-2, quantize="int8"))
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    before = _snapshot(int8_vlm.model)
    assert loop.step([item], 0, seed=1).updated
    after = _snapshot(int8_vlm.model)
    changed = {n for n in before if not all(torch.equal(a, b) for a, b in zip(before[n], after[n]))}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:3]
    assert all("lora_" in n or n not in changed for n in before)  # base weights (int8 data + scales) bit-identical
    loop.reset()


def test_nf4_needs_cuda_and_unknown_modes_fail(tiny_idefics3_dir):
    with pytest.raises(ValueError, match="--quantize nf4.*CUDA"):
        check_quantize("nf4", "cpu")
    with pytest.raises(ValueError, match="--quantize nf4.*CUDA"):
        load_vlm(str(tiny_idefics3_dir), quantize="nf4", device="cpu")
    with pytest.raises(ValueError, match="--quantize"):
        load_vlm(str(tiny_idefics3_dir), quantize="int3")


def test_config_quantize_must_match_the_loaded_model(tiny_idefics3_dir):
    full = load_vlm(str(tiny_idefics3_dir))
    with pytest.raises(ValueError, match="--quantize int8"):
        AdaptationLoop(full, TTRVConfig(quantize="int8"))


def _quanto_extension_built() -> bool:
    import optimum.quanto

    build = Path(optimum.quanto.__file__).parent / "library" / "extensions" / "cpp" / "build"
    return any(build.glob("quanto_cpp*.so"))


@pytest.mark.skipif(
    not _quanto_extension_built(),
    reason="qint4 compiles optimum-quanto's C++ extension on first use (~5 min on 2 cores): too slow for CI",
)
def test_int4_step_runs_and_changes_only_lora(tiny_idefics3_dir, test_image):
    vlm = load_vlm(str(tiny_idefics3_dir), quantize="int4")
    loop = AdaptationLoop(vlm, TTRVConfig(rollouts=6, max_new_tokens=4, lr=5e-2, quantize="int4"))
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    before = _snapshot(vlm.model)
    assert loop.step([item], 0, seed=1).updated
    after = _snapshot(vlm.model)
    changed = {n for n in before if not all(torch.equal(a, b) for a, b in zip(before[n], after[n]))}
    assert changed and all("lora_" in n for n in changed)


def test_frozen_quantized_linear_backward_matches_quanto(int8_vlm, test_image):
    """The input-gradient-only backward (no saved input) gives quanto's own gradients."""
    from optimum.quanto import QLinear

    from ttrv_edge.rl.sampling import sample_rollouts
    from ttrv_edge.rl.scoring import completion_logprobs

    model = int8_vlm.model
    frozen = [m for m in model.modules() if isinstance(m, QLinear) and type(m) is not QLinear]
    assert frozen, "the language model's quantized linears should be FrozenQuantizedLinear"
    inputs = int8_vlm.prompt_inputs(test_image, "What is it?")
    rollouts = sample_rollouts(int8_vlm, inputs, 3, temperature=1.0, max_new_tokens=5, seed=0)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in params]
    perturb(model, 0.05)  # LoRA B starts at zero: randomise it so every LoRA weight gets a gradient
    frozen_class = type(frozen[0])
    grads = []
    try:
        for cls in (frozen_class, QLinear):
            for module in frozen:
                module.__class__ = cls
            for p in params:
                p.grad = None
            logp, _ = completion_logprobs(int8_vlm, rollouts, temperature=1.0, backend="torch")
            logp.sum().backward()
            grads.append([p.grad.clone() for p in params])
    finally:
        for module in frozen:
            module.__class__ = frozen_class
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.grad = None
                p.copy_(value)
    assert all(float(g.abs().max()) > 0 for g in grads[0])
    for ours, quanto in zip(*grads):
        torch.testing.assert_close(ours, quanto, atol=1e-6, rtol=1e-4)


def test_api_passes_quantize_to_the_loader(tiny_idefics3_dir, test_image):
    """`ttrv-edge adapt --quantize int8` reaches load_vlm through the public API and a step runs."""
    from optimum.quanto import QLinear

    from ttrv_edge.api import TTRVModel

    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), quantize="int8", rollouts=4, steps=1, max_new_tokens=4)
    assert any(isinstance(m, QLinear) for m in api.vlm.model.modules())
    result = api.adapt(test_image, "Which shape?", choices=["circle", "square"])
    assert result.after is not None


def test_int8_qwen2_vl_quantizes_its_language_model_and_adapts(tiny_qwen2vl_dir, test_image):
    from optimum.quanto import QLinear

    vlm = load_vlm(str(tiny_qwen2vl_dir), quantize="int8")
    quantized = [n for n, m in vlm.model.named_modules() if isinstance(m, QLinear)]
    assert quantized and all("language_model" in n for n in quantized)
    assert not any(isinstance(m, QLinear) for m in vision_tower(vlm.model).modules())
    loop = AdaptationLoop(vlm, TTRVConfig(rollouts=6, views=1, max_new_tokens=5, lr=5e-2, quantize="int8"))
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    before = _snapshot(vlm.model)
    record = loop.step([item], 0, seed=1)
    assert record.updated and record.logprob_gap < 1e-3
    after = _snapshot(vlm.model)
    changed = {n for n in before if not all(torch.equal(a, b) for a, b in zip(before[n], after[n]))}
    assert changed and all("lora_" in n for n in changed), sorted(changed)[:3]
