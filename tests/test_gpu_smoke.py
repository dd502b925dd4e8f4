"""bench/gpu_smoke.py's CPU path (Triton interpreter): the script a GPU session runs first must itself work."""

import csv
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_smoke_cpu_path_passes_and_writes_every_check(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("gpu_smoke", BENCH / "gpu_smoke.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / "smoke.csv"
        assert module.main(["--device", "cpu", "--models", "tiny", "--out", str(out)]) == 0
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("real_size", None)
        sys.modules.pop("common", None)
    rows = list(csv.DictReader(out.open()))
    checks = {r["check"] for r in rows}
    expected = {"op linear_grpo_loss", "op group_rewards", "tiny transductive LoRA grads triton vs torch"}
    assert expected | {"tiny episodic LoRA update: fraction moved oppositely"} <= checks
    assert all(r["ok"] == "True" for r in rows) and all(r["device_name"] for r in rows)
