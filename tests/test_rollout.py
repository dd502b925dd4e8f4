"""Shared-prefix sampling and vision-once scoring: exact against plain generate / the re-encoding forward."""

import pytest
import torch

from ttrv_edge.memory import MemoryPlanner
from ttrv_edge.models import base_model, inner_model, load_vlm, vision_tower
from ttrv_edge.rl import sampling
from ttrv_edge.rl.sampling import (
    cache_argument,
    completion_mask,
    expand_cache,
    generate_completions,
    prefill,
    sample_rollouts,
)
from ttrv_edge.rl.scoring import completion_logprobs

ARCHS = ("idefics3", "qwen2_vl")


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request):
    directory = request.getfixturevalue("tiny_idefics3_dir" if request.param == "idefics3" else "tiny_qwen2vl_dir")
    return load_vlm(str(directory))


@pytest.fixture
def inputs(vlm, test_image):
    return vlm.prompt_inputs(test_image, "What is it?")


def test_shared_prefix_greedy_equals_plain_generate(vlm, inputs):
    plain = generate_completions(vlm, inputs, 1, max_new_tokens=10, temperature=None, shared_prefix=False).ids
    greedy = generate_completions(
        vlm, inputs, 3, max_new_tokens=10, temperature=None, shared_prefix=True, micro_batch=2
    )
    shared, mask = greedy.ids, greedy.mask
    assert greedy.sampler_logp is None
    assert shared.shape == (3, plain.shape[1])
    for row in shared:
        assert row.tolist() == plain[0].tolist()
    torch.testing.assert_close(mask, completion_mask(shared, vlm.eos_token_ids))


def _decode_logits(vlm, inputs, shared: bool, rows: int = 2):
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=vlm.eos_token_ids,
        pad_token_id=vlm.pad_token_id,
    )
    with torch.no_grad():
        if not shared:
            out = vlm.model.generate(**inputs, **kwargs)
        else:
            cache = expand_cache(prefill(vlm, inputs), rows)
            call = {
                "input_ids": inputs["input_ids"].repeat(rows, 1),
                "attention_mask": inputs["attention_mask"].repeat(rows, 1),
                cache_argument(vlm.model): cache,
            }
            out = vlm.model.generate(**call, **kwargs)
    return torch.stack(out.logits, dim=1)  # [rows, steps, V]


def test_shared_prefix_decode_logits_equal_plain_generate(vlm, inputs):
    """Every decode step's logits, not only the argmax: catches wrong positions (Qwen2-VL's 3-D rope offset)."""
    plain = _decode_logits(vlm, inputs, shared=False)
    shared = _decode_logits(vlm, inputs, shared=True)
    for row in shared:
        torch.testing.assert_close(row, plain[0], atol=1e-4, rtol=1e-4)
    deltas = getattr(inner_model(vlm.model), "rope_deltas", None)
    if base_model(vlm.model).config.model_type == "qwen2_vl":  # the offset is real, so a wrong one would show above
        assert deltas is not None and int(deltas.abs().max()) > 0


def test_sampled_rollouts_are_valid_and_reproducible(vlm, inputs):
    a = sample_rollouts(vlm, inputs, 5, temperature=1.0, max_new_tokens=8, seed=3, micro_batch=2)
    b = sample_rollouts(vlm, inputs, 5, temperature=1.0, max_new_tokens=8, seed=3, micro_batch=2)
    c = sample_rollouts(vlm, inputs, 5, temperature=1.0, max_new_tokens=8, seed=4, micro_batch=2)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.completion_ids.shape[0] == 5 and a.completion_ids.shape[1] <= 8
    assert len({tuple(r.tolist()) for r in a.completion_ids}) > 1, "sampling gave identical rows"
    vocab = base_model(vlm.model).get_output_embeddings().weight.shape[0]
    assert int(a.completion_ids.max()) < vocab
    kept = a.completion_ids[a.completion_mask.bool()]
    assert not torch.isin(kept, torch.tensor(vlm.suppress_token_ids)).any()


def test_rollouts_stop_at_eos_and_masks_cover_them(vlm, inputs):
    """Only EOS and two words may be sampled, so rollouts end at different lengths across micro-batches."""
    eos = vlm.eos_token_ids[0]
    words = vlm.tokenizer.convert_tokens_to_ids(["red", "blue"])
    config = base_model(vlm.model).generation_config
    saved = config.suppress_tokens
    config.suppress_tokens = [i for i in range(len(vlm.tokenizer)) if i not in (eos, *words)]
    try:
        r = sample_rollouts(vlm, inputs, 9, temperature=1.0, max_new_tokens=12, seed=0, micro_batch=3)
    finally:
        config.suppress_tokens = saved
    ids, mask = r.completion_ids, r.completion_mask
    lengths = mask.sum(-1).long()
    assert len(set(lengths.tolist())) > 1, "expected rollouts of different lengths"
    for row, length in zip(ids, lengths):
        ended = bool((row[:length] == eos).any())
        if ended:  # the last kept token is the first EOS; everything after is masked padding
            assert row[length - 1] == eos and not (row[: length - 1] == eos).any()
            assert (row[length:] == vlm.pad_token_id).all() or (row[length:] == eos).all()
        else:
            assert length == 12
        assert set(row[:length].tolist()) <= {eos, *words}
    assert all(set(text.split()) <= {"red", "blue"} for text in r.texts)


SCORING_PATHS = {
    "shared prefix": dict(share_prefix=True),
    "N rows, image once": dict(share_prefix=False, share_vision=True),
    "N rows, image N times": dict(share_prefix=False, share_vision=False),
}


def test_scoring_paths_give_the_same_logprobs_and_gradients(vlm, inputs):
    """The prompt run once (its cache shared by the rows) and the image encoded once are exact optimisations of the
    plain N-row forward: same log-probs, entropies and LoRA gradients; the tower sees 1, 1 and N image copies."""
    r = sample_rollouts(vlm, inputs, 4, temperature=1.0, max_new_tokens=6, seed=1)
    assert r.completion_mask.sum() > 4  # some rows have several tokens: the cached continuation is exercised
    params = [p for p in vlm.model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero, which makes every lora_A gradient zero: randomise it
        for name, p in vlm.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    tower_batches = []
    hook = vision_tower(vlm.model).register_forward_hook(
        lambda module, args, kwargs, out: tower_batches.append(int((list(args) + list(kwargs.values()))[0].shape[0])),
        with_kwargs=True,
    )
    results = {}
    try:
        for name, options in SCORING_PATHS.items():
            for p in params:
                p.grad = None
            logp, entropy = completion_logprobs(vlm, r, temperature=1.0, backend="torch", **options)
            (logp.sum() + entropy.sum()).backward()
            results[name] = (logp.detach(), entropy.detach(), [p.grad.clone() for p in params])
    finally:
        hook.remove()
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.grad = None
                p.copy_(value)
    assert all(float(g.abs().max()) > 0 for g in results["shared prefix"][2])
    assert tower_batches[2] == 4 * tower_batches[0] and tower_batches[1] == tower_batches[0], tower_batches
    reference = results["N rows, image N times"]
    for name in ("shared prefix", "N rows, image once"):
        logp, entropy, grads = results[name]
        torch.testing.assert_close(logp, reference[0], atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(entropy, reference[1], atol=1e-5, rtol=1e-5, msg=name)
        for got, want in zip(grads, reference[2]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


def test_sampling_backs_off_on_out_of_memory(vlm, inputs, monkeypatch):
    reference = sample_rollouts(vlm, inputs, 6, temperature=1.0, max_new_tokens=5, seed=7, micro_batch=1)
    real = sampling._decode_from
    calls = []

    def flaky(vlm_, inputs_, cache, rows, *args):
        calls.append(rows)
        if rows > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(vlm_, inputs_, cache, rows, *args)

    monkeypatch.setattr(sampling, "_decode_from", flaky)
    planner = MemoryPlanner(vlm.model)
    r = sample_rollouts(vlm, inputs, 6, temperature=1.0, max_new_tokens=5, seed=7, memory=planner)
    assert calls[:3] == [6, 3, 1] and planner.oom_retries == 2
    assert planner.report()["sample_micro_batch"] == 1
    assert torch.equal(r.completion_ids, reference.completion_ids), "the retried sampling is not the same"
