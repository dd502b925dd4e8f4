"""The ``ttrv-edge doctor`` command: the checks' report as a table (or ``--json``), one-line errors.

Registered on the main typer app by ``ttrv_edge.cli``; nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..cli_options import config_default
from .checks import diagnose

__all__ = ["doctor_command", "register", "rows"]


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _tokens(tokens: list[str], limit: int = 4) -> str:
    shown = ", ".join(tokens[:limit]) + (", ..." if len(tokens) > limit else "")
    return f"{shown} ({len(tokens)})" if tokens else "none"


def _plan_text(plan: dict, where: str) -> str:
    from ..memory import format_bytes

    if "sample_micro_batch" not in plan:
        return f"does not fit in {where}: one rollout needs about {format_bytes(plan['peak_bytes'])}"
    verdict = "fits in" if plan["fits"] else "does not fit in"
    rows = f"micro-batches sample {plan['sample_micro_batch']} / train {plan['train_micro_batch']}"
    return f"{format_bytes(plan['peak_bytes'])}, {verdict} {where} ({rows})"


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise ValueError(f"doctor: --image-size must be WIDTHxHEIGHT, such as 640x480; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def rows(report: dict) -> list[tuple[str, str]]:
    """(check, finding) rows of the table."""
    from ..memory import format_bytes

    family, params, lora = report["family"], report["parameters"], report["lora"]
    name = f"model_type {family['model_type']}: " + (family["name"] if family["tested"] else "not tested")
    found = [
        ("family", name),
        ("loaded as", f"{report['loaded_dtype']} on cpu (the checkpoint's dtype), {report['path']}"),
        (
            "parameters",
            f"{_count(params['total'])}: vision tower {_count(params['vision_tower'])}, connector "
            f"{_count(params['connector'])}, language model {_count(params['language_model'])}",
        ),
    ]
    for key in ("language", "vision"):
        found.append(
            (
                f"LoRA targets {key}",
                f"{lora[key]['modules']} modules, {_count(lora[key]['parameters'])} LoRA params at rank {lora['rank']}",
            )
        )
    image = report["image_tokens"]
    if image and "per_image" in image:
        w, h = image["probe_size"]
        text = f"{image['per_image']} at {w}x{h}"
        if not image["depends_on_size"]:
            text = f"{image['per_image']} (the same at {' and '.join(image['at_sizes'])})"
            if image["tiling"]:
                text += f"; {image['tiling']} is on: other image sizes may differ"
        else:
            others = ", ".join(f"{n} at {size}" for size, n in image["at_sizes"].items() if size != f"{w}x{h}")
            text += f"; depends on the image size ({image['tiling'] or 'processor resizing'}): {others}"
        found.append(("image tokens per image", text))
    found.append(("chat template", "yes" if report["chat_template"] else "no"))
    gen = report["generation"]
    ignored = ", ".join(f"{k}={v}" for k, v in sorted(gen["ignored"].items())) or "none"
    found.append(("generation config ignored", ignored))
    modelled = gen["modelled"]
    found.append(
        (
            "generation config modelled",
            f"eos {_tokens(modelled['eos_tokens'])}; suppressed {_tokens(modelled['suppressed_tokens'])}",
        )
    )
    found.append(("ONNX export", "supported" if report["export_supported"] else "not supported"))
    est = report["estimate"]
    if est is not None:
        shape = f"N={est['rollouts']} rollouts of {est['new_tokens']} tokens, {est['prompt_tokens']}-token prompt"
        found.append(("one step", f"{shape}, one image, LoRA on the language model"))
        machine = f"this machine's {format_bytes(est['cpu']['machine_memory_bytes'])} RAM"
        found.append(("  on CPU, fp32", _plan_text(est["cpu"], machine)))
        budget = format_bytes(est["gpu"]["budget_bytes"])
        found.append(("  on GPU, bf16", _plan_text(est["gpu"], budget)))
    found.append(("usable", "yes" if report["usable"] else "no: " + "; ".join(report["problems"])))
    return found


def doctor_command(
    model: Annotated[
        str,
        typer.Argument(
            help="A model folder (with config.json), a hub id (without a network: from the local Hugging Face "
            "cache), 'demo' or a tiny model name (tiny-idefics3, tiny-qwen2-vl, ...).",
            show_default=False,
        ),
    ],
    rollouts: Annotated[int, typer.Option(help="N, the rollouts of the step the memory estimate is for.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per rollout in the estimate.")] = config_default(
        "max_new_tokens"
    ),
    lora_rank: Annotated[int, typer.Option(help="LoRA rank of the LoRA parameter counts.")] = config_default(
        "lora_rank"
    ),
    gpu_budget: Annotated[
        str, typer.Option(help="GPU memory the bf16 estimate must fit (as --memory-budget).")
    ] = "6GB",
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the model folder's own Python code to run. Only for models you trust.")
    ] = False,
    image_size: Annotated[
        str, typer.Option(help="WIDTHxHEIGHT of the probe image the image tokens and the estimate are for.")
    ] = "640x480",
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document.")] = False,
) -> None:
    """Check a model without adapting it: what ttrv-edge makes of its family, parameters, processor and memory.

    Loads MODEL on the CPU in the checkpoint's own dtype (no forward pass, no LoRA attached) and reports:

    - family: the transformers model_type and its family name; a model_type ttrv-edge has no tests for is "not
      tested" (it may still work if it loads as an image-text-to-text model);
    - parameters: vision tower, connector (vision-side modules outside the tower) and language model (embeddings,
      decoder, lm_head), tied weights counted once;
    - LoRA targets: the modules --lora-targets language and --lora-targets vision put LoRA on, and the LoRA
      parameters at --lora-rank;
    - image tokens per image: counted in the prompt the processor builds for a probe image (--image-size, 640x480)
      at its saved settings; where splitting, tiles or dynamic resolution make it depend on the image, also for a
      probe of another shape (320x320; 640x480 when --image-size is a square);
    - chat template: whether the processor has one (adapt needs it to build prompts);
    - generation config ignored / modelled: the checkpoint's generation settings ttrv-edge drops (repetition
      penalty, top-k/top-p, ...: the loss could not score them) and the ones it applies (EOS, suppressed tokens);
    - ONNX export: whether `ttrv-edge export` supports the family;
    - one step: the memory planner's peak estimate of one episodic step (one image, N rollouts, views=1, LoRA on the
      language model, no --quantize): on this CPU in fp32 (this process's memory with the libraries loaded, before
      the model, + fp32 weights + the step; checked against this machine's RAM) and on a GPU in bf16 against
      --gpu-budget (tensor bytes, without the CUDA context), with the micro-batch sizes the planner would choose.

    Exit code 0 when the model is usable by adapt; otherwise one line, error: doctor: ..., and exit code 2.
    """
    report = diagnose(
        model,
        rollouts=rollouts,
        max_new_tokens=max_new_tokens,
        lora_rank=lora_rank,
        gpu_budget=gpu_budget,
        trust_remote_code=trust_remote_code,
        image_size=_size(image_size),
    )
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        table = Table(title=f"ttrv-edge doctor: {model}", show_header=True)
        table.add_column("check")
        table.add_column("finding", overflow="fold")
        for check, finding in rows(report):
            table.add_row(Text(check), Text(finding))
        console = Console(highlight=False)
        (console if console.is_terminal else Console(highlight=False, width=120)).print(table)
    if not report["usable"]:
        raise ValueError(f"doctor: {model} is not usable by ttrv-edge: {'; '.join(report['problems'])}")


def register(app: typer.Typer) -> None:
    """Add ``doctor`` to ``app``."""
    short = "Check a model without adapting it: family, parameters, image tokens, memory of one step."
    app.command("doctor", short_help=short)(doctor_command)
