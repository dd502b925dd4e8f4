"""The order of a transductive run's update steps: a budget of updates over shuffled passes of the set.

The amount of adaptation is a number of update steps (``TTRVConfig.transductive_updates``): ``max_updates``
(default 32), or ``epochs`` full passes. The steps go through the set in shuffled passes of ``batch_size`` inputs
per step, a new permutation per pass, and stop when the budget is spent (the last pass may be partial). A fixed
budget makes a small and a large set get the same number of updates: with epochs, 4 passes over 288 inputs are 288
updates at batch 1, over 64 inputs 64, and the larger set drifted much further at the same learning rate (issue 15).

The permutations come from one generator seeded with the run's seed, drawn in pass order, and each step's sampling
seed is ``item_seed(seed, 3, pass, start)``, so an ``epochs`` run takes exactly the steps it took before budgets
existed, and a resumed run replays the same steps. A data-parallel run (``distributed.py``) follows the same
schedule on every rank and splits each step's inputs into contiguous blocks, one per rank, so ``--batch-size`` stays
the number of inputs per update whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Batch", "schedule", "work_units"]


@dataclass(frozen=True)
class Batch:
    """One update step: its index in the run, the pass it belongs to, its offset in that pass, the inputs."""

    step: int
    epoch: int
    start: int
    indices: list[int]


def schedule(config, num_items: int) -> Iterator[Batch]:
    """The run's update steps in order (``config.transductive_updates(num_items)`` of them)."""
    total = config.transductive_updates(num_items)
    rng = torch.Generator().manual_seed(config.seed)
    step, epoch = 0, 0
    while step < total:
        order = torch.randperm(num_items, generator=rng).tolist()
        for start in range(0, num_items, config.batch_size):
            if step >= total:
                return
            yield Batch(step, epoch, start, order[start : start + config.batch_size])
            step += 1
        epoch += 1


def work_units(config, num_items: int) -> int:
    """Progress units of a transductive run: every input answered before and after, plus one per input and step."""
    return 2 * num_items + sum(len(batch.indices) for batch in schedule(config, num_items))
