"""bench/bench_memory.py's worker on CPU with a tiny model: the cases of one process, per-phase peaks, and a
failing case recorded without losing the others (the way a GPU session runs it)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def _bench_memory():
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location("bench_memory", BENCH_DIR / "bench_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH_DIR))
        sys.modules.pop("memory_report", None)
        sys.modules.pop("common", None)
    return module


def _job(model_dir, method: str, rollouts: int) -> dict:
    return {
        "run": 0, "model": "tiny", "model_dir": str(model_dir), "image_size": 64, "method": method,
        "quantize": "none", "rollouts": rollouts, "new_tokens": 4, "device": "cpu", "dtype": "fp32", "threads": 1,
        "memory_budget": None,
    }  # fmt: skip


def test_groups_one_process_per_model_and_quantization_on_cuda_only():
    bench = _bench_memory()
    jobs = [{"model": m, "quantize": q, "method": k} for m in ("a", "b") for q in ("none", "nf4") for k in "xy"]
    assert [len(g) for g in bench._groups(jobs, "cuda")] == [2, 2, 2, 2]
    assert {(j["model"], j["quantize"]) for j in bench._groups(jobs, "cuda")[1]} == {("a", "nf4")}
    assert [len(g) for g in bench._groups(jobs, "cpu")] == [1] * 8


def test_worker_measures_each_case_and_keeps_going_after_one_fails(tiny_idefics3_dir):
    bench = _bench_memory()
    # two rollouts always get equal frequency rewards: no advantage, so the ttrv update raises for that case only
    jobs = [_job(tiny_idefics3_dir, "ttrv", 2), _job(tiny_idefics3_dir, "ttrv", 3), _job(tiny_idefics3_dir, "trl", 3)]
    failed, ttrv, trl = bench.worker(jobs)
    assert "no advantage signal" in failed["error"] and "peak_bytes" not in failed
    for row in (ttrv, trl):
        assert "error" not in row and row["peak_bytes"] > 0 and row["step_s"] > 0 and row["device_name"]
    assert ttrv["train_peak_bytes"] > 0 and ttrv["sample_peak_bytes"] > 0
    assert ttrv["train_estimate_bytes"] > 0 and ttrv["sample_estimate_bytes"] > 0
