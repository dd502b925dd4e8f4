"""The memory budget as the user gives it (``--memory-budget 4GB``), bytes as the reports show them, and the phases a
budget is planned for.

A TTRV step has two memory-hungry phases over the N rollouts of one input, ``PHASES``: **sample** (decode N
continuations from one prefilled prompt) and **train** (the loss forward and backward); ``planner.py`` sizes the
micro-batches of each so that the step fits the budget.
"""

from __future__ import annotations

import re

__all__ = ["PHASES", "format_bytes", "parse_memory_budget"]

PHASES = ("sample", "train")
_UNITS = {"": None, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_memory_budget(text: str | int | None) -> int | None:
    """Bytes from "4GB", "6 GiB", "512MB", "1.5g" (K/M/G/T are powers of 1024, B/iB optional); None stays None.

    A bare number (no unit), zero, a negative or unparseable value is a ValueError naming --memory-budget.
    """
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"--memory-budget must be a size such as 4GB or 512MB, got {text!r}")
    match = _BUDGET.match(str(text))
    if match is None or (not match.group(2) and not match.group(3)):
        raise ValueError(f"--memory-budget must be a size with a unit, such as 4GB, 6GiB or 512MB; got {text!r}")
    unit = match.group(2).lower() or "b"
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"--memory-budget must be positive, got {text!r}")
    return int(value)


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{int(value)} B"
