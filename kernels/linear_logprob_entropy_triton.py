"""Fused lm_head + log-prob + entropy: ``logprob_entropy(hidden @ weight.T + bias)`` without [N, V] logits.

Rows are processed ``chunk_rows`` at a time. Forward, per chunk: cuBLAS matmul to a [chunk, V] logits buffer, then
the streaming Triton kernel of ``logprob_entropy`` writes logp, entropy and each row's (max, log-sum-exp), O(N)
floats kept for backward.
Backward, per chunk: recompute the chunk's logits, the Triton backward kernel overwrites them in place with
d(loss)/d(logits), then ``dhidden[chunk] = dlogits @ weight`` (written straight into the output), and only when
they require grad ``dweight += dlogits.T @ hidden[chunk]`` and ``dbias += dlogits.sum(0)``. Extra memory is one
[chunk, V] buffer (plus the weight gradient when asked for), never O(N x V).

Deviations and choices:
- Chunking is over rows only: one [chunk, V] buffer already meets the O(chunk x V) bound, and splitting the
  vocabulary too would need the online softmax state carried across launches for no memory gain that matters.
- When ``weight`` does not require grad (LoRA never trains lm_head) no weight-gradient buffer is allocated at all;
  this is where it beats Liger's fused linear losses, which always materialise one.
- With several chunks and a bf16/fp16 weight that requires grad, the weight gradient is accumulated in an fp32
  buffer and cast once at the end (Liger accumulates in the weight's dtype); it costs V x H x 4 bytes while the
  backward runs, and only when lm_head is trained.
- The logits are computed in the inputs' dtype (as ``hidden @ weight.T`` does in the reference), then read in fp32.
  Under autocast, hidden/weight/bias are cast to the autocast dtype first (as ``nn.Linear`` would be), and the
  Function runs with autocast off so that the backward's recompute uses the same dtype as the forward.
"""

from __future__ import annotations

import torch

from .logprob_entropy_triton import backward_into, check_inputs, forward_into, grad_or_zeros
from .reference import default_chunk_rows


def chunk_logits(hidden_chunk, weight, bias):
    if bias is None:
        return hidden_chunk @ weight.t()
    return torch.addmm(bias, hidden_chunk, weight.t())


def backprop_chunk(dlogits, weight, h, dhidden_rows, dweight, dbias) -> None:
    """One chunk's logit gradients ``dlogits`` [rows, V] into the linear layer: d(hidden) rows written, d(weight) and
    d(bias) accumulated (each only when its buffer exists: a frozen lm_head has none)."""
    if dhidden_rows is not None:
        torch.mm(dlogits, weight, out=dhidden_rows)
    if dweight is not None:
        if dweight.dtype == dlogits.dtype:
            dweight.addmm_(dlogits.t(), h)
        else:
            dweight.add_(dlogits.t() @ h)
    if dbias is not None:
        dbias += dlogits.sum(0, dtype=torch.float32)


def cast_grads(dweight, dbias, weight, bias):
    """The accumulated (fp32) weight and bias gradients cast to their parameters' dtypes."""
    return (
        None if dweight is None else dweight.to(weight.dtype),
        None if dbias is None else dbias.to(bias.dtype),
    )


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_rows, block_v):
        N = hidden.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logp)
        stats = torch.empty(N, 2, dtype=torch.float32, device=hidden.device)
        for start in range(0, N, chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = chunk_logits(hidden[rows], weight, bias)
            forward_into(logits, targets[rows], temperature, logp[rows], entropy[rows], stats[rows], block_v)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets, stats, entropy)
        ctx.temperature, ctx.chunk_rows, ctx.block_v = temperature, chunk_rows, block_v
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, stats, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_logp = grad_or_zeros(grad_logp, entropy)
        grad_entropy = grad_or_zeros(grad_entropy, entropy)
        N, chunk = hidden.shape[0], ctx.chunk_rows
        n_chunks = -(-N // chunk)
        dhidden = torch.empty_like(hidden) if need_hidden else None
        dweight = None
        if need_weight:
            acc_dtype = weight.dtype if n_chunks == 1 else torch.float32
            dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, N, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            logits = chunk_logits(h, weight, bias)
            backward_into(
                logits,
                targets[rows],
                ctx.temperature,
                stats[rows],
                entropy[rows],
                grad_logp[rows],
                grad_entropy[rows],
                logits,
                ctx.block_v,
            )
            backprop_chunk(logits, weight, h, None if dhidden is None else dhidden[rows], dweight, dbias)
            del logits
        dweight, dbias = cast_grads(dweight, dbias, weight, bias)
        return dhidden, dweight, dbias, None, None, None, None


def triton_linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    block_v: int | None = None,
):
    """Per-row log-prob of ``targets`` and entropy under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: [N, H] (or [..., H]) bf16/fp16/fp32, CUDA (or CPU under TRITON_INTERPRET=1).
        weight: [V, H], same dtype as ``hidden`` (tied or untied lm_head).
        targets: [N] (or [...]) integer ids in [0, V).
        bias: [V] or None.
        temperature: > 0.
        chunk_rows: rows turned into logits at once (extra memory ~ chunk_rows x V); None picks one.
        block_v: vocabulary block of the Triton kernels; None picks one for the device.

    Returns:
        (logp, entropy), fp32 of shape [N] (or [...]). Gradients flow to ``hidden`` and, only if they require
        grad, to ``weight`` and ``bias``.
    """
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        shapes = f"{tuple(hidden.shape)} and {tuple(weight.shape)}"
        raise ValueError(f"hidden [..., H] and weight [V, H] do not match: {shapes}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    lead = hidden.shape[:-1]
    if targets.shape != lead:
        raise ValueError(f"targets must have shape {tuple(lead)}, got {tuple(targets.shape)}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).contiguous()
    V = weight.shape[0]
    check_inputs(flat, flat_targets, temperature)
    flat, weight, bias = matmul_dtype(flat, weight, bias)
    if flat.shape[0] == 0:
        empty = flat.new_zeros(0, dtype=torch.float32)
        return empty.reshape(lead), empty.clone().reshape(lead)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(flat.shape[0], flat.shape[1], V)
    # The Function's matmuls run in the dtype chosen above, in forward and in the backward recompute alike.
    with torch.autocast(flat.device.type, enabled=False):
        logp, entropy = _LinearLogprobEntropy.apply(
            flat, weight, bias, flat_targets, float(temperature), int(chunk_rows), block_v
        )
    return logp.reshape(lead), entropy.reshape(lead)


def matmul_dtype(hidden, weight, bias):
    """Inputs in one dtype: autocast's when it is enabled (as nn.Linear would), else they must already agree."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype, got {hidden.dtype} and {weight.dtype}")
    return hidden, weight, bias
