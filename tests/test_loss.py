"""The clipped GRPO loss and the log-prob/entropy references, hand-computed."""

import math

import pytest
import torch
from ttrv_edge.kernels import reference

from ttrv_edge import kernels


def _loss(logp, old, adv, mask, **kw):
    return kernels.grpo_loss(logp, old, adv, mask, backend="torch", **kw)


def test_ratio_one_token_mean_and_sequence_mean():
    logp = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, stats = _loss(logp, logp, adv, mask)
    assert loss.item() == pytest.approx(-1 / 3)
    assert stats["clip_fraction"].item() == 0
    loss_seq, _ = _loss(logp, logp, adv, mask, aggregation="sequence-mean")
    assert loss_seq.item() == pytest.approx(0.0)


def test_clipping_by_hand():
    old = torch.zeros(2, 1)
    logp = torch.full((2, 1), math.log(1.5), requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = _loss(logp, old, adv, torch.ones(2, 1))
    # positive advantage: min(1.5, 1.2) -> clipped, -1.2; negative: min(-1.5, -1.2) = -1.5 -> +1.5, unclipped.
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    # the clipped token has no gradient; the other has d/dlogp (ratio * 1) / 2 = 0.75.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0], [0.75]]))


def test_k3_kl_by_hand():
    logp = torch.zeros(1, 1)
    ref = torch.full((1, 1), math.log(2.0))
    loss, stats = _loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), ref_logp=ref, beta=0.5)
    kl = 2.0 - math.log(2.0) - 1.0
    assert stats["mean_kl"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 * kl)


def test_fully_masked_batch_gives_zero_loss_not_nan():
    loss, stats = _loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and stats["clip_fraction"].item() == 0.0


def test_bad_aggregation_is_a_value_error():
    with pytest.raises(ValueError, match="aggregation"):
        _loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), aggregation="sum")


def test_logprob_entropy_reference_by_hand_with_masked_entries():
    logits = torch.tensor([[0.0, 0.0, float("-inf")], [math.log(3.0), 0.0, 0.0]])
    logp, entropy = kernels.logprob_entropy(logits, torch.tensor([0, 1]), backend="torch")
    torch.testing.assert_close(logp, torch.tensor([math.log(0.5), math.log(0.2)]))
    torch.testing.assert_close(entropy[0], torch.tensor(math.log(2.0)))
    p = torch.tensor([0.6, 0.2, 0.2])
    torch.testing.assert_close(entropy[1], -(p * p.log()).sum())


def test_temperature_scales_logits():
    logits = torch.randn(4, 7)
    targets = torch.randint(0, 7, (4,))
    a = kernels.logprob_entropy(logits, targets, temperature=2.0, backend="torch")
    b = kernels.logprob_entropy(logits / 2.0, targets, backend="torch")
    torch.testing.assert_close(a, b)


def test_chunked_linear_logprob_matches_full_logits_with_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(13, 8)
    bias = torch.randn(13)
    targets = torch.randint(0, 13, (10,))
    logp, ent = reference.linear_logprob_entropy(hidden, weight, targets, bias, 1.3, chunk_rows=3)
    (logp.sum() + 0.5 * ent.sum()).backward()
    grad_chunked = hidden.grad.clone()
    hidden.grad = None
    full = reference.logprob_entropy(hidden @ weight.t() + bias, targets, 1.3)
    (full[0].sum() + 0.5 * full[1].sum()).backward()
    torch.testing.assert_close(logp, full[0])
    torch.testing.assert_close(ent, full[1])
    torch.testing.assert_close(grad_chunked, hidden.grad)
    assert weight.grad is None
