"""``ttrv-edge-answer``: answer a question about an image with an exported model, on onnxruntime only.

    ttrv-edge-answer exported/ photo.jpg --question "Which shape is red?" --choices "circle,square" --json

The device entry point. It imports argparse, ``ttrv_edge.io.answers`` and, when it answers, ``runner`` (numpy,
pillow, tokenizers, jinja2, onnxruntime): never torch, transformers, peft, triton, typer or rich, so it runs from the
small ``ttrv-edge-runtime`` distribution (runtime-dist/) as well as from ``ttrv-edge``. Same options, output and
JSON document as ``ttrv-edge answer IMAGE --onnx DIR``; a bad option or input prints one line ``error: ...`` on
stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import __version__
from ..io.answers import DEFAULT_QUESTION, Question, parse_options, read_labels

__all__ = ["answer_line", "entry_point", "main", "question_from_options"]

EXIT_USAGE = 2


def question_from_options(text: str, choices: str | None, labels: Path | None, numeric: bool) -> Question:
    """The ``Question`` of the answer options: ``--choices`` comma-separated, ``--labels`` a file, ``--numeric``."""
    return Question(text=text, choices=parse_options(choices, "--choices"), labels=read_labels(labels), numeric=numeric)


def answer_line(report: dict) -> str:
    """The one line printed without ``--json``: the answer as displayed, the generated text and the seconds."""
    shown = report["display"] or report["answer"] or "(no answer found)"
    return f"{shown}  (text: {report['text']!r}, {report['seconds']:.2f} s)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors become the one-line ``error: ...`` of ``main``
        raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ttrv-edge-answer",
        description="Answer a question about IMAGE with a model exported by `ttrv-edge export` (onnxruntime, "
        "greedy decoding, no torch).",
    )
    parser.add_argument("onnx", type=Path, metavar="ONNX_DIR", help="a folder written by `ttrv-edge export`")
    parser.add_argument(
        "image", type=Path, nargs="+", metavar="IMAGE", help="the image file to answer about (several: one prompt)"
    )
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="the question asked about the image")
    parser.add_argument("--choices", help="comma-separated answer options; answers are their letters (A, B, ...)")
    parser.add_argument("--labels", type=Path, help="a text file of class labels, one per line")
    parser.add_argument("--numeric", action="store_true", help="the answer is a number")
    parser.add_argument("--int8", action="store_true", help="use the int8 graphs written by `export --int8`")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="most tokens generated (default: 16)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--version", action="version", version=f"ttrv-edge {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ttrv-edge-answer`` on ``argv`` (default: ``sys.argv[1:]``); the exit code (0, or 2 for a user error)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        question = question_from_options(args.question, args.choices, args.labels, args.numeric)
        from .runner import answer_report

        report = answer_report(
            args.onnx,
            args.image[0] if len(args.image) == 1 else args.image,
            question,
            int8=args.int8,
            max_new_tokens=args.max_new_tokens,
            threads=args.threads,
        )
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except ValueError as error:
        sys.stderr.write(f"error: {error}\n")
        return EXIT_USAGE
    sys.stdout.write((json.dumps(report) if args.json else answer_line(report)) + "\n")
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
