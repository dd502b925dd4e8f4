"""The memory planner: budgets, estimates that fit, self-correction, OOM back-off, exact gradient accumulation."""

import dataclasses
import json

import pytest
import torch
from helpers import SignalQuestion

from ttrv_edge.config import TTRVConfig
from ttrv_edge.memory import MemoryPlanner, PeakMeter, WorkShape, parse_memory_budget, run_with_backoff
from ttrv_edge.models import load_lora_state, load_vlm, lora_state
from ttrv_edge.rl import loss as rl_loss
from ttrv_edge.rl import scoring
from ttrv_edge.rl.loop import AdaptationLoop
from ttrv_edge.rl.sampling import sample_rollouts

GB, MB = 2**30, 2**20


@pytest.mark.parametrize(
    "text, expected",
    [("4GB", 4 * GB), ("6 GiB", 6 * GB), ("512MB", 512 * MB), ("1.5g", int(1.5 * GB)), ("2048k", 2 * MB)],
)
def test_parse_memory_budget(text, expected):
    assert parse_memory_budget(text) == expected


@pytest.mark.parametrize("text", ["", "4", "lots", "-1GB", "0GB", "4XB", "4 G B", True])
def test_bad_memory_budget_names_the_flag(text):
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_memory_budget(text)
    with pytest.raises(ValueError, match="--memory-budget"):
        TTRVConfig(memory_budget=text)


def test_config_checks_quantize_and_micro_batches():
    with pytest.raises(ValueError, match="--quantize"):
        TTRVConfig(quantize="int3")
    with pytest.raises(ValueError, match="--train-micro-batch"):
        TTRVConfig(train_micro_batch=0)
    assert TTRVConfig(memory_budget="4GB", quantize="int8", sample_micro_batch=2).sample_micro_batch == 2


@pytest.fixture(scope="module")
def vlm(tiny_idefics3_dir):
    # LoRA A is drawn from the global RNG: seed it, so that the LoRA weights (and the near-zero gradient entries whose
    # first AdamW step the accumulation tests compare) do not depend on which tests ran before this module.
    torch.manual_seed(0)
    return load_vlm(str(tiny_idefics3_dir))


class FakeMeter:
    """A device whose peak the test sets."""

    device = torch.device("cpu")
    kind = "fake"

    def __init__(self, resident):
        self.resident, self.next_peak = resident, resident

    def reset(self):
        pass

    def current(self):
        return self.resident

    def peak(self):
        return self.next_peak


def test_micro_batches_fit_the_budget_and_grow_with_it(vlm):
    planner = MemoryPlanner(vlm.model, None)
    shape = WorkShape(prompt_tokens=300, new_tokens=64, vision_tokens=64)
    per_row = planner.costs.train_bytes(2, shape) - planner.costs.train_bytes(1, shape)
    assert per_row > 0 and planner.costs.sample_bytes(2, shape) > planner.costs.sample_bytes(1, shape)
    chosen = []
    for rows_worth in (1.5, 4.5, 100):
        planner.budget = planner.estimate("train", 1, shape) + int(rows_worth * per_row)
        rows = planner.micro_batch("train", 16, shape)
        assert planner.estimate("train", rows, shape) <= planner.budget
        assert rows == 16 or planner.estimate("train", rows + 1, shape) > planner.budget
        chosen.append(rows)
    assert chosen[0] < chosen[1] < chosen[2] == 16
    planner.budget = planner.resident  # nothing left for even one rollout
    with pytest.raises(ValueError, match="--memory-budget"):
        planner.micro_batch("train", 16, shape)


def test_planner_corrects_itself_from_the_measured_peak(vlm):
    planner = MemoryPlanner(vlm.model, None)
    planner.meter = FakeMeter(planner.resident)
    shape = WorkShape(10, 2000, 0)  # long rollouts: the per-row KV cache dominates
    predicted = planner.costs.dynamic_bytes("sample", 8, shape)
    planner.budget = planner.resident + predicted  # just fits 8 rows by the raw estimate
    assert planner.micro_batch("sample", 8, shape) == 8
    planner.meter.next_peak = planner.resident + 2 * predicted  # the estimate was half the truth
    with planner.measure("sample", 8, shape):
        pass
    assert planner.correction["sample"] == pytest.approx(2.0)
    assert planner.report()["peak_memory_bytes"] == planner.resident + 2 * predicted
    assert 2 <= planner.micro_batch("sample", 8, shape) < 8  # the next plan fits the measured reality


def test_cpu_peak_meter_sees_an_allocation_and_resets():
    meter = PeakMeter("cpu")
    meter.reset()
    start = meter.current()
    block = torch.ones(64 * MB // 4)  # 64 MB, touched
    assert meter.peak() >= start + 60 * MB
    del block
    if meter.resettable:
        meter.reset()
        assert meter.peak() < start + 60 * MB


def test_run_with_backoff_halves_and_never_skips():
    tried = []

    def attempt(rows):
        tried.append(rows)
        if rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return rows * 10

    assert run_with_backoff(attempt, 8, phase="train") == (20, 2)
    assert tried == [8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):
        run_with_backoff(lambda rows: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), 1, phase="train")
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        run_with_backoff(lambda rows: (_ for _ in ()).throw(RuntimeError("shape mismatch")), 4, phase="train")


def _groups(vlm, image, num=8):
    inputs = vlm.prompt_inputs(image, "Describe it.")
    question = SignalQuestion("Describe it.")
    groups = []
    for seed in (0, 1):  # two inputs in one update: weights across groups matter too
        r = sample_rollouts(vlm, inputs, num, temperature=1.0, max_new_tokens=6, seed=seed)
        groups.append((r, [question.extract(t) for t in r.texts]))
    return groups


def _randomise_lora_b(model):
    """LoRA B starts at zero, which makes every lora_A gradient zero; give both factors a gradient."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


# The modules that call completion_hidden (every forward to the completion tokens' hidden states): scoring, the loss.
SCORING_CALLERS = (scoring, rl_loss)


def _update(vlm, groups, start, **config):
    """One update from ``start``; returns (loss, LoRA state, loop, rows per loss forward)."""
    load_lora_state(vlm.model, start)
    loop = AdaptationLoop(vlm, TTRVConfig(rollouts=8, max_new_tokens=6, lr=1e-3, **config))
    real, forwards = scoring.completion_hidden, []

    def counting(vlm_, part, **kwargs):
        if torch.is_grad_enabled():
            forwards.append(part.num)
        return real(vlm_, part, **kwargs)

    for module in SCORING_CALLERS:
        module.completion_hidden = counting
    try:
        value = loop.update(groups).loss
    finally:
        for module in SCORING_CALLERS:
            module.completion_hidden = real
    return value, lora_state(vlm.model), loop, forwards


@pytest.mark.parametrize(
    "options",
    [{}, {"aggregation": "sequence-mean", "beta": 0.1, "inner_updates": 2}],
    ids=["token-mean", "sequence-mean+kl+mu2"],
)
def test_gradient_accumulation_equals_one_batch(vlm, test_image, options):
    groups = _groups(vlm, test_image)
    _randomise_lora_b(vlm.model)
    start = lora_state(vlm.model)
    results = {rows: _update(vlm, groups, start, train_micro_batch=rows, **options) for rows in (1, 3, None)}
    full_loss, full_state, loop, forwards = results[None]
    updates = options.get("inner_updates", 1)
    assert forwards == [8, 8] * updates  # two groups of 8 rollouts, one forward each
    assert any(not torch.equal(full_state[n], start[n]) for n in start)
    for rows in (1, 3):
        loss, state, loop, forwards = results[rows]
        assert forwards == ([1] * 16 if rows == 1 else [3, 3, 2] * 2) * updates  # the loss really ran in micro-batches
        assert loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
        for name in start:
            torch.testing.assert_close(state[name], full_state[name], atol=1e-6, rtol=1e-5, msg=name)
    load_lora_state(vlm.model, start)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "options",
    [{}, {"aggregation": "sequence-mean", "beta": 0.1, "eps_low": 0.1, "eps_high": 0.1}],
    ids=["token-mean", "sequence-mean+kl"],
)
def test_fused_update_gives_the_unfused_lora_gradient(vlm, test_image, options, backend):
    """grpo_backward's default (hidden states -> linear_grpo_loss per micro-batch, the batch's normalizer) and the
    unfused path (completion_logprobs -> grpo_loss, weighted) give the same loss, log-probs and LoRA gradient."""
    groups = [r for r, _ in _groups(vlm, test_image)]
    start = lora_state(vlm.model)
    _randomise_lora_b(vlm.model)
    config = TTRVConfig(backend=backend, **options)
    advantages = [torch.randn(r.num, generator=torch.Generator().manual_seed(i)) for i, r in enumerate(groups)]
    with torch.no_grad():  # an old policy off the current one (clipping active) and a reference for the KL
        logps = [scoring.completion_logprobs(vlm, r, temperature=1.0, backend="torch")[0] for r in groups]
    old = [lp + 0.2 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(7)) for lp in logps]
    ref = [lp - 0.1 for lp in logps] if config.beta else None
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    results = []
    for fused in (True, False):
        for p in params:
            p.grad = None
        loss, new_logps = rl_loss.grpo_backward(vlm, groups, advantages, config, 3, old_logp=old, ref_logp=ref,
                                                fused=fused)  # fmt: skip
        results.append((loss, new_logps, [p.grad.clone() for p in params]))
    (fused_loss, fused_logps, fused_grads), (loss, logps_, grads) = results
    assert fused_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
    for a, b in zip(fused_logps, logps_, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    scale = max(float(g.abs().max()) for g in grads)
    assert scale > 0
    for a, b in zip(fused_grads, grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=0)
    for p in params:
        p.grad = None
    load_lora_state(vlm.model, start)


def test_self_certainty_gradient_accumulates_to_the_one_batch_gradient(vlm, test_image):
    """The self-certainty reward is computed from token entropies (~6 nats) whose float rounding (~1e-6) depends
    on the micro-batch shapes; group normalisation turns that into ~1e-5 relative noise in the advantages, which an
    Adam step can amplify for near-zero gradient entries. So this variant compares the accumulated gradients."""
    groups = _groups(vlm, test_image)
    _randomise_lora_b(vlm.model)
    start = lora_state(vlm.model)
    grads = {}
    for rows in (1, 3, None):
        load_lora_state(vlm.model, start)
        config = TTRVConfig(rollouts=8, max_new_tokens=6, entropy_signal="self-certainty", train_micro_batch=rows)
        loop = AdaptationLoop(vlm, config)
        captured = {}
        loop.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, captured=captured: captured.update(
                {i: p.grad.clone() for i, p in enumerate(opt.param_groups[0]["params"])}
            )
        )
        assert loop.update(groups).loss is not None
        grads[rows] = captured
    assert any(float(g.abs().max()) > 0 for g in grads[None].values())
    for rows in (1, 3):
        for i, full in grads[None].items():
            torch.testing.assert_close(grads[rows][i], full, atol=1e-4 * float(full.abs().max()), rtol=0)
    load_lora_state(vlm.model, start)


def test_update_backs_off_on_out_of_memory_and_keeps_the_step(vlm, test_image, monkeypatch):
    groups = _groups(vlm, test_image)
    _randomise_lora_b(vlm.model)
    start = lora_state(vlm.model)
    clean_loss, clean_state, _, _ = _update(vlm, groups, start, train_micro_batch=2)
    real = scoring.completion_hidden
    seen = []

    def flaky(vlm_, rollouts, **kwargs):
        seen.append(rollouts.num)
        if torch.is_grad_enabled() and rollouts.num == 4 and seen.count(4) == 2:  # after one chunk's backward
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if torch.is_grad_enabled() and rollouts.num > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(vlm_, rollouts, **kwargs)

    for module in SCORING_CALLERS:
        monkeypatch.setattr(module, "completion_hidden", flaky)
    loss, state, loop, _ = _update(vlm, groups, start)
    assert seen[:3] == [8, 4, 4] and loop.memory.oom_retries == 2
    assert loop.memory.report()["train_micro_batch"] == 2
    assert loss == pytest.approx(clean_loss, rel=1e-5)
    for name in start:  # the half-accumulated gradient of the failed attempt was thrown away
        torch.testing.assert_close(state[name], clean_state[name], atol=1e-6, rtol=1e-5, msg=name)
    load_lora_state(vlm.model, start)


def test_adapter_reports_peaks_and_micro_batches(vlm, test_image):
    loop = AdaptationLoop(vlm, TTRVConfig(rollouts=4, views=1, max_new_tokens=5, memory_budget="8GB"))
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    record = loop.step([item], 0, seed=1)
    report = loop.memory.report()
    assert record.updated
    assert report["budget_bytes"] == 8 * GB and report["sample_micro_batch"] == 4 and report["train_micro_batch"] == 4
    assert report["measured_peak_bytes"]["sample"] > 0 and report["measured_peak_bytes"]["train"] > 0
    assert report["peak_memory_bytes"] >= max(report["measured_peak_bytes"].values())


def test_cli_json_has_the_memory_report(tiny_idefics3_dir, test_image, tmp_path, capsys):
    from ttrv_edge.cli import main

    image = tmp_path / "image.png"
    test_image.save(image)
    args = ["adapt", str(image), "--model", str(tiny_idefics3_dir), "--rollouts", "4", "--steps", "1", "--views", "1"]
    args += ["--max-new-tokens", "4", "--memory-budget", "8GB", "--quantize", "none", "--json"]
    args += ["--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_memory_bytes"] > 0
    assert report["micro_batches"] == {"sample": 4, "train": report["micro_batches"]["train"]}
    assert report["memory"]["budget_bytes"] == 8 * GB
    bad = [a if a != "8GB" else "lots" for a in args]
    assert main(bad) == 2
    assert "--memory-budget" in capsys.readouterr().err


def test_planner_from_config_uses_fixed_sizes(vlm):
    config = dataclasses.replace(TTRVConfig(), sample_micro_batch=3, train_micro_batch=2)
    planner = MemoryPlanner.for_config(vlm, config)
    shape = WorkShape(50, 8, 16)
    assert planner.micro_batch("sample", 8, shape) == 3 and planner.micro_batch("train", 8, shape) == 2


def test_gpu_terms_of_the_estimate(vlm):
    """bf16 activations with fp32 LoRA keep each adapted projection's input cast to fp32; the Triton lm_head path
    keeps one [chunk, V] buffer in the model dtype (plus the autotuner's copy) instead of the torch path's fp32
    intermediates. Both were found on an H200 (the estimate was 26-94% over there) and checked against its peaks."""
    from ttrv_edge.kernels.reference import default_chunk_rows

    from ttrv_edge.memory import model_costs

    costs = model_costs(vlm.model)
    text_lora = [
        m for n, m in vlm.model.named_modules() if hasattr(m, "lora_A") and m.lora_A and "vision" not in n
    ]  # fmt: skip
    assert costs.lora_inputs == sum(m.in_features for m in text_lora) > 0 and costs.lora_dtype_bytes == 4
    assert not costs.fused_head and MemoryPlanner.for_config(vlm, TTRVConfig()).costs.fused_head is False  # CPU

    shape = WorkShape(prompt_tokens=90, new_tokens=64, vision_tokens=0)
    tokens = shape.prompt_tokens + 8 * shape.new_tokens
    fp32, bf16 = costs, dataclasses.replace(costs, dtype_bytes=2)
    assert fp32.lora_cast_bytes_per_token == 0  # same width: peft casts nothing
    wider = bf16.train_bytes(8, shape) - dataclasses.replace(bf16, lora_dtype_bytes=2).train_bytes(8, shape)
    assert wider == tokens * costs.lora_inputs * 4

    fused = dataclasses.replace(bf16, fused_head=True)
    rows = 8 * shape.new_tokens
    chunk = default_chunk_rows(rows, costs.hidden, costs.vocab)
    assert fused.head_workspace_bytes(rows) == 2 * chunk * costs.vocab * 2
    assert bf16.head_workspace_bytes(rows) == min(rows, 1024) * costs.vocab * 4 * 8
    assert bf16.train_bytes(8, shape) - fused.train_bytes(8, shape) == (
        bf16.head_workspace_bytes(rows) - fused.head_workspace_bytes(rows)
    )


@pytest.mark.parametrize(
    "rows, hidden, vocab, expected", [(8192, 1536, 151936, 256), (100, 576, 49280, 100), (65536, 4096, 32000, 4096)]
)
def test_default_chunk_rows_follows_liger_s_rule(rows, hidden, vocab, expected):
    from ttrv_edge.kernels.reference import default_chunk_rows

    assert default_chunk_rows(rows, hidden, vocab) == expected
