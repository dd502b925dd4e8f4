"""The demo's CLI commands, registered on the main typer app by ``ttrv_edge.cli``: ``demo-train`` and ``eval``.

Kept here so the shared ``cli.py`` needs two lines; nothing heavy is imported until a command runs. ``eval`` takes
every TTRVConfig field as an option (``cli_options.py``), with the benchmark's tuned settings as its defaults where
they differ (``BENCH_DEFAULTS``). ``demo-train`` writes ``./demo-model`` unless told otherwise, and the packaged demo
model only with ``--overwrite-packaged``.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer

from ..cli_options import config_options
from . import BENCH_EPOCHS, BENCH_LR
from .shift import CORRUPTIONS

BENCH_DEFAULTS = {"epochs": BENCH_EPOCHS, "lr": BENCH_LR, "batch_size": 4, "max_new_tokens": 8}
"""``eval``'s defaults where the shift benchmark's settings differ from TTRVConfig's (bench/bench_shift.py's too).
``--max-updates`` replaces the default ``--epochs`` (an ``--epochs`` given with it is an error, as in ``adapt``)."""
DEFAULT_TRAIN_OUT = Path("demo-model")


def train_command(
    out: Annotated[
        Path | None,
        typer.Option(
            help=f"Where to save the model (default: ./{DEFAULT_TRAIN_OUT}); a model folder there is replaced. "
            "Load it with --model PATH.",
            show_default=False,
        ),
    ] = None,
    overwrite_packaged: Annotated[
        bool,
        typer.Option(
            help="Save into the installed package's demo model (ttrv_edge/demo/model, what --model demo loads), "
            "replacing the shipped one."
        ),
    ] = False,
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

    target = _train_target(out, overwrite_packaged, MODEL_DIR)
    summary = train(
        target,
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
    sys.stdout.write(json.dumps({"out": str(target), **{k: v for k, v in summary.items() if k != "history"}}) + "\n")


def _train_target(out: Path | None, overwrite_packaged: bool, packaged: Path) -> Path:
    """Where ``demo-train`` saves: never the installed package's model unless ``--overwrite-packaged``, and never over
    a folder that is not a model (training replaces the folder whole)."""
    if overwrite_packaged:
        if out is not None and out.resolve() != packaged.resolve():
            raise ValueError("--overwrite-packaged writes the packaged demo model; it cannot be combined with --out")
        return packaged
    target = out if out is not None else DEFAULT_TRAIN_OUT
    if target.resolve() == packaged.resolve():
        raise ValueError(
            f"--out: {target} is the installed package's demo model; pass --overwrite-packaged to replace it"
        )
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "config.json").is_file())):
        raise ValueError(f"--out: {target} exists and is not a model folder (training replaces it whole)")
    return target


@config_options(defaults=BENCH_DEFAULTS)
def eval_command(
    corruption: Annotated[
        typing.Literal[("clean", *CORRUPTIONS)],
        typer.Option(help=f"clean, or a shift corruption: {', '.join(CORRUPTIONS)} (ttrv_edge/demo/shift.py)."),
    ] = "clean",
    severity: Annotated[int, typer.Option(help="1 (mild) to 5 (severe); ignored for clean.")] = 3,
    method: Annotated[str, typer.Option(help="base, ttrl, ttrv, ttrv-episodic or tent.")] = "base",
    n: Annotated[int, typer.Option(help="Number of scenes.")] = 32,
    start: Annotated[int, typer.Option(help="Seed of the first scene.")] = 0,
    model: Annotated[str, typer.Option(help="Model folder, hub id, or 'demo'.")] = "demo",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    context: typer.Context = None,
    **options,
) -> None:
    """Evaluate one shift condition of the demo benchmark: accuracy before and after the method.

    Every TTRVConfig field is an option; epochs, lr, batch size and max new tokens default to the benchmark's.
    """
    from ..api import TTRVModel
    from ..config import TTRVConfig
    from .eval import evaluate

    if options.get("max_updates") is not None and not _given(context, "epochs"):
        options["epochs"] = None  # an update budget replaces the benchmark's default number of passes
    config = TTRVConfig(**options)
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
    run = result.get("run")
    if run is not None and run["diversity"]:
        collapse, budget = run["collapse"], run["update_budget"]
        print(
            f"collapse guard: stopped after {collapse['step']} of {budget} updates ({', '.join(collapse['signals'])}), "
            f"rolled back to step {collapse['rolled_back_to_step']}"
            if collapse
            else f"collapse guard: quiet over {len(run['diversity'])} checks, {budget} updates"
        )


def _given(context: typer.Context | None, name: str) -> bool:
    """Whether the option ``name`` of the running command was given (not left at its default)."""
    source = context.get_parameter_source(name) if context is not None else None
    return source is not None and source.name != "DEFAULT"


def register(app: typer.Typer) -> None:
    """Add ``demo-train`` and ``eval`` to ``app``."""
    app.command("demo-train")(train_command)
    app.command("eval")(eval_command)
