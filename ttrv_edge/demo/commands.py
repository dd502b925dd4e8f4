"""The demo's CLI commands, registered on the main typer app by ``ttrv_edge.cli``: ``demo-train`` and ``eval``.

Kept here so the shared ``cli.py`` needs two lines; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from . import BENCH_EPOCHS, BENCH_LR


def train_command(
    out: Annotated[
        Path | None, typer.Option(help="Where to save the model (default: the packaged ttrv_edge/demo/model).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Most joint training steps (it stops earlier at --target-acc).")] = 3000,
    vision_steps: Annotated[
        int, typer.Option(help="Probe-only steps of the vision tower before the answer loss joins (0 = none).")
    ] = 3000,
    batch_size: Annotated[int, typer.Option(help="Scenes per step.")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 1e-3,
    smoothing: Annotated[float, typer.Option(help="Label smoothing of the answer word over its word pool.")] = 0.1,
    target_acc: Annotated[float, typer.Option(help="Stop once held-out answer-word accuracy reaches this.")] = 0.97,
    hidden: Annotated[int, typer.Option(help="Hidden size of the vision and text transformers.")] = 128,
    layers: Annotated[int, typer.Option(help="Layers of the vision and text transformers.")] = 3,
    aux_weight: Annotated[float, typer.Option(help="Weight of the training-only vision probe (0 = off).")] = 1.0,
    init: Annotated[Path | None, typer.Option(help="Start from this model folder's weights.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Train the demo VLM from scratch on clean synthetic scenes (CPU, minutes) and save it."""
    from .train import MODEL_DIR, train

    summary = train(
        out or MODEL_DIR,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        smoothing=smoothing,
        target_acc=target_acc,
        hidden=hidden,
        layers=layers,
        seed=seed,
        aux_weight=aux_weight,
        vision_steps=vision_steps,
        init=init,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    sys.stdout.write(json.dumps({k: v for k, v in summary.items() if k != "history"}) + "\n")


def eval_command(
    corruption: Annotated[str, typer.Option(help="clean, or one of the shift corruptions (ttrv_edge.demo.shift).")] = (
        "clean"
    ),
    severity: Annotated[int, typer.Option(help="1 (mild) to 5 (severe); ignored for clean.")] = 3,
    method: Annotated[str, typer.Option(help="base, ttrl, ttrv, ttrv-episodic or tent.")] = "base",
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 32,
    start: Annotated[int, typer.Option(help="Seed of the first scene.")] = 0,
    model: Annotated[str, typer.Option(help="Model folder, hub id, or 'demo'.")] = "demo",
    rollouts: Annotated[int, typer.Option(help="N samples per input.")] = 8,
    steps: Annotated[int, typer.Option(help="Episodic steps per scene.")] = 3,
    epochs: Annotated[int, typer.Option(help="Transductive epochs.")] = BENCH_EPOCHS,
    batch_size: Annotated[int, typer.Option(help="Transductive inputs per update.")] = 4,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.")] = BENCH_LR,
    alpha: Annotated[float, typer.Option(help="Entropy-reward weight.")] = 0.75,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Evaluate one shift condition of the demo benchmark: accuracy before and after the method."""
    from ..api import TTRVModel
    from ..config import TTRVConfig
    from .eval import evaluate

    config = TTRVConfig(
        rollouts=rollouts,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        alpha=alpha,
        temperature=temperature,
        seed=seed,
        max_new_tokens=8,
    )
    loop = TTRVModel.from_pretrained(model, config).loop
    result = evaluate(loop, corruption, 0 if corruption == "clean" else severity, method, n=n, start=start)
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    before, after = result["before"], result["after"]
    print(
        f"{corruption} severity {result['severity']} {method} on {result['n']} scenes: "
        f"greedy {before['greedy']:.3f} -> {after['greedy']:.3f}, majority {before['majority']:.3f} -> "
        f"{after['majority']:.3f}, sampled {before['sampled']:.3f} -> {after['sampled']:.3f}, "
        f"answer entropy {before['entropy']:.3f} -> {after['entropy']:.3f} ({result['seconds']:.1f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``demo-train`` and ``eval`` to ``app``."""
    app.command("demo-train")(train_command)
    app.command("eval")(eval_command)
