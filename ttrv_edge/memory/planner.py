"""Memory budget planner: micro-batch sizes for sampling and for the loss, corrected by measured peaks.

``MemoryPlanner`` estimates both phases from the model's config (``costs.py``; the train phase keeps the vision
tower's activations when a parameter there trains) and picks the largest micro-batch whose estimate fits the
budget. Every phase runs under ``measure`` (``meter.py``); the ratio of the measured to the estimated dynamic bytes
becomes that phase's correction factor for the next plan, so a wrong estimate corrects itself after one step. After
an out-of-memory error ``backoff`` halves the phase's micro-batch (``backoff.py`` redoes the phase). The CPU baseline
(everything alive before the first phase) is measured when the planner is created, and on CPU the budget is compared
with the process's RSS.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .budget import PHASES, format_bytes, parse_memory_budget
from .costs import WorkShape, model_costs
from .meter import PeakMeter

__all__ = ["MemoryPlanner"]

CORRECTION_RANGE = (0.25, 8.0)


class MemoryPlanner:
    """Chooses micro-batch sizes for a memory budget, measures each phase's peak and corrects its estimate.

    ``budget_bytes=None`` means no limit: phases run on all rows at once (or the fixed ``sample_micro_batch`` /
    ``train_micro_batch``), peaks are still measured and an out-of-memory error still halves the micro-batch.
    """

    def __init__(
        self,
        model,
        budget_bytes: int | None = None,
        *,
        sample_micro_batch: int | None = None,
        train_micro_batch: int | None = None,
        device: torch.device | str | None = None,
        fused_head: bool = False,
    ):
        self.costs = model_costs(model, fused_head=fused_head)
        self.budget = budget_bytes
        self.fixed = {"sample": sample_micro_batch, "train": train_micro_batch}
        self.meter = PeakMeter(device if device is not None else _model_device(model))
        self.resident = self.meter.current()  # everything alive before the first phase: weights, libraries
        self.correction = {phase: 1.0 for phase in PHASES}
        self.caps: dict[str, int | None] = {phase: None for phase in PHASES}
        self.chosen: dict[str, int | None] = {phase: None for phase in PHASES}
        self.estimates: dict[str, int | None] = {phase: None for phase in PHASES}
        self.first_estimates: dict[str, int | None] = {phase: None for phase in PHASES}
        self.measured: dict[str, int | None] = {phase: None for phase in PHASES}
        self.peak_bytes = 0
        self.oom_retries = 0

    @classmethod
    def for_config(cls, vlm, config) -> MemoryPlanner:
        """The planner a ``TTRVConfig`` asks for (budget, fixed micro-batch sizes, the loss's backend)."""
        from ..kernels import resolve_backend

        probe = torch.empty(0, device=_model_device(vlm.model))
        try:
            fused = resolve_backend(getattr(config, "backend", "auto"), probe) == "triton"
        except ValueError:  # a backend that cannot run here: the loss raises the same error when it starts
            fused = False
        return cls(
            vlm.model,
            parse_memory_budget(getattr(config, "memory_budget", None)),
            sample_micro_batch=getattr(config, "sample_micro_batch", None),
            train_micro_batch=getattr(config, "train_micro_batch", None),
            fused_head=fused,
        )

    def estimate(self, phase: str, rows: int, shape: WorkShape, corrected: bool = True) -> int:
        """Predicted peak (bytes, on the meter's scale) of ``phase`` run in micro-batches of ``rows``."""
        dynamic = self.costs.dynamic_bytes(phase, rows, shape)
        scale = self.correction[phase] if corrected else 1.0
        return int(self.resident + scale * dynamic)

    def micro_batch(self, phase: str, total: int, shape: WorkShape) -> int:
        """The micro-batch size (rows) for ``phase`` on ``total`` rows of ``shape``."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        rows = min(self.fixed[phase] or total, total)
        if self.budget is not None and self.fixed[phase] is None:
            rows = self._fit(phase, total, shape)
        if self.caps[phase] is not None:
            rows = min(rows, self.caps[phase])
        rows = max(rows, 1)
        self.chosen[phase] = rows
        self.estimates[phase] = self.estimate(phase, rows, shape)
        if self.first_estimates[phase] is None:
            self.first_estimates[phase] = self.estimates[phase]
        return rows

    def _fit(self, phase: str, total: int, shape: WorkShape) -> int:
        if self.estimate(phase, 1, shape) > self.budget:
            need = self.estimate(phase, 1, shape)
            raise ValueError(
                f"--memory-budget {format_bytes(self.budget)} is too small: one rollout of {shape.prompt_tokens}"
                f"+{shape.new_tokens} tokens needs about {format_bytes(need)} in the {phase} phase "
                f"(of which {format_bytes(self.resident)} is already in use); raise the budget, use --quantize, "
                f"or lower --max-new-tokens"
            )
        low, high = 1, total  # largest rows with estimate <= budget (the estimate grows with rows)
        while low < high:
            mid = (low + high + 1) // 2
            if self.estimate(phase, mid, shape) <= self.budget:
                low = mid
            else:
                high = mid - 1
        return low

    @contextmanager
    def measure(self, phase: str, rows: int, shape: WorkShape) -> Iterator[None]:
        """Measure the peak of ``phase`` (micro-batches of ``rows``) and correct the estimate from it."""
        self.meter.reset()
        yield
        peak = self.meter.peak()
        self.measured[phase] = peak
        self.peak_bytes = max(self.peak_bytes, peak)
        predicted = self.costs.dynamic_bytes(phase, rows, shape)
        if predicted > 0:
            ratio = max(peak - self.resident, 0) / predicted
            self.correction[phase] = min(max(ratio, CORRECTION_RANGE[0]), CORRECTION_RANGE[1])

    def backoff(self, phase: str, rows: int) -> int:
        """After an out-of-memory error with micro-batches of ``rows``: the halved size (an error at 1 row)."""
        if rows <= 1:
            raise torch.OutOfMemoryError(
                f"out of memory in the {phase} phase with a micro-batch of 1 rollout; lower --max-new-tokens, use "
                f"--quantize, or free memory"
            )
        self.oom_retries += 1
        self.caps[phase] = rows // 2
        self.chosen[phase] = rows // 2
        return rows // 2

    def report(self) -> dict:
        """What the JSON report shows: the peak, the budget, the estimates and the chosen micro-batch sizes."""
        peak = max(self.peak_bytes, self.meter.peak())
        return {
            "peak_memory_bytes": int(peak),
            "memory_measure": self.meter.kind,
            "budget_bytes": self.budget,
            "weights_bytes": self.costs.weights_bytes,
            "trains_vision": self.costs.vision_trained,
            "resident_bytes": self.resident,
            "sample_micro_batch": self.chosen["sample"],
            "train_micro_batch": self.chosen["train"],
            "estimated_peak_bytes": {p: self.first_estimates[p] for p in PHASES},
            "measured_peak_bytes": dict(self.measured),
            "oom_retries": self.oom_retries,
        }


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
