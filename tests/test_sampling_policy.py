"""Sampling and training use one distribution: the loss scores each sampled token under exactly the distribution
the sampler drew it from (after every logits processor), on checkpoints whose generation config asks for more."""

import json
import shutil

import pytest
import torch
from helpers import SignalQuestion
from transformers import LogitsProcessorList

from ttrv_edge.api import TTRVModel
from ttrv_edge.models import base_model
from ttrv_edge.rl.sampling import PolicyWarper, generation_config, sample_rollouts
from ttrv_edge.rl.scoring import completion_logprobs

TEMPERATURE = 1.5


@pytest.fixture(params=["tiny_idefics3_dir", "tiny_qwen2vl_dir"])
def demanding_dir(request, tmp_path):
    """A tiny model whose generation_config.json asks for processors the loss cannot model, and whose config turns
    dropout on everywhere (an update in train mode would then score differently from the sampler)."""
    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(request.param), folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(repetition_penalty=1.3, no_repeat_ngram_size=2, suppress_tokens=[5, 6, 7], top_k=20)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    config = json.loads((folder / "config.json").read_text())
    for part in (config, config.get("text_config", {}), config.get("vision_config", {})):
        for key in ("attention_dropout", "hidden_dropout", "dropout"):
            part[key] = 0.5
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_loading_drops_unmodelled_processors_and_says_so_once(demanding_dir, capfd):
    first = TTRVModel.from_pretrained(str(demanding_dir), rollouts=4, max_new_tokens=5)
    TTRVModel.from_pretrained(str(demanding_dir), rollouts=4, max_new_tokens=5)
    err = capfd.readouterr().err
    assert err.count("ignoring generation_config settings") == 1
    assert "repetition_penalty=1.3" in err and "no_repeat_ngram_size=2" in err and "top_k=20" in err
    gen = base_model(first.vlm.model).generation_config
    assert gen.repetition_penalty in (None, 1.0) and not gen.no_repeat_ngram_size
    assert {5, 6, 7} <= set(first.vlm.suppress_token_ids), "the checkpoint's suppressed ids are modelled, not dropped"


def test_sampler_logprobs_are_the_post_processor_scores(demanding_dir, test_image):
    """``Rollouts.sampler_logp`` equals log_softmax of transformers' ``output_scores`` (after all processors), and the
    training forward scores the same tokens within 1e-3 (fp32)."""
    vlm = TTRVModel.from_pretrained(str(demanding_dir), max_new_tokens=6).vlm
    inputs = vlm.prompt_inputs(test_image, "What is it?")
    rollouts = sample_rollouts(vlm, inputs, 4, temperature=TEMPERATURE, max_new_tokens=6, seed=5, shared_prefix=False)
    torch.manual_seed(5)
    with torch.no_grad():
        out = vlm.model.generate(
            **inputs,
            num_return_sequences=4,
            generation_config=generation_config(vlm, 6, TEMPERATURE),
            logits_processor=LogitsProcessorList([PolicyWarper(TEMPERATURE)]),
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(new, rollouts.completion_ids)
    scores = torch.log_softmax(torch.stack(out.scores, dim=1).float(), -1)
    expected = scores.gather(-1, new.unsqueeze(-1)).squeeze(-1)
    keep = rollouts.completion_mask.bool()
    torch.testing.assert_close(rollouts.sampler_logp[keep], expected[keep], atol=1e-6, rtol=0)
    assert not torch.isin(new[keep], torch.tensor([5, 6, 7])).any()
    logp, _ = completion_logprobs(vlm, rollouts, temperature=TEMPERATURE, backend="torch")
    assert float((logp.detach() - rollouts.sampler_logp)[keep].abs().max()) < 1e-3


def test_step_records_report_a_small_logprob_gap(demanding_dir, test_image, monkeypatch):
    api = TTRVModel.from_pretrained(str(demanding_dir), rollouts=6, steps=2, max_new_tokens=6, temperature=1.3)
    item = api.loop.prepare("img", test_image, SignalQuestion("Describe it."))
    steps = api.loop.adapt_episode(item).to_dict()["steps"]
    gaps = [s["logprob_gap"] for s in steps if s["updated"]]
    assert gaps and all(0 <= g < 1e-3 for g in gaps), gaps
    # The control: scoring without the suppression bias (today's bug) shows up in the same field.
    monkeypatch.setattr(type(api.vlm), "logit_bias", lambda self: None)
    steps = api.loop.adapt_episode(item).to_dict()["steps"]
    assert max(s["logprob_gap"] for s in steps if s["updated"]) > 1e-2


def test_logprob_gap_ignores_padding_scored_minus_infinity():
    """Padding after EOS is a suppressed id, so the sampler scores it -inf: the gap must still be finite."""
    import math

    from ttrv_edge.rl.loss import logprob_gap
    from ttrv_edge.rl.sampling import Rollouts

    ids = torch.tensor([[4, 2, 0, 0], [5, 6, 7, 2]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    sampler = torch.tensor([[-1.0, -0.5, -math.inf, -math.inf], [-2.0, -1.0, -0.1, -0.3]])
    trained = torch.tensor([[-1.0004, -0.5, 0.0, 0.0], [-2.0, -1.0, -0.1, -0.3]])
    rollouts = Rollouts({}, ids, mask, ["a", "b"], sampler)
    assert logprob_gap([rollouts], [trained]) == pytest.approx(4e-4, rel=1e-3)
