"""Memory: micro-batch sizes for a budget, measured peaks, out-of-memory back-off.

``budget`` (parse ``--memory-budget``, the phases), ``costs`` (the estimate of a phase from the model's config),
``meter`` (peaks, tensor bytes, out-of-memory errors), ``planner`` (``MemoryPlanner``: micro-batch sizes, corrected
by the measured peaks) and ``backoff`` (redo a phase with halved micro-batches after an out-of-memory error).
"""

from .backoff import chunks, run_with_backoff
from .budget import PHASES, format_bytes, parse_memory_budget
from .costs import ModelCosts, WorkShape, model_costs
from .meter import PeakMeter, free_memory, is_out_of_memory, tensor_bytes
from .planner import MemoryPlanner

__all__ = [
    "PHASES",
    "MemoryPlanner",
    "ModelCosts",
    "PeakMeter",
    "WorkShape",
    "chunks",
    "format_bytes",
    "free_memory",
    "is_out_of_memory",
    "model_costs",
    "parse_memory_budget",
    "run_with_backoff",
    "tensor_bytes",
]
