"""Clipped GRPO surrogate with optional k3 KL (docs/method.md §5), one Triton kernel forward and one backward.

Forward: one program per sequence streams its T tokens once and writes four fp32 partial sums: sum of
per_token * mask, sum of mask, sum of clipped * mask and sum of kl * mask. The [B]-sized epilogue (token-mean or
sequence-mean, clip fraction, mean KL, and the per-sequence weight each token's gradient gets) is a handful of
torch ops on B numbers. Backward: one elementwise kernel recomputes the ratio and writes
``d loss / d logp = g * weight[b] * mask * (-A * ratio * [unclipped term is the min] + beta * (1 - exp(ref - logp)))``.

Semantics are those of ``reference.grpo_loss`` exactly, including torch's tie rules (inside the clip range both
terms of the min are equal and the gradient is -A * ratio; outside it the clipped term has zero gradient),
fractional masks acting as weights, and "beta != 0 but ref_logp is None" meaning no KL term. Deviation: only
``logp`` receives a gradient; ``old_logp``, ``ref_logp`` and ``advantages`` are constants of the GRPO step (the
reference would differentiate through them if they required grad).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import triton_usable

AGGREGATIONS = ("token-mean", "sequence-mean")


@triton.jit
def grpo_terms(logp, old_logp, ref_logp, adv, clip_low, clip_high, beta, HAS_KL: tl.constexpr):
    """Per-token loss, its derivative w.r.t. logp, k3 KL and the clipped indicator (all fp32)."""
    ratio = tl.exp(logp - old_logp)
    adv = tl.zeros_like(ratio) + adv  # broadcast the sequence's advantage (scalar & block fails in the interpreter)
    clipped = tl.minimum(tl.maximum(ratio, clip_low), clip_high)
    unclipped_obj = ratio * adv
    clipped_obj = clipped * adv
    per_token = -tl.minimum(unclipped_obj, clipped_obj)
    dper_token = tl.where(unclipped_obj <= clipped_obj, -adv * ratio, 0.0)
    kl = tl.zeros_like(ratio)
    if HAS_KL:
        delta = ref_logp - logp
        exp_delta = tl.exp(delta)
        kl = exp_delta - delta - 1.0
        per_token += beta * kl
        dper_token += beta * (1.0 - exp_delta)
    is_clipped = ((ratio < clip_low) & (adv < 0)) | ((ratio > clip_high) & (adv > 0))
    return per_token, dper_token, kl, is_clipped


@triton.jit
def _grpo_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    partials_ptr,
    T,
    stride_logp,
    stride_old,
    stride_ref,
    stride_mask,
    clip_low,
    clip_high,
    beta,
    HAS_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    loss_sum = tl.zeros([], tl.float32)
    mask_sum = tl.zeros([], tl.float32)
    clip_sum = tl.zeros([], tl.float32)
    kl_sum = tl.zeros([], tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = cols < T
        logp = tl.load(logp_ptr + row * stride_logp + cols, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + row * stride_old + cols, mask=inside, other=0.0).to(tl.float32)
        ref = logp
        if HAS_KL:
            ref = tl.load(ref_ptr + row * stride_ref + cols, mask=inside, other=0.0).to(tl.float32)
        mask = tl.load(mask_ptr + row * stride_mask + cols, mask=inside, other=0).to(tl.float32)
        per_token, _, kl, is_clipped = grpo_terms(logp, old, ref, adv, clip_low, clip_high, beta, HAS_KL)
        # per_token * mask (not a where on mask) so that NaN/inf at masked positions propagate as in the reference.
        loss_sum += tl.sum(tl.where(inside, per_token * mask, 0.0), axis=0)
        mask_sum += tl.sum(mask, axis=0)
        clip_sum += tl.sum(tl.where(is_clipped, mask, 0.0), axis=0)
        kl_sum += tl.sum(tl.where(inside, kl * mask, 0.0), axis=0)
    out = partials_ptr + row * 4
    tl.store(out, loss_sum)
    tl.store(out + 1, mask_sum)
    tl.store(out + 2, clip_sum)
    tl.store(out + 3, kl_sum)


@triton.jit
def _grpo_bwd_kernel(
    grad_loss_ptr,
    token_weight_ptr,
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    dlogp_ptr,
    T,
    stride_logp,
    stride_old,
    stride_ref,
    stride_mask,
    stride_dlogp,
    clip_low,
    clip_high,
    beta,
    HAS_KL: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < T
    scale = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(token_weight_ptr + row)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    logp = tl.load(logp_ptr + row * stride_logp + cols, mask=inside, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + row * stride_old + cols, mask=inside, other=0.0).to(tl.float32)
    ref = logp
    if HAS_KL:
        ref = tl.load(ref_ptr + row * stride_ref + cols, mask=inside, other=0.0).to(tl.float32)
    mask = tl.load(mask_ptr + row * stride_mask + cols, mask=inside, other=0).to(tl.float32)
    _, dper_token, _, _ = grpo_terms(logp, old, ref, adv, clip_low, clip_high, beta, HAS_KL)
    dlogp = scale * mask * dper_token
    tl.store(dlogp_ptr + row * stride_dlogp + cols, dlogp.to(dlogp_ptr.dtype.element_ty), mask=inside)


def _block_t(T: int, device: torch.device, block_t: int | None) -> int:
    if block_t is not None:
        if block_t < 16 or block_t & (block_t - 1):
            raise ValueError(f"block_t must be a power of two >= 16, got {block_t}")
        return block_t
    cap = 1024 if device.type == "cuda" else 4096
    return min(cap, triton.next_power_of_2(max(T, 16)))


def _epilogue(partials: torch.Tensor, aggregation: str):
    """Loss, stats and the per-sequence weight d(loss)/d(per_token * mask) from the [B, 4] partial sums."""
    loss_sum, lengths, clip_sum, kl_sum = partials.unbind(-1)
    n_tokens = lengths.sum().clamp_min(1.0)
    if aggregation == "token-mean":
        loss = loss_sum.sum() / n_tokens
        weight = (1.0 / n_tokens).expand_as(lengths)
    else:
        has_tokens = (lengths > 0).float()
        n_seqs = has_tokens.sum().clamp_min(1.0)
        per_seq = loss_sum / lengths.clamp_min(1.0)
        loss = (per_seq * has_tokens).sum() / n_seqs
        weight = has_tokens / (lengths.clamp_min(1.0) * n_seqs)
    stats = {"clip_fraction": clip_sum.sum() / n_tokens, "mean_kl": kl_sum.sum() / n_tokens}
    return loss, stats, weight.contiguous()


def _as_loadable_mask(mask: torch.Tensor) -> torch.Tensor:
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _GRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, beta, aggregation, block):
        B, T = logp.shape
        has_kl = ref_logp is not None
        ref = ref_logp if has_kl else logp
        partials = torch.empty(B, 4, dtype=torch.float32, device=logp.device)
        if B > 0:
            _grpo_fwd_kernel[(B,)](
                logp, old_logp, ref, advantages, mask, partials, T,
                logp.stride(0), old_logp.stride(0), ref.stride(0), mask.stride(0),
                clip_low, clip_high, beta, HAS_KL=has_kl, BLOCK_T=block,
            )  # fmt: skip
        loss, stats, weight = _epilogue(partials, aggregation)
        ctx.save_for_backward(logp, old_logp, ref, advantages, mask, weight)
        ctx.params = (clip_low, clip_high, beta, has_kl, block)
        ctx.mark_non_differentiable(stats["clip_fraction"], stats["mean_kl"])
        return loss, stats["clip_fraction"], stats["mean_kl"]

    @staticmethod
    def backward(ctx, grad_loss, _grad_clip, _grad_kl):
        logp, old_logp, ref, advantages, mask, weight = ctx.saved_tensors
        clip_low, clip_high, beta, has_kl, block = ctx.params
        B, T = logp.shape
        dlogp = torch.empty_like(logp, memory_format=torch.contiguous_format)
        if B > 0 and T > 0:
            _grpo_bwd_kernel[(B, triton.cdiv(T, block))](
                grad_loss.float().contiguous(), weight, logp, old_logp, ref, advantages, mask, dlogp, T,
                logp.stride(0), old_logp.stride(0), ref.stride(0), mask.stride(0), dlogp.stride(0),
                clip_low, clip_high, beta, HAS_KL=has_kl, BLOCK_T=block,
            )  # fmt: skip
        return dlogp, None, None, None, None, None, None, None, None, None


def _check(logp, old_logp, advantages, mask, ref_logp, aggregation):
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be 'token-mean' or 'sequence-mean', got {aggregation!r}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, tensor in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(tensor.shape)}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [B] = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    if not triton_usable(logp):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregation: str = "token-mean",
    block_t: int | None = None,
):
    """Clipped GRPO loss (Triton): ``-min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3``.

    Args:
        logp: [B, T] log-probs under the current policy (bf16/fp16/fp32), the only input that gets a gradient.
        old_logp: [B, T] log-probs of the sampling policy.
        advantages: [B] one advantage per sequence.
        mask: [B, T] bool/int/float completion mask (float values weight the tokens, as in the reference).
        eps_low, eps_high: clip range of the ratio.
        ref_logp: [B, T] reference-policy log-probs for the k3 KL, or None (no KL term).
        beta: KL weight; 0 disables the KL term.
        aggregation: "token-mean" (all unmasked tokens of the batch) or "sequence-mean".
        block_t: tokens per block of the kernels (power of two); None picks one for the device.

    Returns:
        (loss, stats): loss is an fp32 scalar; stats has fp32 scalars "clip_fraction" and "mean_kl" (no grad).
    """
    _check(logp, old_logp, advantages, mask, ref_logp, aggregation)
    use_kl = beta != 0.0 and ref_logp is not None
    loss, clip_fraction, mean_kl = _GRPOLoss.apply(
        _unit_stride(logp),
        _unit_stride(old_logp),
        advantages.contiguous(),
        _as_loadable_mask(mask),
        _unit_stride(ref_logp) if use_kl else None,
        1.0 - float(eps_low),  # the clip bounds rounded once to fp32, as the reference's clamp does
        1.0 + float(eps_high),
        float(beta),
        aggregation,
        _block_t(logp.shape[1], logp.device, block_t),
    )
    return loss, {"clip_fraction": clip_fraction, "mean_kl": mean_kl}
