"""Triton grpo_loss against reference.grpo_loss (values, stats, gradients) and hand-computed losses."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_helpers import assert_close_to_gold, max_err, triton_interpreter

from ttrv_edge import kernels

reference = kernels.reference


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def _op():
    from ttrv_edge.kernels.grpo_loss_triton import triton_grpo_loss

    return triton_grpo_loss


def _batch(b=5, t=37, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen) * 3
    old = logp + torch.randn(b, t, generator=gen) * 0.3  # ratios spread on both sides of the clip range
    ref = logp + torch.randn(b, t, generator=gen) * 0.2
    adv = torch.randn(b, generator=gen)
    adv[1] = 0.0
    mask = torch.rand(b, t, generator=gen) > 0.3
    mask[2] = False  # a fully masked sequence
    return logp.to(dtype), old.to(dtype), adv, mask, ref.to(dtype)


def _run(fn, logp, *args, **kwargs):
    x = logp.detach().clone().requires_grad_(True)
    loss, stats = fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), stats, x.grad


@pytest.mark.parametrize("aggregation", ["token-mean", "sequence-mean"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(aggregation, beta, dtype):
    logp, old, adv, mask, ref = _batch(dtype=dtype)
    kw = dict(eps_low=0.2, eps_high=0.28, ref_logp=ref, beta=beta, aggregation=aggregation)
    loss, stats, grad = _run(_op(), logp, old, adv, mask, **kw, block_t=16)  # 3 blocks of T, the last partial
    ref_loss, ref_stats, ref_grad = _run(reference.grpo_loss, logp, old, adv, mask, **kw)
    gold_loss, _, gold_grad = _run(
        reference.grpo_loss, logp.float(), old.float(), adv, mask, **{**kw, "ref_logp": ref.float()}
    )
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert max_err(loss, ref_loss) < 1e-6 and max_err(loss, gold_loss) < 1e-6
    assert stats["clip_fraction"].item() == pytest.approx(ref_stats["clip_fraction"].item(), abs=1e-7)
    assert stats["mean_kl"].item() == pytest.approx(ref_stats["mean_kl"].item(), abs=1e-7)
    assert 0 < stats["clip_fraction"].item() < 1 and (stats["mean_kl"].item() > 0) == (beta > 0)
    assert_close_to_gold(grad, gold_grad, dtype, "grad")
    assert_close_to_gold(ref_grad, gold_grad, dtype, "grad")
    assert (grad[2] == 0).all() and (grad[~mask] == 0).all()


def test_hand_computed_loss_and_gradient():
    # One sequence, two tokens, A = 1, eps = 0.2. Token 0: ratio e^0.5 > 1.2 is clipped (loss -1.2, grad 0).
    # Token 1: ratio e^-0.1 inside the range (loss -e^-0.1, grad -e^-0.1). Token-mean over 2 tokens.
    logp = torch.tensor([[0.0, -0.1]], requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]])
    loss, stats = _op()(logp, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    r1 = math.exp(-0.1)
    assert loss.item() == pytest.approx(-(1.2 + r1) / 2, abs=1e-6)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -r1 / 2], abs=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)


def test_k3_kl_hand_computed():
    # A = 0 leaves only beta * k3: k3(delta) = e^delta - delta - 1 with delta = ref - logp, d/dlogp = 1 - e^delta.
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, stats = _op()(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), ref_logp=ref, beta=0.1)
    loss.backward()
    k3 = [math.exp(d) - d - 1 for d in (-0.5, 1.0)]
    assert loss.item() == pytest.approx(0.1 * sum(k3) / 2, abs=1e-6)
    assert stats["mean_kl"].item() == pytest.approx(sum(k3) / 2, abs=1e-6)
    assert logp.grad.tolist()[0] == pytest.approx([0.1 * (1 - math.exp(d)) / 2 for d in (-0.5, 1.0)], abs=1e-6)


def test_ratio_one_and_clip_boundaries_follow_torch_tie_rules():
    # Ratio exactly 1 (on-policy, every first step) ties the two terms of the min: torch splits the gradient and
    # the clamp passes its half, so the total is -A * ratio. With eps = 0 the ratio sits exactly on both clip bounds.
    # (Ties at other bounds depend on the last bit of exp(), which differs between implementations.)
    logp = torch.tensor([[0.0, math.log(0.7), math.log(1.3), 0.3]])
    old = torch.tensor([[0.0, 0.0, 0.0, 0.3]])
    for adv in (1.0, -1.0, 0.0):
        for eps in (0.2, 0.0):
            args = (old, torch.tensor([adv]), torch.ones(1, 4))
            loss, _, grad = _run(_op(), logp, *args, eps_low=eps, eps_high=eps)
            ref_loss, _, ref_grad = _run(reference.grpo_loss, logp, *args, eps_low=eps, eps_high=eps)
            assert max_err(loss, ref_loss) < 1e-6 and max_err(grad, ref_grad) < 1e-7
            assert grad[0, 0].item() == pytest.approx(-adv / 4) and grad[0, 3].item() == pytest.approx(-adv / 4)


def test_all_masked_batch_gives_zero_loss_and_gradient():
    logp, old, adv, _, ref = _batch()
    for aggregation in ("token-mean", "sequence-mean"):
        loss, stats, grad = _run(_op(), logp, old, adv, torch.zeros_like(logp), ref_logp=ref, beta=0.1,
                                 aggregation=aggregation)  # fmt: skip
        assert loss.item() == 0.0 and (grad == 0).all()
        assert stats["clip_fraction"].item() == 0.0 and stats["mean_kl"].item() == 0.0


def test_float_mask_weights_and_single_token():
    logp, old, adv, mask, ref = _batch(b=3, t=1)
    weights = torch.tensor([[0.5], [2.0], [0.0]])
    for aggregation in ("token-mean", "sequence-mean"):
        out = _run(_op(), logp, old, adv, weights, aggregation=aggregation)
        expected = _run(reference.grpo_loss, logp, old, adv, weights, aggregation=aggregation)
        assert max_err(out[0], expected[0]) < 1e-6 and max_err(out[2], expected[2]) < 1e-6


def test_beta_without_ref_means_no_kl_and_stats_have_no_grad():
    logp, old, adv, mask, _ = _batch()
    loss, stats, grad = _run(_op(), logp, old, adv, mask, beta=0.5)
    ref_loss, _, ref_grad = _run(reference.grpo_loss, logp, old, adv, mask, beta=0.5)
    assert max_err(loss, ref_loss) < 1e-6 and max_err(grad, ref_grad) < 1e-6
    assert stats["mean_kl"].item() == 0.0 and not stats["clip_fraction"].requires_grad


def test_public_dispatch_matches_torch():
    logp, old, adv, mask, ref = _batch()
    kw = dict(ref_logp=ref, beta=0.04, aggregation="sequence-mean")
    a = kernels.grpo_loss(logp, old, adv, mask, backend="triton", **kw)
    b = kernels.grpo_loss(logp, old, adv, mask, backend="torch", **kw)
    assert max_err(a[0], b[0]) < 1e-6 and max_err(a[1]["mean_kl"], b[1]["mean_kl"]) < 1e-6


def test_user_errors_are_value_errors():
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="aggregation"):
        _op()(logp, old, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="old_logp"):
        _op()(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        _op()(logp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="block_t"):
        _op()(logp, old, adv, mask, block_t=12)
