"""The adaptation loop on a tiny random VLM: what trains, what resets, what is reproducible."""

import numpy as np
import pytest
import torch
from helpers import SignalQuestion

from ttrv_edge import kernels
from ttrv_edge.api import TTRVModel
from ttrv_edge.config import TTRVConfig
from ttrv_edge.io.answers import Question
from ttrv_edge.io.inputs import Item
from ttrv_edge.models import backbone_hidden_states, lm_head, sequence_inputs
from ttrv_edge.rl.loop import AdaptationLoop
from ttrv_edge.rl.records import consensus_of
from ttrv_edge.rl.sampling import completion_mask, sample_rollouts
from ttrv_edge.rl.scoring import completion_logprobs

CONFIG = dict(rollouts=6, views=1, steps=2, max_new_tokens=6, lr=5e-2, seed=3)


@pytest.fixture
def adapter(tiny_idefics3_dir):
    return TTRVModel.from_pretrained(str(tiny_idefics3_dir), **CONFIG)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(vlm, inputs):
    with torch.no_grad():
        return vlm.model(**inputs).logits


def test_completion_mask_keeps_tokens_up_to_first_eos():
    ids = torch.tensor([[5, 9, 2, 2], [9, 5, 5, 5], [2, 5, 9, 2]])
    assert completion_mask(ids, [9]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]


def test_completion_logprobs_equal_log_softmax_of_full_logits(adapter, test_image):
    vlm = adapter.vlm
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    rollouts = sample_rollouts(vlm, inputs, 3, temperature=1.3, max_new_tokens=5, seed=0)
    logp, entropy = completion_logprobs(vlm, rollouts, temperature=1.3, backend="torch")
    sequences = torch.cat([inputs["input_ids"].expand(3, -1), rollouts.completion_ids], 1)
    attention = torch.cat([inputs["attention_mask"].expand(3, -1), rollouts.completion_mask.long()], 1)
    batch = sequence_inputs(inputs, sequences, attention)
    with torch.no_grad():
        hidden = backbone_hidden_states(vlm.model, **batch)
        logits = lm_head(vlm.model)(hidden)[:, rollouts.prompt_length - 1 : -1] + vlm.logit_bias()
    ref_logp, ref_entropy = kernels.logprob_entropy(
        logits.reshape(-1, logits.shape[-1]), rollouts.completion_ids.reshape(-1), 1.3, backend="torch"
    )
    keep = rollouts.completion_mask.bool()  # padding after EOS is a suppressed id: -inf there, masked out
    torch.testing.assert_close(logp, torch.where(keep, ref_logp.view_as(keep), 0.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, torch.where(keep, ref_entropy.view_as(keep), 0.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch_dir", ["tiny_idefics3_dir", "tiny_qwen2vl_dir"])
def test_a_step_changes_only_lora_weights(arch_dir, request, test_image):
    adapter = TTRVModel.from_pretrained(str(request.getfixturevalue(arch_dir)), **CONFIG)
    loop = adapter.loop
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    before = _params(adapter.vlm.model)
    record = loop.step([item], step=0, seed=1)
    assert record.updated and record.loss is not None
    after = _params(adapter.vlm.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed, "the update changed nothing"
    assert all("lora_" in n for n in changed), f"non-LoRA weights changed: {sorted(changed)[:3]}"
    untouched = [n for n in before if "lora_" not in n]
    assert all(torch.equal(before[n], after[n]) for n in untouched)


def test_episodic_reset_restores_exact_outputs(adapter, test_image):
    loop = adapter.loop
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    reference = _logits(adapter.vlm, item.inputs)
    result = loop.adapt_episode(item)
    assert any(s.updated for s in result.steps)
    torch.testing.assert_close(_logits(adapter.vlm, item.inputs), reference, rtol=0, atol=0)


def test_keep_leaves_the_adapter_changed(tiny_idefics3_dir, test_image):
    kept = TTRVModel.from_pretrained(str(tiny_idefics3_dir), keep=True, **CONFIG)
    item = kept.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    reference = _logits(kept.vlm, item.inputs)
    kept.loop.adapt_episode(item)
    assert not torch.equal(_logits(kept.vlm, item.inputs), reference)
    kept.reset()
    torch.testing.assert_close(_logits(kept.vlm, item.inputs), reference, rtol=0, atol=0)


def test_same_seed_same_run(tiny_idefics3_dir, test_image):
    runs = []
    for _ in range(2):
        api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), **CONFIG)
        item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
        result = api.loop.adapt_episode(item)
        runs.append([(s.mean_reward, s.loss) for s in result.steps] + [result.after.distribution])
    assert runs[0] == runs[1]


def test_consensus_stops_early_without_update(adapter, test_image):
    class Always(Question):
        def extract(self, text):
            return "same"

    item = adapter.loop.prepare("img", test_image, Always("Describe it."))
    result = adapter.loop.adapt_episode(item)
    assert len(result.steps) == 1 and not result.steps[0].updated and result.steps[0].consensus == 1.0
    assert result.after == result.before


def test_api_accepts_pil_numpy_and_paths(adapter, test_image, tmp_path):
    path = tmp_path / "image.png"
    test_image.save(path)
    array = np.asarray(test_image)
    results = [adapter.adapt(src, "Which shape?", choices=["circle", "square"]) for src in (test_image, array, path)]
    assert results[2].image == str(path)
    for result in results:
        assert set(result.before.distribution) <= {"A", "B", "<none>"}
        assert result.steps and result.after is not None


def test_transductive_runs_epochs_over_the_set(tiny_idefics3_dir, test_image, tmp_path):
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=4, epochs=2, max_new_tokens=4, lr=5e-2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        test_image.rotate(90 * i).save(paths[-1])
    items = [Item(str(p), SignalQuestion("Describe it.")) for p in paths]
    results = api.adapt_dataset(items)
    assert [r.image for r in results] == [str(p) for p in paths]
    assert sum(len(r.steps) for r in results) == 2 * 3  # batch size 1: one step per item and epoch
    assert all(r.after is not None for r in results)


def test_beta_adds_kl_to_the_adapter_disabled_model(tiny_idefics3_dir, test_image, monkeypatch):
    """The KL's reference log-probs are those of the base model (LoRA made a no-op by zeroing B), not the adapted
    model's: a reference that kept the adapter on would equal the policy's log-probs and give KL 0."""
    api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), beta=0.1, **CONFIG)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    assert api.loop.step([item], 0, seed=1).updated  # the adapter now differs from the base model
    captured = []
    real = kernels.linear_grpo_loss

    def spy(*args, **kwargs):  # the update's fused loss: the reference log-probs in, the policy's log-probs out
        loss, stats = real(*args, **kwargs)
        captured.append((kwargs["ref_logp"], stats["logp"]))
        return loss, stats

    monkeypatch.setattr(kernels, "linear_grpo_loss", spy)
    groups = [api.loop.sample(item, seed=2)]
    assert api.loop.update(groups).loss is not None
    ref_logp, logp = captured[0]  # per kept token (one micro-batch holds the whole group)
    state = {n: p.detach().clone() for n, p in api.vlm.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, p in api.vlm.model.named_parameters():
            if "lora_B" in name:
                p.zero_()
        base_logp, _ = completion_logprobs(api.vlm, groups[0][0], temperature=1.0, backend="torch")
        for name, p in api.vlm.model.named_parameters():
            if name in state:
                p.copy_(state[name])
    keep = groups[0][0].completion_mask.bool()
    torch.testing.assert_close(ref_logp, base_logp[keep], atol=1e-5, rtol=1e-5)
    assert float((ref_logp - logp).abs().max()) > 1e-4


def test_consensus_of():
    assert consensus_of(["A", "A", "B", None]) == 0.5
    assert consensus_of([None, None]) == 0.0


def test_adapter_without_trainable_parameters_is_an_error(adapter):
    for p in adapter.vlm.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        AdaptationLoop(adapter.vlm, TTRVConfig())


def test_triton_and_torch_backends_give_the_same_update(tiny_idefics3_dir, test_image):
    """--backend triton (here under TRITON_INTERPRET=1) and --backend torch compute the same LoRA gradient from the
    same rollouts. (Gradients, not weights after several steps: Adam turns fp32 rounding of near-zero gradient
    entries into lr-sized moves, and a changed weight changes the next step's samples.)"""
    grads = []
    for backend in ("torch", "triton"):
        api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), backend=backend, **CONFIG)
        item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
        captured = {}
        api.loop.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs, captured=captured: captured.update(
                {i: p.grad.clone() for i, p in enumerate(opt.param_groups[0]["params"])}
            )
        )
        assert api.loop.update([api.loop.sample(item, seed=1)]).loss is not None
        grads.append(captured)
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert scale > 0, "no gradient"
    for i, g in grads[0].items():
        torch.testing.assert_close(grads[1][i], g, atol=1e-5 * scale, rtol=0)


def test_every_op_input_lives_on_the_models_device(adapter, test_image, monkeypatch):
    """On a GPU the answer ids were built on the CPU and the Triton dispatch refused them at the first update. Here
    the model's device plays the accelerator: during the update, tensors created without an explicit device land
    on the 'meta' device, and the Triton dispatch accepts only tensors on the model's device."""
    from ttrv_edge.kernels import dispatch

    model_device = adapter.vlm.device
    seen = []
    monkeypatch.setattr(dispatch, "triton_usable", lambda t: seen.append(t.device) or t.device == model_device)
    loop = AdaptationLoop(adapter.vlm, TTRVConfig(rollouts=6, max_new_tokens=6, backend="triton", beta=0.1))
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    groups = [loop.sample(item, seed=1)]
    with torch.device("meta"):
        outcome = loop.update(groups)
    assert outcome.loss is not None and seen and set(seen) == {model_device}


def test_groups_without_signal_do_not_dilute_the_token_mean(adapter, test_image):
    """A group whose rollouts all agree has zero advantages; it must not count in the token-mean's denominator, so
    the update with it equals the update without it (TRL keeps such tokens in the denominator)."""
    from ttrv_edge.models import load_lora_state, lora_state

    loop = adapter.loop
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    informative = loop.sample(item, seed=1)
    agreeing = (loop.sample(item, seed=2)[0], ["x"] * 6)
    start = lora_state(adapter.vlm.model)
    results = []
    for groups in ([informative], [informative, agreeing]):
        load_lora_state(adapter.vlm.model, start)
        loop.reset()
        loss = loop.update(groups).loss
        results.append((loss, lora_state(adapter.vlm.model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name in start:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], atol=1e-7, rtol=1e-6)
    assert any(not torch.equal(results[0][1][n], start[n]) for n in start)


def test_successive_api_calls_sample_different_streams_reproducibly(tiny_idefics3_dir, test_image):
    """Each adapt() call gets its own random stream (not the stream of item 0 again), and a fresh adapter with the
    same seed repeats the same sequence of calls exactly."""

    def two_calls():
        api = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=6, steps=1, max_new_tokens=6, seed=3)
        results = [api.adapt(test_image, "What is it?", choices=["a", "b"]).to_dict() for _ in range(2)]
        for result in results:
            for step in result["steps"]:
                del step["seconds"]
        return results

    first, second = two_calls()
    assert first["before"]["distribution"] != second["before"]["distribution"] or first["steps"] != second["steps"]
    assert two_calls() == [first, second]
