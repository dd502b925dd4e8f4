"""Rewards and advantages for groups of rollouts: a thin layer over ``ttrv_edge.kernels``.

Maps the extracted answers of each input's rollouts to integer ids and calls the fused ``group_rewards`` op
(frequency + entropy, docs/method.md §3) or computes TTRL's majority reward. Two deviations from the paper are options,
not defaults, and are documented in the config:

- ``entropy_signal="self-certainty"`` replaces the paper's answer entropy, which is the same for every rollout of
  an input and therefore cancels under per-group normalisation, with minus the rollout's own mean token entropy;
- ``baseline="batch"`` normalises advantages over all rollouts of a batch of inputs, the only setting in which
  the paper's entropy term changes the update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels.reference import answer_frequencies, group_advantages, majority_rewards

INVALID_ID = -1


@dataclass
class GroupRewards:
    """Rewards of G inputs x N rollouts, their advantages and each input's answer entropy H(p) (nats)."""

    rewards: torch.Tensor  # [G, N]
    advantages: torch.Tensor  # [G, N]
    answer_entropy: torch.Tensor  # [G]

    @property
    def has_signal(self) -> torch.Tensor:
        """[G] bool: the group's rewards differ, so its advantages carry a learning signal."""
        return self.rewards.std(-1, unbiased=False) > 0


def answer_ids(groups: list[list[str | None]], device: torch.device | str | None = None) -> torch.Tensor:
    """[G, N] int ids on ``device``: equal answers share an id within a group, None becomes INVALID_ID."""
    if not groups or len({len(g) for g in groups}) != 1:
        raise ValueError("every group must have the same, non-zero number of rollouts")
    rows = []
    for answers in groups:
        ids: dict[str, int] = {}
        rows.append([INVALID_ID if a is None else ids.setdefault(a, len(ids)) for a in answers])
    return torch.tensor(rows, dtype=torch.long, device=device)


def gate_passes(ids: torch.Tensor, share: float, margin: float) -> torch.Tensor:
    """[G] bool: the group's majority answer holds at least ``share`` of its N rollouts and leads the runner-up
    answer by at least ``margin`` (shares of N; unreadable rollouts count in N but never as an answer).

    The gated reward (SCRL-style) gives the majority TTRL's 1/0 pseudo-label only when it passes; a group that does
    not pass gets equal rewards, hence zero advantages, and is left out of the update: a weak model is not taught a
    consensus it does not have. Deviation from SCRL: no negative reward for rare, confidently generated answers.
    """
    freq, valid = answer_frequencies(ids, INVALID_ID)
    top = torch.where(valid, freq, torch.zeros_like(freq)).amax(-1)
    majority = majority_rewards(ids, INVALID_ID).bool()
    runner_up = torch.where(valid & ~majority, freq, torch.zeros_like(freq)).amax(-1)
    return (top >= share - 1e-9) & (top - runner_up >= margin - 1e-9) & (top > 0)


def compute_rewards(
    groups: list[list[str | None]],
    *,
    reward: str = "ttrv",
    alpha: float = 0.75,
    entropy_signal: str = "answer",
    token_entropy: torch.Tensor | None = None,
    baseline: str = "group",
    gate_share: float = 0.5,
    gate_margin: float = 0.25,
    device: torch.device | str | None = None,
    backend: str = "torch",
) -> GroupRewards:
    """Rewards and advantages for ``groups`` (one list of extracted answers per input), on ``device`` (the model's:
    every tensor an op receives lives where the op runs).

    ``token_entropy`` [G, N] is each rollout's mean token entropy, needed for ``entropy_signal="self-certainty"``.
    ``reward="gated"`` uses ``gate_share`` and ``gate_margin`` (see ``gate_passes``). ``backend``: the reward op
    is a few hundred flops per input, so the update keeps it in torch; "triton" is for
    tests and benchmarks of the kernel.
    """
    ids = answer_ids(groups, device)
    if reward in ("majority", "gated"):
        rewards = majority_rewards(ids, INVALID_ID)
        if reward == "gated":
            rewards = rewards * gate_passes(ids, gate_share, gate_margin).unsqueeze(-1)
        _, _, entropy = kernels.group_rewards(ids, alpha=0.0, invalid_id=INVALID_ID, backend=backend)
    elif entropy_signal == "answer":
        rewards, _, entropy = kernels.group_rewards(ids, alpha=alpha, invalid_id=INVALID_ID, backend=backend)
    else:
        if token_entropy is None:
            raise ValueError("entropy_signal='self-certainty' needs the rollouts' token entropies")
        rewards, _, entropy = kernels.group_rewards(ids, alpha=0.0, invalid_id=INVALID_ID, backend=backend)
        rewards = rewards - alpha * token_entropy.float().to(rewards.device)
    if baseline == "batch":
        advantages = group_advantages(rewards.reshape(1, -1)).reshape(rewards.shape)
    else:
        advantages = group_advantages(rewards)
    return GroupRewards(rewards=rewards, advantages=advantages, answer_entropy=entropy)
