"""bench/bench_shift.py report: checks its dependency before writing, and keeps the largest run of each condition."""

import builtins
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module():
    spec = importlib.util.spec_from_file_location("bench_shift", BENCH / "bench_shift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_without_matplotlib_writes_nothing(tmp_path, monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    with pytest.raises(SystemExit, match="matplotlib"):
        module.cmd_report(None)
    assert list(tmp_path.iterdir()) == []


def test_a_smaller_run_never_replaces_a_larger_one(tmp_path):
    module = _module()
    path = tmp_path / "runs.jsonl"
    lines = [{"key": "a", "n": 64, "v": 1}, {"key": "a", "n": 8, "v": 2}, {"key": "b", "n": 8, "v": 3}]
    lines += [{"key": "b", "n": 8, "v": 4}, {"key": "a", "n": 64, "v": 5}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    latest = module._latest(path, lambda r: r["key"])
    assert latest["a"]["v"] == 5 and latest["b"]["v"] == 4
