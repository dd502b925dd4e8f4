"""Backend resolution, the public API's names, and isolation of our kernels/ folder from transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ttrv_edge.kernels import dispatch

from ttrv_edge import kernels

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_auto_picks_torch_on_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve_backend("auto", torch.zeros(1)) == "torch"
    assert dispatch.resolve_backend("torch", torch.zeros(1)) == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports(monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.setattr(dispatch, "TRITON_OPS_AVAILABLE", None)
    assert dispatch.resolve_backend("auto", FakeCuda()) == ("triton" if dispatch._triton_imports() else "torch")
    monkeypatch.setattr(dispatch, "TRITON_OPS_AVAILABLE", False)
    assert dispatch.resolve_backend("auto", FakeCuda()) == "torch"


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        dispatch.resolve_backend("triton", torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "TRITON_OPS_AVAILABLE", True)
    assert dispatch.resolve_backend("triton", torch.zeros(1)) == "triton"
    monkeypatch.setattr(dispatch, "TRITON_OPS_AVAILABLE", False)
    with pytest.raises(ValueError, match="not importable"):
        dispatch.resolve_backend("triton", torch.zeros(1))


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend"):
        kernels.group_rewards(torch.zeros(1, 2, dtype=torch.long), backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows"):
        kernels.linear_logprob_entropy(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long),
                                       backend="torch", chunk_rows=0)  # fmt: skip


def test_public_ops_stay_functions_after_the_triton_modules_load():
    # A submodule named like a public op would rebind the package attribute to the module on first import.
    import ttrv_edge.kernels.group_rewards_triton  # noqa: F401
    import ttrv_edge.kernels.grpo_loss_triton  # noqa: F401
    import ttrv_edge.kernels.linear_logprob_entropy_triton  # noqa: F401
    import ttrv_edge.kernels.logprob_entropy_triton  # noqa: F401

    for name in ("logprob_entropy", "linear_logprob_entropy", "grpo_loss", "group_rewards"):
        assert callable(getattr(kernels, name)), name
    logp, ent = kernels.logprob_entropy(torch.zeros(1, 4), torch.tensor([0]), backend="torch")
    assert logp.item() == pytest.approx(-torch.log(torch.tensor(4.0)).item())


def test_importing_transformers_from_the_repo_root_is_unaffected():
    # transformers probes for the PyPI package `kernels`; with the repo root first on sys.path our folder is
    # findable under that name. It must not be taken for hub kernels, and transformers must work as usual.
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import transformers;"
        "from transformers.utils import import_utils as iu;"
        "assert not iu.is_kernels_available(), 'our kernels/ folder was taken for the kernels package';"
        "from transformers.integrations import hub_kernels;"
        "assert not hub_kernels._kernels_enabled, 'hub kernels enabled by our folder';"
        "from transformers import LlamaConfig; assert LlamaConfig(hidden_size=64).hidden_size == 64;"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
