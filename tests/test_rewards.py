"""Rewards and advantages, hand-computed on small groups (docs/method.md §3-4)."""

import math

import pytest
import torch
from ttrv_edge.kernels.reference import group_advantages, majority_rewards

from ttrv_edge import kernels
from ttrv_edge.rl.rewards import INVALID_ID, answer_ids, compute_rewards


def test_answer_ids_share_ids_within_a_group_and_mark_invalid():
    ids = answer_ids([["A", "B", "A", None], ["x", "x", "y", "y"]])
    assert ids.tolist() == [[0, 1, 0, INVALID_ID], [0, 0, 1, 1]]


def test_frequency_and_entropy_reward_by_hand():
    # answers A, A, B, None: p(A) = 1/2, p(B) = 1/4; H = 1/2 ln 2 + 1/4 ln 4 = ln 2; K = 2 -> r_ent = -1.
    rewards, advantages, entropy = kernels.group_rewards(torch.tensor([[0, 0, 1, -1]]), alpha=0.75, backend="torch")
    assert entropy.item() == pytest.approx(math.log(2), abs=1e-6)
    expected = torch.tensor([[0.5, 0.5, 0.25, 0.0]]) - 0.75
    torch.testing.assert_close(rewards, expected)
    centred = expected - expected.mean()
    torch.testing.assert_close(advantages, centred / (centred.pow(2).mean().sqrt() + 1e-6))
    assert advantages[0, 0].item() == pytest.approx(0.9045, abs=1e-3)
    assert advantages[0, 3].item() == pytest.approx(-1.5076, abs=1e-3)


def test_consensus_gives_zero_advantages_and_no_entropy_penalty():
    rewards, advantages, entropy = kernels.group_rewards(torch.tensor([[3, 3, 3, 3]]), backend="torch")
    assert rewards.tolist() == [[1.0, 1.0, 1.0, 1.0]]
    assert advantages.abs().max().item() == 0.0
    assert entropy.item() == 0.0


def test_entropy_reward_is_normalised_by_log_k():
    # four distinct answers: H = ln 4 = log K, so r_ent = -1 and each reward is 1/4 - alpha.
    rewards, _, entropy = kernels.group_rewards(torch.tensor([[0, 1, 2, 3]]), alpha=0.5, backend="torch")
    assert entropy.item() == pytest.approx(math.log(4), abs=1e-6)
    torch.testing.assert_close(rewards, torch.full((1, 4), 0.25 - 0.5))


def test_all_invalid_group_has_zero_rewards():
    rewards, advantages, entropy = kernels.group_rewards(torch.full((1, 3), -1), backend="torch")
    assert rewards.abs().max().item() == 0 and advantages.abs().max().item() == 0 and entropy.item() == 0


def test_entropy_term_cancels_under_group_baseline_but_not_batch_baseline():
    groups = [["A", "A", "B", "B"], ["A", "A", "A", "B"]]
    with_entropy = compute_rewards(groups, alpha=0.75, backend="torch")
    without = compute_rewards(groups, alpha=0.0, backend="torch")
    torch.testing.assert_close(with_entropy.advantages, without.advantages)
    batch_with = compute_rewards(groups, alpha=0.75, baseline="batch", backend="torch")
    batch_without = compute_rewards(groups, alpha=0.0, baseline="batch", backend="torch")
    assert not torch.allclose(batch_with.advantages, batch_without.advantages)


def test_majority_reward_breaks_ties_by_first_id():
    ids = torch.tensor([[0, 1, 1, 0, 2], [-1, -1, 2, 2, 1]])
    assert majority_rewards(ids).tolist() == [[1, 0, 0, 1, 0], [0, 0, 1, 1, 0]]


def test_self_certainty_signal_differs_between_rollouts():
    groups = [["A", "A", "A", "B"]]
    token_entropy = torch.tensor([[0.1, 0.5, 0.9, 0.2]])
    r = compute_rewards(
        groups, entropy_signal="self-certainty", alpha=1.0, token_entropy=token_entropy, backend="torch"
    )
    torch.testing.assert_close(r.rewards, torch.tensor([[0.75, 0.75, 0.75, 0.25]]) - token_entropy)
    with pytest.raises(ValueError, match="self-certainty"):
        compute_rewards(groups, entropy_signal="self-certainty", backend="torch")


def test_majority_reward_mode():
    r = compute_rewards([["A", "B", "A", None]], reward="majority", backend="torch")
    assert r.rewards.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    assert r.has_signal.tolist() == [True]


def test_group_advantages_of_one_rollout_is_zero():
    assert group_advantages(torch.tensor([[0.7]])).tolist() == [[0.0]]
