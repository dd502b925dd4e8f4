"""Backend selection shared by every op: one flag, CPU fallback, same results."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
TRITON_OPS_AVAILABLE = False
"""Set to True by the Triton op modules once they exist; until then "auto" always means torch."""


def triton_usable(tensor: torch.Tensor) -> bool:
    """Triton can launch on ``tensor``: a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``."""
    if tensor.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """Map ``backend`` to "triton" or "torch" for an op whose main input is ``tensor``.

    "auto" means triton on CUDA (when the Triton ops are installed) and torch elsewhere; "triton" on a tensor it
    cannot launch on is a ValueError, not a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if TRITON_OPS_AVAILABLE and tensor.is_cuda else "torch"
    if not TRITON_OPS_AVAILABLE:
        raise ValueError("backend='triton' requested but the Triton kernels are not available in this install")
    if not triton_usable(tensor):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return "triton"
