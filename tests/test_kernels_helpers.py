"""Shared pieces of the kernel tests: Triton interpreter setup, the tolerance table and three-way comparisons.

The kernels run on CPU under ``TRITON_INTERPRET=1``. Triton decides at decoration time whether a kernel is
interpreted, so the kernel modules are (re)imported with the variable set; the variable is set only while the kernel
test modules run (a module-scoped fixture), so other tests still see the default environment. When the installed
triton cannot interpret (3.5/3.6 with numpy >= 2.4, or no triton), the kernel tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

KERNEL_MODULES = (
    "ttrv_edge.kernels.logprob_entropy_triton",
    "ttrv_edge.kernels.linear_logprob_entropy_triton",
    "ttrv_edge.kernels.grpo_loss_triton",
    "ttrv_edge.kernels.group_rewards_triton",
    "ttrv_edge.kernels.linear_grpo_loss_triton",
)
"""In dependency order: linear_logprob_entropy imports host functions of logprob_entropy, linear_grpo_loss imports
jit functions of logprob_entropy and grpo_loss (so it is reloaded after them)."""

TOLERANCES = {
    # (atol relative to max |gold|, rtol) of the Triton kernel against the fp32 gold, per input dtype.
    # Forward values: the kernels read the low-precision inputs exactly and accumulate in fp32, so fp32-level.
    # Gradients are returned in the input dtype, so they carry its rounding (bf16: 2^-8, fp16: 2^-11).
    torch.float32: {"fwd": (1e-5, 1e-5), "grad": (1e-5, 1e-4)},
    torch.float16: {"fwd": (1e-5, 1e-5), "grad": (1e-4, 1.5e-3)},
    torch.bfloat16: {"fwd": (1e-5, 1e-5), "grad": (1e-3, 8e-3)},
}


def _probe() -> str | None:
    """None when a tiny kernel runs under the interpreter, else the reason it cannot."""
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton does not import: {exc!r}"

    @triton.jit
    def _double(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)

    try:
        x = torch.ones(3)
        _double[(1,)](x, 3, BLOCK=4)
        if not torch.equal(x, torch.full((3,), 2.0)):
            return "the interpreter ran a kernel but computed a wrong result"
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton {triton.__version__} cannot run kernels under TRITON_INTERPRET=1: {exc!r}"
    return None


def _interpreted(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(value, InterpretedFunction) for value in vars(module).values())


@contextlib.contextmanager
def triton_interpreter():
    """Run the enclosed tests with TRITON_INTERPRET=1 and interpreted kernel modules; skip if impossible."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    try:
        reason = _probe()
        if reason is not None:
            pytest.skip(reason)
        reload = False
        for name in KERNEL_MODULES:
            module = importlib.import_module(name)
            reload = reload or not _interpreted(module)
            if reload:  # a module imported earlier without the variable: reload it and everything after it
                importlib.reload(module)
        yield
    finally:
        patch.undo()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| over finite entries, after checking both have the same non-finite entries."""
    a, b = a.float(), b.float()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), "non-finite entries differ"
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN entries differ"
    both = torch.isfinite(a)
    same_inf = ~both & ~torch.isnan(a)
    assert torch.equal(a[same_inf], b[same_inf]), "infinite entries differ in sign"
    return (a[both] - b[both]).abs().max().item() if both.any() else 0.0


def assert_close_to_gold(kernel, gold, dtype, kind, scale: float | None = None):
    """``kernel`` within the tolerance table of ``gold`` (``scale`` replaces max |gold| for the atol)."""
    atol, rtol = TOLERANCES[dtype][kind]
    gold = gold.float()
    finite = gold[torch.isfinite(gold)]
    ref_scale = scale if scale is not None else (finite.abs().max().item() if finite.numel() else 1.0)
    err = (kernel.float() - gold).abs()
    bound = atol * max(ref_scale, 1e-6) + rtol * gold.abs()
    max_err(kernel, gold)  # non-finite pattern
    ok = err[torch.isfinite(gold)] <= bound[torch.isfinite(gold)]
    assert ok.all(), f"{kind} {dtype}: max err {err[torch.isfinite(gold)].max().item():.3e} beyond the tolerance"


def assert_three_way(kernel, ref, gold, atol: float):
    """The kernel is no further from the fp32 gold than twice the low-precision reference is, plus ``atol``."""
    err_kernel, err_ref = max_err(kernel, gold), max_err(ref, gold)
    assert err_kernel <= 2.0 * err_ref + atol, f"kernel err {err_kernel:.3e} vs reference err {err_ref:.3e}"


def test_tolerance_table_covers_every_dtype():
    # The table is used by every kernel test; a missing dtype would KeyError deep inside a parametrized case.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert set(TOLERANCES[dtype]) == {"fwd", "grad"}
        assert TOLERANCES[dtype]["grad"][1] >= torch.finfo(dtype).eps / 2
