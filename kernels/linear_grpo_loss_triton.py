"""Fused lm_head + GRPO loss: hidden states [N, H] to the clipped GRPO loss, with d(hidden) written in the forward.

Rows are processed ``chunk_rows`` at a time. Per chunk:

1. ``logits = hidden[chunk] @ weight.T + bias``: one GEMM (cuBLAS) into a [chunk, V] buffer in the inputs' dtype;
2. one Triton program per row: a streaming pass over the row (online softmax: max and log-sum-exp, plus the
   entropy only when ``entropy_coef != 0`` or the caller asks for it: a constexpr compiles it out otherwise),
   then logp, the ratio to ``old_logp``, the clipped surrogate, the k3 KL and the row's weight
   ``w = mask / normalizer``, hence d(loss)/d(logp) and d(loss)/d(entropy); a second pass overwrites the row's
   logits in place with d(loss)/d(logits) (the online-softmax helpers of ``logprob_entropy_triton``);
3. ``dhidden[chunk] = dlogits @ weight``: the second GEMM, written straight into the gradient buffer. Only when
   they require grad: ``dweight += dlogits.T @ hidden[chunk]`` and ``dbias += dlogits.sum(0)``.

So a chunk costs two GEMMs (three when lm_head trains) and one [chunk, V] buffer, and nothing of size [N, V]
outlives its chunk. The loss is a scalar, so its gradient is known during the forward up to the upstream factor
(the way Liger's fused linear cross-entropy writes dX in the forward): the forward keeps dhidden (and dweight /
dbias), O(N) fp32 per-token values for the stats, and the backward only multiplies the kept gradients by
grad_output. With a frozen ``weight`` (LoRA never trains lm_head) no weight-gradient buffer is allocated at all.
When nothing requires grad (scoring under ``no_grad``), the gradient pass and the second GEMM are skipped.
Default chunk: Liger's rule (the chunk's logits about as large as ``hidden``, 256 to 4096 rows). On CUDA the row
kernel's BLOCK_V and warps are autotuned (keyed on V, the dtypes, HAS_ENTROPY and COMPUTE_GRAD; the tuner restores
the logits it overwrites, one extra [chunk, V] copy on the first call of a key); under TRITON_INTERPRET=1 one fixed
config runs.

Semantics are ``reference.linear_grpo_loss`` exactly (its docstring), including: masked tokens contribute exactly
0 (their logp may be -inf: a suppressed target under a -inf bias), ``old_logp`` None means on-policy (ratio 1,
gradient -A), ``mask`` values act as weights, torch's tie rules of the clipped min (``grpo_loss_triton``).
Choices: the weight gradient accumulates in fp32 over chunks and is cast once (as in
``linear_logprob_entropy_triton``); under autocast the GEMMs run in the autocast dtype. Only hidden, weight and
bias receive gradients (old_logp, ref_logp, advantages and mask are constants of the GRPO step). The kept
gradients are those of one backward: ``retain_graph`` and a second backward give the same gradient again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .grpo_loss_triton import grpo_terms
from .linear_logprob_entropy_triton import backprop_chunk, cast_grads, chunk_logits, matmul_dtype
from .logprob_entropy_triton import autotuned, check_inputs, launch, row_softmax_grad, row_softmax_stats
from .reference import default_chunk_rows, loss_normalizer


@triton.jit
def _linear_grpo_rows_kernel(
    logits_ptr,
    stride_row,
    targets_ptr,
    old_ptr,
    adv_ptr,
    mask_ptr,
    ref_ptr,
    denom_ptr,
    logp_ptr,
    entropy_ptr,
    terms_ptr,
    stride_terms,
    V,
    inv_temp,
    clip_low,
    clip_high,
    beta,
    entropy_coef,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m, log_s, entropy = row_softmax_stats(row_ptr, V, inv_temp, HAS_ENTROPY, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    logp = (tl.load(row_ptr + target).to(tl.float32) * inv_temp - m) - log_s
    weight = tl.load(mask_ptr + row)
    valid = weight != 0
    # Masked tokens enter the loss terms as logp = old = ref = 0 (ratio 1, KL 0): a -inf logp never meets exp().
    safe_logp = tl.where(valid, logp, 0.0)
    old = safe_logp
    if HAS_OLD:
        old = tl.where(valid, tl.load(old_ptr + row), 0.0)
    ref = safe_logp
    if HAS_KL:
        ref = tl.where(valid, tl.load(ref_ptr + row), 0.0)
    adv = tl.load(adv_ptr + row)
    per_token, dper_token, kl, is_clipped = grpo_terms(safe_logp, old, ref, adv, clip_low, clip_high, beta, HAS_KL)
    if HAS_ENTROPY:
        per_token -= entropy_coef * tl.where(valid, entropy, 0.0)
        tl.store(entropy_ptr + row, entropy)
    tl.store(logp_ptr + row, logp)
    tl.store(terms_ptr + row, per_token * weight)
    tl.store(terms_ptr + stride_terms + row, kl * weight)
    tl.store(terms_ptr + 2 * stride_terms + row, tl.where(is_clipped, weight, 0.0))
    if COMPUTE_GRAD:
        scale = weight / tl.load(denom_ptr)
        g_logp = tl.where(valid, scale * dper_token, 0.0)
        g_ent = -entropy_coef * scale
        row_softmax_grad(row_ptr, row_ptr, target, m, log_s, entropy, g_logp, g_ent, V, inv_temp, HAS_ENTROPY,
                         BLOCK_V)  # fmt: skip


# The kernel overwrites the logits with their gradient: the autotuner restores them between its trials.
_rows_tuned = autotuned(
    _linear_grpo_rows_kernel, restore_value=["logits_ptr"], key=("V", "HAS_ENTROPY", "COMPUTE_GRAD")
)


class _LinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, mask, ref, denom, options):
        temperature, clip_low, clip_high, beta, entropy_coef, has_entropy, chunk_rows, block_v, needs = options
        need_hidden, need_weight, need_bias = needs
        N, V = hidden.shape[0], weight.shape[0]
        f32 = {"dtype": torch.float32, "device": hidden.device}
        logp = torch.empty(N, **f32)
        entropy = torch.empty(N if has_entropy else 0, **f32)
        terms = torch.empty(3, N, **f32)  # per token, times its weight: loss, k3 KL, clipped
        dhidden = torch.empty_like(hidden) if need_hidden else None
        dweight = dbias = None
        if need_weight:  # fp32 accumulation over several chunks, cast once at the end
            dtype = weight.dtype if N <= chunk_rows else torch.float32
            dweight = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
        if need_bias:
            dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        flags = {
            "HAS_OLD": old is not None,
            "HAS_KL": ref is not None,
            "HAS_ENTROPY": has_entropy,
            "COMPUTE_GRAD": need_hidden or need_weight or need_bias,
        }
        for start in range(0, N, chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows]
            logits = chunk_logits(h, weight, bias)
            launch(
                _linear_grpo_rows_kernel, _rows_tuned, logits, block_v, (logits.shape[0],),
                logits, logits.stride(0), targets[rows], adv[rows] if old is None else old[rows], adv[rows],
                mask[rows], adv[rows] if ref is None else ref[rows], denom, logp[rows],
                entropy[rows] if has_entropy else logp[rows], terms[:, rows], terms.stride(0),
                V, 1.0 / temperature, clip_low, clip_high, beta, entropy_coef, **flags,
            )  # fmt: skip
            backprop_chunk(logits, weight, h, None if dhidden is None else dhidden[rows], dweight, dbias)
            del logits
        dweight, dbias = cast_grads(dweight, dbias, weight, bias)
        sums = terms.sum(1) / denom
        loss, mean_kl, clip_fraction = sums.unbind(0)
        ctx.save_for_backward(dhidden, dweight, dbias)
        ctx.mark_non_differentiable(logp, entropy, clip_fraction, mean_kl)
        return loss, logp, entropy, clip_fraction, mean_kl

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def _check(hidden, weight, bias, targets, per_token, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] do not match: {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    for name, tensor in per_token.items():
        if tensor is not None and tensor.shape != hidden.shape[:1]:
            raise ValueError(f"{name} must be [N] = {tuple(hidden.shape[:1])}, got {tuple(tensor.shape)}")
    check_inputs(hidden, targets, temperature)


def _f32(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.to(torch.float32).contiguous()


def triton_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    entropy_coef: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_rows: int | None = None,
    return_entropy: bool = False,
    block_v: int | None = None,
):
    """GRPO loss of N flat tokens from hidden states, fused (Triton); the semantics of ``reference.linear_grpo_loss``.

    Args:
        hidden: [N, H] bf16/fp16/fp32, CUDA (or CPU under TRITON_INTERPRET=1).
        weight: [V, H] lm_head weight, same dtype; gets a gradient only if it requires grad.
        targets: [N] integer token ids in [0, V).
        old_logp: [N] log-probs of the sampling policy, or None (on-policy: ratio 1).
        advantages: [N] per-token advantages (a rollout's advantage repeated over its tokens).
        mask: [N] bool/int/float; float values weight the tokens (see ``reference.token_weights``).
        ref_logp: [N] reference log-probs for the k3 KL, or None; used only when ``beta != 0``.
        bias: [V] or None; -inf entries (suppressed tokens) are allowed.
        temperature, eps_low, eps_high, beta, entropy_coef: as in the reference.
        normalizer: denominator of the loss (a number > 0 or a scalar tensor); None: sum(mask), at least 1.
        chunk_rows: rows turned into logits at once (extra memory ~ chunk_rows x V); None picks one.
        return_entropy: compute the entropy (and return it in the stats) even when ``entropy_coef`` is 0.
        block_v: vocabulary block (power of two); None: autotuned on CUDA, a fixed block under the interpreter.

    Returns:
        (loss, stats): loss an fp32 scalar; stats ``logp`` [N], ``entropy`` [N] when computed, ``clip_fraction``
        and ``mean_kl`` (fp32, no grad).
    """
    _check(hidden, weight, bias, targets, {"old_logp": old_logp, "advantages": advantages, "mask": mask,
                                           "ref_logp": ref_logp}, temperature)  # fmt: skip
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    hidden, weight, bias = matmul_dtype(hidden, weight, bias)
    weights = _f32(mask)
    denom = loss_normalizer(weights, normalizer).contiguous()
    has_entropy = entropy_coef != 0.0 or return_entropy
    N = hidden.shape[0]
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(max(N, 1), hidden.shape[1], weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (hidden, weight, bias))
    options = (float(temperature), 1.0 - float(eps_low), 1.0 + float(eps_high), float(beta), float(entropy_coef),
               has_entropy, int(chunk_rows), block_v, needs)  # fmt: skip
    ref = _f32(ref_logp) if beta != 0.0 and ref_logp is not None else None
    # The Function's GEMMs run in the dtype chosen above (autocast's, if on), not re-cast by autocast inside.
    with torch.autocast(hidden.device.type, enabled=False):
        loss, logp, entropy, clip_fraction, mean_kl = _LinearGRPOLoss.apply(
            hidden, weight, bias, targets.contiguous(), _f32(old_logp), _f32(advantages), weights, ref, denom, options
        )
    stats = {"logp": logp, "clip_fraction": clip_fraction, "mean_kl": mean_kl}
    if has_entropy:
        stats["entropy"] = entropy
    return loss, stats
