"""Frequency + entropy rewards and group-normalised advantages for G groups of N answers, one Triton launch.

One program per group. Answer counts come from pairwise comparisons of the group's ids (O(N^2) compares in blocks
of columns, cheap for the N <= a few hundred rollouts a group has), then, exactly as ``reference.group_rewards``:
p(a_i) = count_i / N (0 for invalid ids, which still count in N), H(p) = -sum_valid log p(a_i) / N,
K = round(sum_valid 1 / count_i) distinct valid answers, r_ent = -H / log K (0 when K <= 1),
r_i = p(a_i) + alpha * r_ent, A_i = (r_i - mean) / (population std + eps), and A = 0 for a group whose rewards are all
equal. No deviation from the reference; the rounding of the sums differs, so values agree to ~1e-6, not bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import triton_usable
from .reference import ADVANTAGE_EPS

MAX_BLOCK_J = 64
"""Columns compared at once: the [BLOCK_N, BLOCK_J] comparison tile stays small in registers."""


@triton.jit
def _group_rewards_kernel(
    ids_ptr,
    rewards_ptr,
    adv_ptr,
    entropy_ptr,
    N,
    n_float,
    stride_ids,
    stride_out,
    invalid_id,
    alpha,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    row_ids = ids_ptr + group * stride_ids
    offs = tl.arange(0, BLOCK_N)
    inside = offs < N
    ids = tl.load(row_ids + offs, mask=inside, other=invalid_id)
    valid = (ids != invalid_id) & inside
    count = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, N, BLOCK_J):
        cols = start + tl.arange(0, BLOCK_J)
        ids_j = tl.load(row_ids + cols, mask=cols < N, other=invalid_id)
        valid_j = (ids_j != invalid_id) & (cols < N)
        same = (ids[:, None] == ids_j[None, :]) & valid_j[None, :]
        count += tl.sum(same.to(tl.float32), axis=1)
    count = tl.where(valid, count, 0.0)
    n = n_float
    freq = count / n
    log_freq = tl.log(tl.where(valid, freq, 1.0))
    entropy = -tl.sum(tl.where(valid, log_freq, 0.0), axis=0) / n
    k = tl.sum(tl.where(valid, 1.0 / tl.where(valid, count, 1.0), 0.0), axis=0)
    k = tl.floor(k + 0.5)
    r_ent = tl.where(k > 1.0, -entropy / tl.log(tl.maximum(k, 2.0)), 0.0)
    rewards = freq + alpha * r_ent
    mean = tl.sum(tl.where(inside, rewards, 0.0), axis=0) / n
    centered = tl.where(inside, rewards - mean, 0.0)
    std = tl.sqrt(tl.sum(centered * centered, axis=0) / n)
    r_max = tl.max(tl.where(inside, rewards, float("-inf")), axis=0)
    r_min = tl.min(tl.where(inside, rewards, float("inf")), axis=0)
    adv = tl.where(r_max == r_min, 0.0, centered / (std + eps))
    out = group * stride_out + offs
    tl.store(rewards_ptr + out, rewards, mask=inside)
    tl.store(adv_ptr + out, adv, mask=inside)
    tl.store(entropy_ptr + group, entropy)


def triton_group_rewards(answer_ids: torch.Tensor, alpha: float = 0.75, invalid_id: int = -1):
    """Frequency + entropy rewards (docs/method.md §3) and advantages for G groups of N answers (Triton).

    Args:
        answer_ids: [G, N] integer answer ids (same id = same answer); ``invalid_id`` marks unparseable rollouts.
        alpha: weight of the entropy reward -H(p) / log K.
        invalid_id: id of the invalid answer.

    Returns:
        (rewards [G, N], advantages [G, N], answer_entropy [G]), fp32; the entropy is H(p) in nats.
    """
    if answer_ids.dim() != 2:
        raise ValueError(f"answer_ids must be [G, N], got shape {tuple(answer_ids.shape)}")
    if answer_ids.dtype.is_floating_point or answer_ids.dtype == torch.bool:
        raise ValueError(f"answer_ids must be an integer tensor, got {answer_ids.dtype}")
    if not triton_usable(answer_ids):
        raise ValueError("the Triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    ids = answer_ids.to(torch.int64).contiguous()
    G, N = ids.shape
    rewards = torch.empty(G, N, dtype=torch.float32, device=ids.device)
    advantages = torch.empty_like(rewards)
    entropy = torch.empty(G, dtype=torch.float32, device=ids.device)
    if G == 0:
        return rewards, advantages, entropy
    if N == 0:
        return rewards, advantages, entropy.zero_()
    block_n = triton.next_power_of_2(N)
    _group_rewards_kernel[(G,)](
        ids, rewards, advantages, entropy, N, float(N), ids.stride(0), rewards.stride(0), int(invalid_id), float(alpha),
        ADVANTAGE_EPS, BLOCK_N=block_n, BLOCK_J=min(block_n, MAX_BLOCK_J),
    )  # fmt: skip
    return rewards, advantages, entropy
