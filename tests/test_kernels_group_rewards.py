"""Triton group_rewards against reference.group_rewards and hand-computed rewards."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_helpers import max_err, triton_interpreter

from ttrv_edge import kernels

reference = kernels.reference


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def _op():
    from ttrv_edge.kernels.group_rewards_triton import triton_group_rewards

    return triton_group_rewards


@pytest.mark.parametrize("n", [1, 2, 7, 16, 100])
def test_matches_reference(n):
    # n = 100 takes two column blocks of the pairwise comparison (64 at a time), the second partial.
    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(-1, 5, (6, n), generator=gen)
    ids[0] = torch.arange(n)  # all distinct
    ids[1] = 3  # consensus
    ids[2] = -1  # all invalid
    for alpha in (0.75, 0.0):
        out = _op()(ids, alpha=alpha)
        expected = reference.group_rewards(ids, alpha=alpha)
        for a, b in zip(out, expected, strict=True):
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert max_err(a, b) < 2e-6


def test_hand_computed_group():
    # Answers 0, 0, 1 and one invalid: p(0) = 1/2, p(1) = 1/4, H = -(1/2 log 1/2 + 1/4 log 1/4), K = 2.
    rewards, adv, entropy = _op()(torch.tensor([[0, 0, 1, -1]]), alpha=0.75)
    h = -(0.5 * math.log(0.5) + 0.25 * math.log(0.25))
    r_ent = -h / math.log(2)
    expected = torch.tensor([0.5, 0.5, 0.25, 0.0]) + 0.75 * r_ent
    assert entropy.item() == pytest.approx(h, abs=1e-6)
    assert rewards[0].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    centered = expected - expected.mean()
    std = centered.pow(2).mean().sqrt()
    assert adv[0].tolist() == pytest.approx((centered / (std + 1e-6)).tolist(), abs=1e-5)


@pytest.mark.parametrize("n", [5, 12, 32])
def test_groups_without_signal_get_exactly_zero_advantages(n):
    # Consensus, all-distinct, all-invalid and "two answers, equally split" groups have equal rewards: A is exactly 0
    # (the adaptation loop skips an update on `advantages == 0`, so 1e-2 of rounding noise would not do).
    ids = torch.stack([torch.full((n,), 4), torch.arange(n), torch.full((n,), -1), torch.arange(n) % 2 if n % 2 == 0
                       else torch.arange(n)])  # fmt: skip
    _, adv, _ = _op()(ids)
    assert (adv == 0).all()
    assert (reference.group_rewards(ids)[1] == 0).all()


def test_invalid_id_is_configurable_and_empty_groups():
    ids = torch.tensor([[7, 7, 2, 9]])
    a = _op()(ids, invalid_id=9)
    b = reference.group_rewards(ids, invalid_id=9)
    assert all(max_err(x, y) < 2e-6 for x, y in zip(a, b, strict=True))
    rewards, adv, entropy = _op()(torch.zeros(0, 4, dtype=torch.long))
    assert rewards.shape == (0, 4) and entropy.shape == (0,)


def test_public_dispatch_matches_torch_for_int32_ids():
    ids = torch.randint(-1, 3, (4, 8), dtype=torch.int32)
    a = kernels.group_rewards(ids, backend="triton")
    b = kernels.group_rewards(ids, backend="torch")
    assert all(max_err(x, y) < 2e-6 for x, y in zip(a, b, strict=True))


def test_user_errors_are_value_errors():
    with pytest.raises(ValueError, match=r"\[G, N\]"):
        _op()(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        _op()(torch.zeros(2, 3))
