"""Votes across views and the gated reward: views are label-preserving, one prefill per view, rewards from the
pooled vote, and a weak consensus is not trained on."""

import numpy as np
import pytest
import torch
from helpers import SignalQuestion
from PIL import Image

from ttrv_edge.api import TTRVModel
from ttrv_edge.config import TTRVConfig
from ttrv_edge.rl import loss, sampling
from ttrv_edge.rl.rewards import answer_ids, compute_rewards, gate_passes
from ttrv_edge.rl.views import flip_allowed, make_views


def test_views_keep_the_image_first_and_are_reproducible(test_image):
    views = make_views(test_image, 4, seed=7, transforms="geometric", flip=True)
    again = make_views(test_image, 4, seed=7, transforms="geometric", flip=True)
    other = make_views(test_image, 4, seed=8, transforms="geometric", flip=True)
    assert views[0] is test_image and len(views) == 4 and all(v.size == test_image.size for v in views)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, again))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views[1:], other[1:]))


def test_geometric_views_keep_a_centred_object_and_its_colour():
    """A red disc in the middle stays a red disc of about the same size in every view (crop >= 0.8 of the area)."""
    image = Image.new("RGB", (64, 64), "white")
    yy, xx = np.mgrid[:64, :64]
    pixels = np.asarray(image).copy()
    pixels[(yy - 32) ** 2 + (xx - 32) ** 2 <= 10**2] = (220, 30, 30)
    image = Image.fromarray(pixels)
    for view in make_views(image, 9, seed=1, transforms="geometric", flip=True)[1:]:
        red = (np.asarray(view)[..., 0] > 150) & (np.asarray(view)[..., 1] < 100)
        assert 0.8 * 314 <= red.sum() <= 1.35 * 314


def test_flip_only_when_the_question_is_not_about_sides():
    assert flip_allowed("Which shape is red?") and not flip_allowed("What is on the LEFT of the cat?")


def test_bad_view_options_name_the_flag():
    with pytest.raises(ValueError, match="--views"):
        TTRVConfig(views=0)
    with pytest.raises(ValueError, match="--view-transforms"):
        TTRVConfig(view_transforms="rotate")
    with pytest.raises(ValueError, match="--gate-share"):
        TTRVConfig(gate_share=1.5)


@pytest.mark.parametrize(
    "answers, passes",
    [
        (["A"] * 5 + ["B"] * 3, True),  # share 0.625, lead 0.25
        (["A"] * 4 + ["B"] * 4, False),  # a tie has no lead
        (["A"] * 3 + ["B"] + [None] * 4, False),  # share 0.375 < 0.5, though the lead is 0.25
        (["A"] * 8, True),
        ([None] * 8, False),
    ],
)
def test_gate_by_hand(answers, passes):
    assert bool(gate_passes(answer_ids([answers]), 0.5, 0.25)[0]) is passes


def test_gated_reward_rewards_the_majority_or_skips_the_group():
    groups = [["A"] * 5 + ["B"] * 3, ["A"] * 4 + ["B"] * 4]
    r = compute_rewards(groups, reward="gated", gate_share=0.5, gate_margin=0.25)
    assert r.rewards[0].tolist() == [1.0] * 5 + [0.0] * 3
    assert r.rewards[1].tolist() == [0.0] * 8 and float(r.advantages[1].abs().max()) == 0.0
    assert float(r.advantages[0, 0]) > 0 > float(r.advantages[0, -1])


@pytest.fixture
def views_model(tiny_idefics3_dir):
    return TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=6, views=3, steps=2, max_new_tokens=6, lr=5e-2)


def test_views_prefill_once_per_view_and_pool_the_answers(views_model, test_image, monkeypatch):
    loop = views_model.loop
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    prefills = []
    real = sampling.prefill
    monkeypatch.setattr(sampling, "prefill", lambda vlm, inputs: prefills.append(inputs) or real(vlm, inputs))
    groups, answers = loop.sample(item, seed=4)
    assert len(groups) == 3 and [g.num for g in groups] == [2, 2, 2] and len(answers) == 6
    assert len(prefills) == 3 and prefills[0] is item.inputs  # view 1 is the image itself
    assert not torch.equal(prefills[1]["pixel_values"], prefills[0]["pixel_values"])


def test_every_view_is_trained_toward_the_pooled_vote(views_model, test_image, monkeypatch):
    loop = views_model.loop
    item = loop.prepare("img", test_image, SignalQuestion("Describe it."))
    groups, _ = loop.sample(item, seed=4)
    answers = ["A", "A", "B", "A", "A", "C"]  # view 2 alone would not agree with itself
    seen = []
    real = loss.kernels.linear_grpo_loss  # per-token advantages: a rollout's advantage over its completion tokens
    monkeypatch.setattr(loss.kernels, "linear_grpo_loss", lambda *a, **k: seen.append(a[4].clone()) or real(*a, **k))
    outcome = loop.update([(groups, answers)])
    expected = compute_rewards([answers]).advantages[0]
    lengths = torch.cat([g.completion_mask.sum(-1) for g in groups]).long()
    assert outcome.loss is not None
    torch.testing.assert_close(torch.cat(seen), expected.repeat_interleave(lengths))


def test_episode_with_views_reports_the_view_vote(views_model, test_image):
    result = views_model.adapt(test_image, "What is it?", choices=["a", "b"])
    assert sum(result.before.distribution.values()) == pytest.approx(1.0)
    assert result.steps and all(s.logprob_gap is None or s.logprob_gap < 1e-3 for s in result.steps)


def test_rollouts_not_a_multiple_of_views_are_spread_evenly(tiny_idefics3_dir, test_image):
    model = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=5, views=3, max_new_tokens=4)
    groups, answers = model.loop.sample(model.loop.prepare("img", test_image, SignalQuestion("Describe it.")), seed=1)
    assert [g.num for g in groups] == [2, 2, 1] and len(answers) == 5
    few = TTRVModel.from_pretrained(str(tiny_idefics3_dir), rollouts=2, views=8, max_new_tokens=4)
    groups, _ = few.loop.sample(few.loop.prepare("img", test_image, SignalQuestion("Describe it.")), seed=1)
    assert [g.num for g in groups] == [1, 1]  # at most N views
