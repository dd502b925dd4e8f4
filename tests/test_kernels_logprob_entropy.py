"""Triton logprob_entropy (under TRITON_INTERPRET=1) against the torch reference and an fp32 gold."""

from __future__ import annotations

import math

import pytest
import torch
from test_kernels_helpers import assert_close_to_gold, max_err, triton_interpreter
from ttrv_edge.kernels import reference

from ttrv_edge import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def _op():
    from ttrv_edge.kernels.logprob_entropy_triton import triton_logprob_entropy

    return triton_logprob_entropy


def _run(fn, logits, targets, temperature, g_logp, g_ent, **kwargs):
    """Forward values and d(sum(g_logp * logp + g_ent * entropy))/d(logits)."""
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(x, targets, temperature, **kwargs)
    (logp * g_logp + ent * g_ent).sum().backward()
    return logp.detach(), ent.detach(), x.grad


def _check_three_ways(logits, targets, temperature, block_v=None, scale=None):
    torch.manual_seed(1)
    n = logits.shape[0]
    g_logp, g_ent = torch.randn(n), torch.randn(n)
    kernel = _run(_op(), logits, targets, temperature, g_logp, g_ent, block_v=block_v)
    ref = _run(reference.logprob_entropy, logits, targets, temperature, g_logp, g_ent)
    gold = _run(reference.logprob_entropy, logits.float(), targets, temperature, g_logp, g_ent)
    for k, r, g, kind in zip(kernel, ref, gold, ("fwd", "fwd", "grad"), strict=True):
        assert k.dtype == (torch.float32 if kind == "fwd" else logits.dtype)
        assert_close_to_gold(k, g, logits.dtype, kind, scale=scale)
        assert_close_to_gold(r, g, logits.dtype, kind, scale=scale)  # the table is not looser than torch needs
    return kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_and_gold(dtype, temperature):
    # V = 3000 with a 1024 block: three iterations of the online softmax, the last one partial.
    torch.manual_seed(0)
    logits = (torch.randn(6, 3000) * 4).to(dtype)
    targets = torch.randint(0, 3000, (6,))
    _check_three_ways(logits, targets, temperature, block_v=1024)


def test_default_block_and_leading_dims():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 517)
    targets = torch.randint(0, 517, (2, 3))
    logp, ent = _op()(logits, targets)
    ref_logp, ref_ent = reference.logprob_entropy(logits, targets)
    assert logp.shape == (2, 3) and ent.shape == (2, 3)
    assert max_err(logp, ref_logp) < 1e-5 and max_err(ent, ref_ent) < 1e-5


def test_uniform_logits_hand_computed():
    V = 1000
    logp, ent = _op()(torch.zeros(1, V), torch.tensor([3]), block_v=256)
    assert logp.item() == pytest.approx(-math.log(V), abs=1e-5)
    assert ent.item() == pytest.approx(math.log(V), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_logits(dtype):
    # +-1e4 logits: the entropy must not come from cancelling two numbers of size 1e4.
    torch.manual_seed(0)
    logits = (torch.randn(4, 700) * 1e4).clamp(-1e4, 1e4)
    logits[1] = torch.randn(700)  # a tame row next to the huge ones
    logits[2, :3] = 1e4  # three tied maxima: entropy log(3), logp of one of them -log(3)
    logits[2, 3:] = -1e4
    logits = logits.to(dtype)
    targets = torch.tensor([0, 5, 1, int(logits[3].float().argmax())])
    logp, ent, _ = _check_three_ways(logits, targets, 1.0, block_v=256, scale=1e4)
    assert ent[2].item() == pytest.approx(math.log(3), abs=1e-5)
    assert logp[2].item() == pytest.approx(-math.log(3), abs=1e-5)
    assert torch.isfinite(ent).all() and (ent >= -1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_entries(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 1100)
    logits[0, :600] = float("-inf")  # the whole first block is masked
    logits[1, ::3] = float("-inf")
    logits[2, 1:] = float("-inf")  # one finite entry: a point mass
    logits = logits.to(dtype)
    targets = torch.tensor([700, 1, 0, 4, 9])
    logp, ent, grad = _check_three_ways(logits, targets, 1.3, block_v=512)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all() and torch.isfinite(grad).all()
    assert logp[2].item() == 0.0 and ent[2].item() == 0.0
    assert (grad[logits == float("-inf")] == 0).all()


def test_minus_inf_target_gives_minus_inf_logp():
    logits = torch.randn(2, 64)
    logits[0, 7] = float("-inf")
    logp, ent = _op()(logits, torch.tensor([7, 3]))
    assert logp[0].item() == float("-inf") and torch.isfinite(ent).all()


@pytest.mark.parametrize("V", [1, 17, 1025])
def test_odd_vocab_and_single_row(V):
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    _check_three_ways(logits, torch.tensor([V - 1]), 1.5, block_v=256 if V > 256 else None)


def test_unused_output_gets_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 300, requires_grad=True)
    targets = torch.tensor([1, 2, 3])
    logp, _ = _op()(logits, targets)
    logp.sum().backward()
    expected = torch.autograd.grad(reference.logprob_entropy(logits, targets)[0].sum(), logits)[0]
    assert max_err(logits.grad, expected) < 1e-6


def test_backward_saves_no_vocab_sized_float32_tensor():
    # The backward recomputes from the logits: the only [N, V] tensor saved is the (bf16) input itself.
    logits = torch.randn(4, 1000).to(torch.bfloat16).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logp, ent = _op()(logits, torch.tensor([0, 1, 2, 3]))
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16 and big[0].data_ptr() == logits.data_ptr()
    assert all(t.numel() <= 2 * 4 for t in saved if t is not big[0])  # O(N): targets, (max, log-sum), entropy


def test_public_dispatch_uses_triton_and_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 200)
    targets = torch.tensor([0, 100, 199])
    via_triton = kernels.logprob_entropy(logits, targets, 0.9, backend="triton")
    via_torch = kernels.logprob_entropy(logits, targets, 0.9, backend="torch")
    assert kernels.resolve_backend("triton", logits) == "triton"
    for a, b in zip(via_triton, via_torch, strict=True):
        assert max_err(a, b) < 1e-5


def test_user_errors_are_value_errors():
    op = _op()
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="temperature"):
        op(logits, torch.tensor([0, 1]), 0.0)
    with pytest.raises(ValueError, match="targets"):
        op(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        op(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="block_v"):
        op(logits, torch.tensor([0, 1]), block_v=100)
