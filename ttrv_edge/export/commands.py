"""The ONNX CLI commands, registered on the main typer app by ``ttrv_edge.cli``: ``export`` and ``answer``.

``answer`` runs on onnxruntime only: neither this module nor what ``answer`` imports pulls in torch or transformers
(tests/test_export.py checks ``sys.modules`` after a run). ``export`` imports torch when it runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..cli_options import config_default
from ..io.answers import DEFAULT_QUESTION, Question, parse_options, read_labels

stderr = Console(stderr=True)


def export_command(
    adapter_dir: Annotated[Path, typer.Argument(help="A LoRA adapter folder saved by `ttrv-edge adapt --out`.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the ONNX graphs, processor files and manifest.json.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model folder, hub id, 'demo' or 'tiny'; default: the adapter's base when it is 'demo', 'tiny' "
            "or a local folder (adapter_config.json's base_model_name_or_path)."
        ),
    ] = None,
    int8: Annotated[bool, typer.Option(help="Also write dynamically quantized int8 graphs (*.int8.onnx).")] = False,
    quantize: Annotated[
        str,
        typer.Option(help="The base quantization the adapter was adapted on (adapt --quantize); dequantized to merge."),
    ] = config_default("quantize"),
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 18,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the model folder's own Python code to run. Only for models you trust.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and export ONNX graphs (vision encoder, decoder with KV cache)."""
    from .onnx import export_lines, export_onnx, export_summary

    model = model if model is not None else _built_in_base(adapter_dir)
    with stderr.status("exporting", spinner="dots") as status:
        manifest = export_onnx(
            adapter_dir,
            out_dir,
            model=model,
            int8=int8,
            quantize=quantize,
            opset=opset,
            trust_remote_code=trust_remote_code,
            log=status.update,
        )
    summary = export_summary(manifest, out_dir)
    if json_output:
        sys.stdout.write(json.dumps(summary) + "\n")
    else:
        for line in export_lines(summary):
            Console().print(line, markup=False, highlight=False, soft_wrap=True)


def answer_command(
    image: Annotated[
        list[Path], typer.Argument(help="The image file to answer about (several: one multi-image prompt).")
    ],
    onnx: Annotated[Path, typer.Option(help="A folder written by `ttrv-edge export` (runs on onnxruntime, no torch).")],
    question: Annotated[
        str | None,
        typer.Option(
            help=f"The question asked about the image; without it: {DEFAULT_QUESTION!r}, said on stderr.",
            show_default=False,
        ),
    ] = None,
    choices: Annotated[
        str | None, typer.Option(help="Comma-separated answer options; answers are their letters (A, B, ...).")
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="A text file of class labels, one per line.")] = None,
    numeric: Annotated[bool, typer.Option(help="The answer is a number.")] = False,
    int8: Annotated[bool, typer.Option(help="Use the int8 graphs written by `export --int8`.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated for the answer.")] = config_default(
        "max_new_tokens"
    ),
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: its default).")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Answer a question about IMAGE (several: one prompt) with an exported model on onnxruntime, greedy."""
    from ..runtime.runner import answer_report

    asked = Question(
        text=question or DEFAULT_QUESTION,
        choices=parse_options(choices, "--choices"),
        labels=read_labels(labels),
        numeric=numeric,
    )
    image = image[0] if len(image) == 1 else image
    report = answer_report(onnx, image, asked, int8=int8, max_new_tokens=max_new_tokens, threads=threads)
    if question is None:  # after answering, so that a user error stays the only line on stderr
        stderr.print(f"no --question given: asked {DEFAULT_QUESTION!r}", markup=False, highlight=False)
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    shown = report["display"] or report["answer"] or "(no answer found)"
    line = f"{shown}  (text: {report['text']!r}, {report['seconds']:.2f} s)"
    Console().print(line, markup=False, highlight=False, soft_wrap=True)


def _built_in_base(adapter_dir: Path) -> str | None:
    """The adapter's recorded base model when it is one built into ttrv-edge ("demo", "tiny" ...): adapters name it
    so rather than by the path it was loaded from (``io/adapter_dirs.py``)."""
    from ..io.adapter_dirs import BUILT_IN_MODELS

    try:
        recorded = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # export_onnx names what is wrong with the folder
    return recorded if recorded in BUILT_IN_MODELS else None


def register(app: typer.Typer) -> None:
    """Add ``export`` and ``answer`` to ``app``."""
    app.command("export")(export_command)
    app.command("answer")(answer_command)
