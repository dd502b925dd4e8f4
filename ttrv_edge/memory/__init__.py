"""Step 1 of the layout change (moves only): the old ``ttrv_edge.memory`` names."""

from .planner import (
    MemoryPlanner,
    ModelCosts,
    PeakMeter,
    WorkShape,
    format_bytes,
    is_out_of_memory,
    model_costs,
    parse_memory_budget,
    run_with_backoff,
    tensor_bytes,
)

__all__ = [
    "MemoryPlanner",
    "ModelCosts",
    "PeakMeter",
    "WorkShape",
    "format_bytes",
    "is_out_of_memory",
    "model_costs",
    "parse_memory_budget",
    "run_with_backoff",
    "tensor_bytes",
]
