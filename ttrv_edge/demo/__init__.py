"""The bundled demo: a tiny Idefics3 VLM trained on synthetic shape scenes, and the shift benchmark around it.

``demo_model_dir()`` is the packaged model folder (weights, tokenizer, processor), what ``--model demo`` loads.
Submodules: ``scenes`` (generator and questions), ``shift`` (corruptions), ``train`` (the training recipe),
``eval`` (one benchmark condition and the methods), ``commands`` (the CLI commands).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BENCH_EPOCHS", "BENCH_LR", "demo_model_dir"]

# The shift benchmark's tuned settings (chosen on gaussian noise and contrast, severity 3, 48 scenes; README), shared
# by ``ttrv-edge eval`` and bench/bench_shift.py so that one command reproduces one row of the table.
BENCH_LR = 5e-3
BENCH_EPOCHS = 4


def demo_model_dir() -> Path:
    """The packaged demo model folder; ValueError (naming --model) when its weights are missing."""
    path = Path(__file__).parent / "model"
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ValueError(
            f"--model: the demo model is not installed at {path}; train it with `ttrv-edge demo-train` "
            "or pass another --model"
        )
    return path
