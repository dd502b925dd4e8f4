"""Backend selection shared by every op: one flag, CPU fallback, same results.

``"auto"`` picks the Triton kernels for CUDA tensors when ``triton`` imports, and the torch reference otherwise
(on CPU the Triton interpreter is far slower than torch, so "auto" never chooses it there). ``"triton"`` is an
explicit request: it runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (used by the tests),
and is a ValueError anywhere else rather than a silent fallback.

triton is optional: CPU installs leave it out (``pip install 'ttrv-edge[gpu]'`` or a CUDA build of torch brings it),
and nothing imports it before the first Triton call, so "auto" runs the torch reference without it.
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")

TRITON_OPS_AVAILABLE: bool | None = None
"""None: detect on first use whether ``triton`` imports. Set to True/False to override the detection."""


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # an absent or broken triton install both mean "no Triton backend"
        return False
    return True


def triton_available() -> bool:
    """Whether the Triton kernels can be used in this install (``TRITON_OPS_AVAILABLE`` overrides detection)."""
    if TRITON_OPS_AVAILABLE is not None:
        return bool(TRITON_OPS_AVAILABLE)
    return _triton_imports()


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
        # Short-circuit on is_cuda so that CPU runs never import triton.
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError(
            "backend='triton' requested but triton is not importable in this install "
            "(install a CUDA build of torch, which brings triton, or `pip install 'ttrv-edge[gpu]'`; "
            "or use backend='auto' or 'torch')"
        )
    if not triton_usable(tensor):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return "triton"
