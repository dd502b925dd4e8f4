"""Out-of-memory back-off: run a phase in micro-batches, halve them after an allocation failure, redo the phase.

An out-of-memory error (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate memory") halves the
micro-batch and redoes the whole phase from its start, so no step is lost: gradients accumulated before the failure
are cleared and sampling is re-seeded by the phase itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

from .meter import free_memory, is_out_of_memory

if TYPE_CHECKING:
    from .costs import WorkShape
    from .planner import MemoryPlanner

__all__ = ["chunks", "run_with_backoff"]

T = TypeVar("T")


def run_with_backoff(
    attempt: Callable[[int], T],
    rows: int,
    *,
    phase: str,
    shape: WorkShape | None = None,
    planner: MemoryPlanner | None = None,
    device: torch.device | None = None,
) -> tuple[T, int]:
    """``attempt(rows)`` (a whole phase in micro-batches of ``rows``), halving ``rows`` after an out-of-memory error.

    ``attempt`` must start the phase from scratch (zero the gradients, re-seed the sampler): it is called again
    from the beginning after a failure, so the step is redone, never skipped. With a planner the attempt is measured.
    Returns the attempt's result and the micro-batch size that succeeded.
    """
    device = device or (planner.meter.device if planner is not None else torch.device("cpu"))
    while True:
        failed = False
        try:
            if planner is not None and shape is not None:
                with planner.measure(phase, rows, shape):
                    return attempt(rows), rows
            return attempt(rows), rows
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            failed = True  # leave the except block first: its traceback keeps the failed attempt's tensors alive
        if failed:
            free_memory(device)
            if planner is not None:
                rows = planner.backoff(phase, rows)
            elif rows <= 1:
                raise torch.OutOfMemoryError(f"out of memory in the {phase} phase with a micro-batch of 1 rollout")
            else:
                rows //= 2


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of ``size`` rows covering ``range(total)``."""
    size = max(int(size), 1)
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]
