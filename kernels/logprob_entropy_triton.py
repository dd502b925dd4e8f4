"""Fused log-prob + entropy of softmax(logits / T) in one streaming pass over the vocabulary (Triton).

Forward: one program per row reads the row once, block by block, and keeps three fp32 scalars: the running max m,
the running sum s = sum exp(z - m) and t = sum exp(z - m) * (z - m), with z = logits / T. When m grows both sums
are rescaled (t also shifts by (m_old - m_new) * s). At the end entropy = log s - t / s and
logp = (z[target] - m) - log s. Keeping t relative to the running max (instead of sum p * z) avoids cancelling two
numbers of size |z| when the logits are large (+-1e4). -inf logits (masked vocabulary) contribute 0 to every sum.

Backward: recomputes p from the logits and the saved (m, log s) (O(N) floats are saved, never an [N, V] softmax)
and writes, per element, dz_j = g_logp * (1[j = target] - p_j) - g_ent * p_j * (log p_j + H), divided by T. The
gradient may be written in place over the logits (``backward_into``), which the fused lm_head op uses.

Both row passes are ``@triton.jit`` helpers (``row_softmax_stats``, ``row_softmax_grad``) that the fused GRPO op's
kernel calls too; their constexpr ``HAS_ENTROPY`` compiles the entropy arithmetic out where nothing needs it. On
CUDA the vocabulary block and warps are autotuned (``AUTOTUNE_BLOCKS``) unless ``block_v`` is given; under
TRITON_INTERPRET=1 one fixed config runs.

Deviations from the reference: none in semantics. Targets must lie in [0, V) (not checked on the GPU, which would
cost a host sync); a row whose logits are all -inf gives NaN in both backends.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dispatch import triton_usable

INTERPRET_BLOCK_V = 16384
"""Largest vocabulary block under TRITON_INTERPRET=1: the interpreter is vectorised by numpy, so big is fast."""

CUDA_BLOCK_V = 4096
CUDA_NUM_WARPS = 8

AUTOTUNE_BLOCKS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))
"""(BLOCK_V, num_warps) tried on CUDA when no block is given. Triton's autotuner keys the choice on V and on the
dtypes of the tensor arguments; blocks wider than the vocabulary are pruned. Under TRITON_INTERPRET=1 the fixed
config above runs instead (tuning there would time the numpy interpreter, slowly)."""


def autotune_configs() -> list:
    return [triton.Config({"BLOCK_V": block}, num_warps=warps) for block, warps in AUTOTUNE_BLOCKS]


def prune_blocks(configs, named_args, **kwargs):
    """Drop blocks wider than the vocabulary needs (keeping at least the narrowest config)."""
    vocab = named_args.get("V", kwargs.get("V"))
    fits = [c for c in configs if c.kwargs["BLOCK_V"] <= max(1024, triton.next_power_of_2(int(vocab)))]
    return fits or configs[:1]


def autotuned(kernel, restore_value=None, key=("V",)):
    """``kernel`` under the autotuner with the configs above (``restore_value``: arguments it writes in place;
    ``key``: the arguments whose values select a config, besides the tensors' dtypes)."""
    return triton.autotune(
        configs=autotune_configs(),
        key=list(key),
        prune_configs_by={"early_config_prune": prune_blocks},
        restore_value=restore_value,
    )(kernel)


def launch(kernel, tuned, like: torch.Tensor, block_v: int | None, grid, *args, **constexprs) -> None:
    """Launch ``tuned`` (autotuned) on CUDA when no block is given, else ``kernel`` with the fixed config."""
    if like.is_cuda and block_v is None and os.environ.get("TRITON_INTERPRET") != "1":
        tuned[grid](*args, **constexprs)
        return
    block, warps = _launch_config(like, block_v)
    kernel[grid](*args, **constexprs, BLOCK_V=block, num_warps=warps)


@triton.jit
def row_softmax_stats(row_ptr, V, inv_temp, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One streaming pass over a row of logits: (m, log s, entropy) of softmax(z), z = logits * inv_temp.

    m is the row max and s = sum exp(z - m); the entropy is 0 (and its arithmetic compiled out) unless HAS_ENTROPY.
    """
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is -inf, measure from 0 so no -inf - -inf appears.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        if HAS_ENTROPY:
            t = alpha * (t + tl.where(s > 0, m - m_ref, 0.0) * s)
        s = alpha * s
        d = z - m_ref
        e = tl.exp(d)
        if HAS_ENTROPY:
            t += tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
        s += tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    entropy = tl.zeros([], tl.float32)
    if HAS_ENTROPY:
        entropy = log_s - t / s
    return m, log_s, entropy


@triton.jit
def row_softmax_grad(
    row_ptr, drow_ptr, target, m, log_s, entropy, g_logp, g_ent, V, inv_temp,
    HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Write d(g_logp * logp[target] + g_ent * entropy)/d(logits) of one row to ``drow_ptr`` (may be ``row_ptr``:
    each element is read before it is written); the entropy term only when HAS_ENTROPY."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32) * inv_temp
        log_p = (z - m) - log_s
        p = tl.exp(log_p)
        dz = -g_logp * p
        if HAS_ENTROPY:
            dz -= g_ent * p * tl.where(p > 0, log_p + entropy, 0.0)
        dz = tl.where(cols == target, dz + g_logp, dz)
        tl.store(drow_ptr + cols, (dz * inv_temp).to(drow_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    stats_ptr,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, log_s, entropy = row_softmax_stats(row_ptr, V, inv_temp, True, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_target = tl.load(row_ptr + target).to(tl.float32) * inv_temp
    # (z - m) - log s rather than z - (m + log s): exact for the largest logits even at |z| ~ 1e4.
    tl.store(logp_ptr + row, (z_target - m) - log_s)
    tl.store(entropy_ptr + row, entropy)
    tl.store(stats_ptr + 2 * row, m)
    tl.store(stats_ptr + 2 * row + 1, log_s)


@triton.jit
def _logprob_entropy_bwd_kernel(
    logits_ptr,
    stride_row,
    dlogits_ptr,
    stride_drow,
    targets_ptr,
    stats_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    entropy = tl.load(entropy_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row)
    g_ent = tl.load(grad_entropy_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64)
    row_softmax_grad(
        logits_ptr + row * stride_row, dlogits_ptr + row * stride_drow, target, m, log_s, entropy, g_logp, g_ent,
        V, inv_temp, True, BLOCK_V,
    )  # fmt: skip


_fwd_tuned = autotuned(_logprob_entropy_fwd_kernel)
_bwd_tuned = autotuned(_logprob_entropy_bwd_kernel, restore_value=["dlogits_ptr"])  # dlogits may be the logits


def _launch_config(logits: torch.Tensor, block_v: int | None):
    V = logits.shape[-1]
    if block_v is None:
        block_v = CUDA_BLOCK_V if logits.is_cuda else INTERPRET_BLOCK_V
        block_v = min(block_v, triton.next_power_of_2(max(V, 16)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    num_warps = CUDA_NUM_WARPS if logits.is_cuda else 1
    return block_v, num_warps


def check_inputs(rows: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """ValueErrors for the checks shared by both fused ops; ``rows`` is the 2-D logits (or hidden) tensor."""
    if rows.dim() != 2:
        raise ValueError(f"expected a 2-D [N, V] (or [N, H]) tensor, got shape {tuple(rows.shape)}")
    if targets.shape != rows.shape[:1]:
        raise ValueError(f"targets must be [N] = {tuple(rows.shape[:1])}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.device != rows.device:
        raise ValueError(f"targets are on {targets.device} but the inputs on {rows.device}")
    if not triton_usable(rows):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def forward_into(logits, targets, temperature, logp, entropy, stats, block_v=None) -> None:
    """Forward kernel on 2-D ``logits`` (unit column stride): fp32 [N] ``logp``, ``entropy``, [N, 2] ``stats``.

    ``stats`` receives (max, log sum exp(z - max)) per row, all the backward needs besides the logits.
    """
    N, V = logits.shape
    if N == 0:
        return
    launch(
        _logprob_entropy_fwd_kernel, _fwd_tuned, logits, block_v, (N,),
        logits, logits.stride(0), targets, logp, entropy, stats, V, 1.0 / temperature,
    )  # fmt: skip


def backward_into(logits, targets, temperature, stats, entropy, grad_logp, grad_entropy, dlogits, block_v=None):
    """Write d(loss)/d(logits) into ``dlogits`` (may be ``logits`` itself: each element is read before written)."""
    N, V = logits.shape
    if N == 0:
        return
    launch(
        _logprob_entropy_bwd_kernel, _bwd_tuned, logits, block_v, (N,),
        logits, logits.stride(0), dlogits, dlogits.stride(0), targets, stats, entropy, grad_logp, grad_entropy,
        V, 1.0 / temperature,
    )  # fmt: skip


def grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Upstream gradient as a contiguous fp32 tensor (zeros when that output was unused)."""
    if grad is None:
        return torch.zeros_like(like)
    return grad.float().contiguous()


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, block_v):
        logits = _unit_stride(logits)
        targets = targets.contiguous()
        N = logits.shape[0]
        logp = torch.empty(N, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        stats = torch.empty(N, 2, dtype=torch.float32, device=logits.device)
        forward_into(logits, targets, temperature, logp, entropy, stats, block_v)
        ctx.save_for_backward(logits, targets, stats, entropy)
        ctx.temperature, ctx.block_v = temperature, block_v
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, stats, entropy = ctx.saved_tensors
        dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
        backward_into(
            logits,
            targets,
            ctx.temperature,
            stats,
            entropy,
            grad_or_zeros(grad_logp, entropy),
            grad_or_zeros(grad_entropy, entropy),
            dlogits,
            ctx.block_v,
        )
        return dlogits, None, None, None


def triton_logprob_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, block_v: int | None = None
):
    """Log-prob of ``targets`` and entropy of softmax(logits / temperature), per row, fused (Triton).

    Args:
        logits: [N, V] (or [..., V]) bf16/fp16/fp32, CUDA (or CPU under TRITON_INTERPRET=1); -inf entries allowed.
        targets: [N] (or [...]) integer ids in [0, V).
        temperature: > 0; logits are divided by it before the softmax.
        block_v: vocabulary block of the kernel (power of two); None picks one for the device.

    Returns:
        (logp, entropy), fp32 of shape [N] (or [...]); differentiable w.r.t. ``logits``.
    """
    lead = logits.shape[:-1]
    if logits.dim() < 2 or targets.shape != lead:
        shapes = f"{tuple(lead)} for logits {tuple(logits.shape)}, got {tuple(targets.shape)}"
        raise ValueError(f"targets must have shape {shapes}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    check_inputs(flat, flat_targets, temperature)
    logp, entropy = _LogprobEntropy.apply(flat, flat_targets, float(temperature), block_v)
    return logp.reshape(lead), entropy.reshape(lead)
