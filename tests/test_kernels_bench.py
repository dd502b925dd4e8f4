"""The microbenchmark scripts run at tiny shapes on CPU and write the agreed CSV columns and a PNG."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
from test_kernels_helpers import triton_interpreter

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
COLUMNS = ["op", "provider", "N", "V", "H", "dtype", "pass", "ms", "GB/s", "peak_MB"]
REFERENCE = ["copy_GB/s", "of_copy", "device_name", "torch", "triton", "liger"]  # the same run's copy bandwidth


def _main(script: str):
    """The script's main(), loaded in-process (its `common` import resolved from bench/, then forgotten)."""
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(script, BENCH_DIR / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
        sys.modules.pop("common", None)
    return module.main


def _read(path: Path):
    with path.open() as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize(
    "script, argv, n_rows",
    [
        ("bench_logprob_entropy", ["--N", "8,16", "--V", "96", "--dtypes", "fp32,bf16"], 8),
        ("bench_linear_logprob_entropy", ["--N", "8", "--V", "96", "--H", "8", "--providers", "torch,chunked"], 4),
        ("bench_grpo_loss", ["--N", "64", "--seq-len", "16", "--dtypes", "fp32"], 2),
        ("bench_group_rewards", ["--N", "8", "--V", "3"], 1),
    ],
)
def test_bench_script_writes_csv_and_png(tmp_path, script, argv, n_rows):
    out = tmp_path / "result.csv"
    base = ["--device", "cpu", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    if "--providers" not in argv:
        base += ["--providers", "torch"]
    rows = _main(script)(base + argv)
    header, written = _read(out)
    assert header == COLUMNS + REFERENCE
    assert len(written) == len(rows) == n_rows
    for row in written:
        assert row["provider"] in ("torch", "chunked")
        assert float(row["ms"]) > 0 and float(row["GB/s"]) > 0
        assert not math.isnan(float(row["peak_MB"])) and float(row["peak_MB"]) >= 0
        assert float(row["copy_GB/s"]) > 0 and row["device_name"] and row["torch"]
        assert float(row["of_copy"]) == pytest.approx(float(row["GB/s"]) / float(row["copy_GB/s"]), rel=1e-2)
    assert out.with_suffix(".png").stat().st_size > 0
    if script == "bench_logprob_entropy":  # the bandwidth column is the op's traffic over the measured time
        elem = {"fp32": 4, "bf16": 2}
        assert {(r["N"], r["dtype"], r["pass"]) for r in written} == {
            (n, d, p) for n in ("8", "16") for d in ("fp32", "bf16") for p in ("fwd", "fwd+bwd")
        }
        for r in written:
            n, v = int(r["N"]), int(r["V"])
            traffic = n * v * elem[r["dtype"]] * (1 if r["pass"] == "fwd" else 3) + n * 16
            assert float(r["GB/s"]) == pytest.approx(traffic / (float(r["ms"]) * 1e-3) / 1e9, rel=1e-3)


def test_triton_provider_runs_under_the_interpreter(tmp_path):
    out = tmp_path / "le.csv"
    argv = ["--device", "cpu", "--providers", "triton,torch,liger", "--N", "4", "--V", "64", "--dtypes", "bf16",
            "--repeats", "1", "--warmup", "0", "--out", str(out), "--no-plot", "--temperature", "0.7"]  # fmt: skip
    with triton_interpreter():
        _main("bench_logprob_entropy")(argv)
    _, written = _read(out)
    providers = {(r["provider"], r["pass"]) for r in written}
    # liger is skipped on CPU (not installed, or no CUDA), the other two run both passes.
    assert providers == {(p, s) for p in ("triton", "torch") for s in ("fwd", "fwd+bwd")}


def test_linear_grpo_loss_bench_runs_every_provider_it_can_at_tiny_shapes(tmp_path):
    out = tmp_path / "lgl.csv"
    argv = ["--device", "cpu", "--providers", "fused,composition,trl,liger", "--N", "8", "--V", "96", "--H", "8",
            "--seq-len", "4", "--train-weight", "--repeats", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    with triton_interpreter():
        rows = _main("bench_linear_grpo_loss")(argv)
    header, written = _read(out)
    assert header == COLUMNS + ["gemms", "GFLOP"] + REFERENCE and len(written) == len(rows)
    # the analytic GEMM count with a trainable lm_head: fused 3 (logits, d(hidden), d(weight)), the composition 4
    # (its backward recomputes the logits), TRL's eager path 3; every forward alone 1
    expected = {("fused", "fwd+bwd"): 3, ("composition", "fwd+bwd"): 4, ("trl", "fwd+bwd"): 3}
    for r in written:
        assert int(r["gemms"]) == expected.get((r["provider"], r["pass"]), 1)
        assert float(r["GFLOP"]) == pytest.approx(int(r["gemms"]) * 2 * 8 * 96 * 8 / 1e9, rel=1e-3)
    # liger is skipped on CPU (not installed, or no CUDA); the fused op runs under the interpreter.
    assert {(r["provider"], r["pass"]) for r in written} == {
        (p, s) for p in ("fused", "composition", "trl") for s in ("fwd", "fwd+bwd")
    }
    for r in written:
        assert (r["op"], r["N"], r["V"], r["H"], r["dtype"]) == ("linear_grpo_loss", "8", "96", "8", "bf16")
        assert float(r["ms"]) > 0 and float(r["GB/s"]) > 0 and float(r["peak_MB"]) >= 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_unknown_provider_is_rejected():
    with pytest.raises(SystemExit, match="unknown provider"):
        _main("bench_group_rewards")(["--device", "cpu", "--providers", "numpy"])


def test_a_provider_that_raises_is_reported_and_the_other_cases_still_run(tmp_path, capsys):
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_common", BENCH_DIR / "common.py")
        common = importlib.util.module_from_spec(spec)
        sys.modules["bench_common"] = common  # its dataclass needs the module registered
        spec.loader.exec_module(common)
    finally:
        sys.path.remove(str(BENCH_DIR))
        sys.modules.pop("bench_common", None)

    def broken():
        raise RuntimeError("library API changed")

    def working():
        return lambda: None

    cases = [common.Case(p, 4, 8, 0, "fp32", "fwd", build, 64) for p, build in (("bad", broken), ("good", working))]
    args = common.base_parser("op", ["bad", "good"], N="4", V="8", H="0").parse_args(
        ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "r.csv"), "--no-plot"]
    )
    rows = common.run("op", cases, args)
    assert [r["provider"] for r in rows] == ["good"]
    assert "error bad N=4 V=8 H=0 fp32 fwd: RuntimeError: library API changed" in capsys.readouterr().out
    _, written = _read(tmp_path / "r.csv")
    assert [r["provider"] for r in written] == ["good"]
