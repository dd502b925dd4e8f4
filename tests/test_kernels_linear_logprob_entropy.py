"""Triton linear_logprob_entropy (fused lm_head) against the chunked torch reference and an fp32 gold."""

from __future__ import annotations

import pytest
import torch
from test_kernels_helpers import assert_three_way, max_err, triton_interpreter
from torch.utils._python_dispatch import TorchDispatchMode

from ttrv_edge import kernels

reference = kernels.reference

# Max-abs error allowed beyond twice the low-precision reference's own error (the logits matmul runs in the input
# dtype in both backends, so for bf16/fp16 the reference's error is the yardstick).
THREE_WAY_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with triton_interpreter():
        yield


def _op():
    from ttrv_edge.kernels.linear_logprob_entropy_triton import triton_linear_logprob_entropy

    return triton_linear_logprob_entropy


def _inputs(n, h, v, dtype, bias, train_weight, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = (torch.randn(n, generator=gen), torch.randn(n, generator=gen))
    return hidden, weight, b, targets, upstream, train_weight


def _run(fn, hidden, weight, bias, targets, upstream, train_weight, cast=None, **kwargs):
    """Outputs and gradients of sum(g1 * logp + g2 * entropy) w.r.t. every input that requires grad."""
    leaves = [hidden, weight, bias]
    if cast is not None:
        leaves = [None if t is None else t.to(cast) for t in leaves]
    leaves = [None if t is None else t.detach().clone() for t in leaves]
    leaves[0].requires_grad_(True)
    if train_weight:
        leaves[1].requires_grad_(True)
        if leaves[2] is not None:
            leaves[2].requires_grad_(True)
    logp, ent = fn(leaves[0], leaves[1], targets, leaves[2], 1.3, **kwargs)
    (logp * upstream[0] + ent * upstream[1]).sum().backward()
    return [logp.detach(), ent.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize(
    "dtype, bias, train_weight",
    [
        (torch.float32, False, False),
        (torch.float32, True, True),
        (torch.float16, True, True),
        (torch.bfloat16, True, False),
        (torch.bfloat16, False, True),
    ],
)
def test_matches_reference_and_gold(dtype, bias, train_weight):
    # N = 20 rows in chunks of 8 (the last one partial), V = 300 in vocabulary blocks of 128 (partial too).
    args = _inputs(20, 24, 300, dtype, bias, train_weight)
    kernel = _run(_op(), *args, chunk_rows=8, block_v=128)
    ref = _run(reference.linear_logprob_entropy, *args, chunk_rows=8)
    gold = _run(reference.linear_logprob_entropy, *args, cast=torch.float32, chunk_rows=8)
    names = ["logp", "entropy", "dhidden", "dweight", "dbias"]
    for name, k, r, g in zip(names, kernel, ref, gold, strict=True):
        if g is None:
            assert k is None, f"{name} got a gradient it should not have"
            continue
        assert k.dtype == r.dtype, name
        assert_three_way(k, r, g, THREE_WAY_ATOL[dtype])
    assert kernel[2].abs().sum() > 0  # the gradient really flowed


def test_frozen_weight_allocates_no_weight_gradient_and_no_full_logits():
    n, h, v, chunk = 20, 32, 256, 8
    hidden, weight, bias, targets, upstream, _ = _inputs(n, h, v, torch.float32, True, False)
    hidden.requires_grad_(True)
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # Views (weight.t(), row slices) and in-place ops (the interpreter's copies) allocate nothing.
            if func.is_view or func._schema.is_mutable:
                return out
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    logp, ent = _op()(hidden, weight, targets, bias, chunk_rows=chunk)
    with Record():
        (logp * upstream[0] + ent * upstream[1]).sum().backward()
    assert weight.grad is None and bias.grad is None and hidden.grad is not None
    assert (v, h) not in shapes and (v,) not in shapes, "a weight/bias gradient buffer was allocated"
    largest = max(torch.Size(s).numel() for s in shapes)
    assert largest <= chunk * v, f"a tensor of {largest} elements exceeds one [chunk, V] logits buffer"


def test_tied_embedding_gets_both_gradients():
    # Tied lm_head: the same parameter is the embedding and the output projection.
    torch.manual_seed(0)
    emb = torch.nn.Embedding(300, 16)
    ids = torch.randint(0, 300, (9,))
    targets = torch.randint(0, 300, (9,))
    grads = []
    for fn in (_op(), reference.linear_logprob_entropy):
        emb.zero_grad(set_to_none=True)
        hidden = torch.tanh(emb(ids))
        logp, ent = fn(hidden, emb.weight, targets)
        (logp.sum() + 0.5 * ent.sum()).backward()
        grads.append(emb.weight.grad.clone())
    assert max_err(grads[0], grads[1]) < 1e-5
    assert grads[0][ids].abs().sum() > 0


def test_single_row_default_chunk_and_leading_dims():
    args = _inputs(1, 8, 100, torch.float32, False, False)
    kernel = _run(_op(), *args)
    gold = _run(reference.linear_logprob_entropy, *args)
    assert max_err(kernel[0], gold[0]) < 1e-5 and max_err(kernel[2], gold[2]) < 1e-5
    hidden = torch.randn(2, 3, 8)
    logp, ent = _op()(hidden, torch.randn(50, 8), torch.randint(0, 50, (2, 3)))
    assert logp.shape == (2, 3) and ent.shape == (2, 3)


def test_empty_input():
    logp, ent = _op()(torch.randn(0, 8), torch.randn(50, 8), torch.zeros(0, dtype=torch.long))
    assert logp.shape == (0,) and ent.shape == (0,)


def test_public_dispatch_with_chunk_rows():
    args = _inputs(10, 8, 64, torch.float32, True, False)
    hidden, weight, bias, targets = args[:4]
    a = kernels.linear_logprob_entropy(hidden, weight, targets, bias, 0.8, backend="triton", chunk_rows=3)
    b = kernels.linear_logprob_entropy(hidden, weight, targets, bias, 0.8, backend="torch", chunk_rows=3)
    assert max_err(a[0], b[0]) < 1e-5 and max_err(a[1], b[1]) < 1e-5


def test_user_errors_are_value_errors():
    op = _op()
    hidden, weight, targets = torch.randn(4, 8), torch.randn(50, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        op(hidden, torch.randn(50, 9), targets)
    with pytest.raises(ValueError, match="bias"):
        op(hidden, weight, targets, torch.randn(49))
    with pytest.raises(ValueError, match="dtype"):
        op(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="chunk_rows"):
        op(hidden, weight, targets, chunk_rows=0)
    with pytest.raises(ValueError, match="targets"):
        op(hidden, weight, targets[:3])


def test_autocast_computes_in_the_autocast_dtype_and_returns_input_dtype_grads():
    hidden, weight, _, targets, upstream, _ = _inputs(12, 16, 200, torch.float32, False, False)
    results = []
    for fn in (_op(), reference.linear_logprob_entropy):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, ent = fn(h, weight, targets, None, 1.3)  # the temperature _run uses for the gold
        (logp * upstream[0] + ent * upstream[1]).sum().backward()
        results.append((logp.detach(), h.grad))
    (k_logp, k_grad), (r_logp, r_grad) = results
    assert k_logp.dtype == torch.float32 and k_grad.dtype == torch.float32
    gold = _run(reference.linear_logprob_entropy, hidden, weight, None, targets, upstream, False)
    # bf16 logits like the reference: an error of bf16 size, no larger than the reference's.
    assert 1e-4 < max_err(k_logp, gold[0]) <= 2 * max_err(r_logp, gold[0]) + 1e-3
    assert max_err(k_grad, r_grad) < 5e-2


def test_weight_and_bias_gradients_without_hidden_gradient():
    hidden, weight, bias, targets, upstream, _ = _inputs(6, 8, 100, torch.float32, True, True)
    grads = []
    for fn in (_op(), reference.linear_logprob_entropy):
        w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        logp, ent = fn(hidden, w, targets, b, chunk_rows=4)
        (logp * upstream[0] + ent * upstream[1]).sum().backward()
        grads.append((w.grad, b.grad))
    assert max_err(grads[0][0], grads[1][0]) < 1e-5 and max_err(grads[0][1], grads[1][1]) < 1e-5
