"""The ``ttrv-edge`` command line.

Errors a user can fix (a bad option value, an unreadable image, a missing model) are printed as one line,
``error: ...``, on stderr with exit code 2 and no traceback. With ``--json`` stdout carries exactly one JSON
document; progress and logs go to stderr. ``adapt`` takes every TTRVConfig field as an option, generated from the
dataclass (``cli_options.py``); the other commands are registered from ``demo/commands.py`` and
``export/commands.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_options import config_options
from .config import TTRVConfig
from .demo.commands import register as register_demo_commands
from .doctor import register as register_doctor_command
from .export.commands import register as register_export_commands
from .io.answers import DEFAULT_QUESTION, Question, describe_answer, option_text, parse_options, read_labels

app = typer.Typer(
    name="ttrv-edge",
    help="Test-time reinforcement learning (TTRV) for small vision-language models: adapt a VLM to unlabeled "
    "images with LoRA, on a laptop CPU or one small GPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
stderr = Console(stderr=True)
EXIT_USAGE = 2
PROG = "ttrv-edge"


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"{PROG} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """ttrv-edge: label-free test-time adaptation of VLMs."""


@app.command()
@config_options()
def adapt(
    source: Annotated[
        Path,
        typer.Argument(
            help="An image file (episodic mode), a folder of images or a JSONL file of "
            '{"image", "question", "choices"} lines (transductive mode).'
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            help="Local model folder or hub id; 'demo' is the bundled demo model (trained on synthetic shape "
            "scenes, see ttrv_edge/demo); 'tiny' (= tiny-idefics3), tiny-smolvlm2, tiny-qwen2-vl, "
            "tiny-qwen2.5-vl, tiny-internvl and tiny-llava build a tiny random VLM of that family offline "
            "(a smoke test, its answers are noise). `ttrv-edge doctor MODEL` checks a model folder."
        ),
    ] = "demo",
    question: Annotated[
        str | None,
        typer.Option(
            help="The question asked about every image (and JSONL lines without one); without it: "
            f"{DEFAULT_QUESTION!r}, said on stderr.",
            show_default=False,
        ),
    ] = None,
    choices: Annotated[
        str | None, typer.Option(help="Comma-separated answer options; answers are their letters (A, B, ...).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="A text file of class labels, one per line; the answer is one "
            "of them (the paper's recognition setting)."
        ),
    ] = None,
    numeric: Annotated[bool, typer.Option(help="The answer is a number.")] = False,
    adapter: Annotated[Path | None, typer.Option(help="Start from this saved LoRA adapter folder.")] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder where the adapted LoRA adapter is saved (safetensors, adapter_config.json, README.md model "
            "card). An adapter saved there before is replaced (said on stderr); any other non-empty folder is "
            "refused unless --overwrite."
        ),
    ] = Path("ttrv-out"),
    overwrite: Annotated[
        bool, typer.Option(help="Write the adapter into --out even when it holds files that are not an adapter.")
    ] = False,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow the model folder's own Python code to run. Only for models you trust.")
    ] = False,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(help="Transductive mode: checkpoint the run in this folder (LoRA + optimizer state)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run checkpointed in --checkpoint-dir (start fresh if there is none).")
    ] = False,
    allow_outside_root: Annotated[
        bool,
        typer.Option(help="Let a JSONL file's (or folder's) image paths leave its folder: '..', absolute, symlinks."),
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
    **options,
) -> None:
    """Adapt a VLM to IMAGE (episodic) or to a folder / JSONL of images (transductive), then answer.

    Every TTRVConfig field is an option (the second panel), with its help text and default.
    """
    started = time.perf_counter()
    config = TTRVConfig(**options)
    if resume and checkpoint_dir is None:
        raise ValueError("--resume needs --checkpoint-dir (the folder of the run to continue)")
    default_question = Question(
        text=question or DEFAULT_QUESTION,
        choices=parse_options(choices, "--choices"),
        labels=read_labels(labels),
        numeric=numeric,
    )

    from .api import TTRVModel
    from .io.adapter_dirs import check_out_dir
    from .io.images import load_images
    from .io.inputs import collect_items
    from .rl import distributed

    skipped: list = []
    mode, items = collect_items(source, default_question, skipped, allow_outside_root)
    launch = distributed.launch_from_env()  # torchrun / accelerate launch: data-parallel (rl/distributed.py)
    if launch is not None and mode == "episodic":
        raise distributed.SharedError(
            "episodic mode (one image) runs in one process; under torchrun give a folder or a JSONL file "
            "(transductive), or run `ttrv-edge adapt IMAGE` without torchrun"
        )
    if mode == "episodic":
        load_images(items[0].image)  # a bad image fails before the model loads
    if mode == "episodic" and checkpoint_dir is not None:
        raise ValueError("--checkpoint-dir: only folder and JSONL runs (transductive mode) are checkpointed")
    replacing = check_out_dir(out, overwrite)  # before the model loads, too
    with distributed.joined(launch, teardown=False) as group:  # main() ends the ranks: distributed.leave
        main_rank = group.is_main  # rank 0 alone shows progress, writes the adapter and prints the results
        with stderr.status(f"loading {model}", spinner="dots") if main_rank else nullcontext():
            ttrv = TTRVModel.from_pretrained(
                model, config, adapter=str(adapter) if adapter else None, trust_remote_code=trust_remote_code
            )
        with _progress(main_rank) as bar:
            task = bar.add_task(f"TTRV {mode}", total=ttrv.work_units(mode, len(items)))
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            if mode == "episodic":
                asked = items[0].question
                result = ttrv.adapt(
                    items[0].image,
                    asked.text,
                    asked.choices,
                    asked.labels,
                    asked.numeric,
                    progress=advance,
                    save_to=out,
                )
                results = [result]
            else:
                results = ttrv.adapt_dataset(
                    items, progress=advance, skipped=skipped, checkpoint_dir=checkpoint_dir, resume=resume
                )
                ttrv.save_adapter(out)
        memory = ttrv.memory_report()  # ttrv_edge/memory/planner.py
        peaks = group.gather([memory["peak_memory_bytes"]])  # the planner works per rank
    if not main_rank:
        return
    for bad in skipped:
        stderr.print(f"skipped: {bad.reason}", markup=False, highlight=False, soft_wrap=True)
    if question is None:  # said after the run, so that a user error stays the only line on stderr
        _say_default_question(items)
    if replacing:
        _say(f"replaced the adapter saved before in {out}")
    report = {
        "model": model,
        "mode": mode,
        "items": [_with_answer_text(r.to_dict()) for r in results],
        "adapter_dir": str(out),
        "seconds": round(time.perf_counter() - started, 3),
    }
    report["peak_memory_bytes"] = memory["peak_memory_bytes"]
    report["micro_batches"] = {"sample": memory["sample_micro_batch"], "train": memory["train_micro_batch"]}
    report["memory"] = memory
    if mode == "transductive":
        report["skipped"] = [bad.to_dict() for bad in skipped]
        report["run"] = ttrv.run_info
    if group.enabled:
        report["run"]["distributed"]["peak_memory_bytes_per_rank"] = peaks
    if json_output:
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        _print_table(report)


def _say(line: str) -> None:
    stderr.print(line, markup=False, highlight=False, soft_wrap=True)


def _say_default_question(items: list) -> None:
    """One line on stderr when inputs are asked the default question because none was given."""
    defaulted = sum(item.question.text == DEFAULT_QUESTION for item in items)
    if defaulted:
        which = "" if defaulted == len(items) else f' ({defaulted} of {len(items)} inputs have no "question")'
        _say(f"no --question given: asked {DEFAULT_QUESTION!r}{which}")


def _with_answer_text(item: dict) -> dict:
    """An item's JSON with ``answer_text`` (the chosen option's text for a choice letter) beside each ``answer``."""
    for phase in ("before", "after"):
        if item.get(phase) is not None:
            item[phase]["answer_text"] = option_text(item[phase]["answer"], item["choices"])
    return item


def _progress(shown: bool = True) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        transient=True,
        disable=not shown,
    )


def _print_table(report: dict) -> None:
    table = Table(title=f"ttrv-edge {report['mode']} adaptation ({report['seconds']:.1f} s)")
    for column in ("image", "before", "after", "steps", "mean reward"):
        table.add_column(column)
    for item in report["items"]:
        rewards = [s["mean_reward"] for s in item["steps"] if s["mean_reward"] is not None]
        table.add_row(
            Path(item["image"]).name,
            _describe(item["before"], item["choices"]),
            _describe(item["after"], item["choices"]),
            str(sum(s["updated"] for s in item["steps"])),
            f"{sum(rewards) / len(rewards):.3f}" if rewards else "-",
        )
    Console().print(table)
    stderr.print(f"adapter saved to {report['adapter_dir']}")


def _describe(prediction: dict, choices: list[str] | None) -> str:
    top = next(iter(prediction["distribution"].items()), ("-", 0.0))
    return f"{describe_answer(prediction['answer'], choices)}  (samples: {top[0]} {top[1]:.0%})"


register_demo_commands(app)  # demo-train, eval (ttrv_edge/demo/commands.py)
register_export_commands(app)  # export, answer (ttrv_edge/export/commands.py)
register_doctor_command(app)  # doctor (ttrv_edge/doctor/command.py)


def _quiet_libraries() -> None:
    """Keep stderr for our own progress and errors: no weight-loading bars or deprecation chatter from libraries."""
    level = os.environ.get("TTRV_EDGE_LOG", "ERROR").upper()
    logging.basicConfig(level=level, stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", level.lower())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    if "transformers" not in sys.modules:  # it reads the two variables above when first imported (not by `answer`)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(getattr(logging, level, logging.ERROR))
    hf_logging.disable_progress_bar()


def _set_thread_policy(argv: list[str]) -> None:
    """OpenMP's wait policy, chosen before torch is imported; a value in the environment wins.

    Measured on 2 cores: for models of a few million parameters spinning threads (ACTIVE) made a step 3-4x slower
    when another process used a core, while PASSIVE cost nothing; for SmolVLM-256M-size models ACTIVE was ~2x
    faster. So PASSIVE for the built-in small models, OpenMP's default for the rest.
    """
    model = argv[argv.index("--model") + 1] if "--model" in argv[:-1] else "demo"
    if model == "demo" or (model.startswith("tiny") and not os.path.exists(model)):  # the built-in small models
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: runs the app and turns user errors into one line on stderr. A torchrun rank
    (a process group left open by ``adapt``) ends here through ``distributed.leave``."""
    code = _run(argv)
    if _distributed_open():
        from .rl.distributed import leave

        leave(code)
    return code


def _distributed_open() -> bool:
    """Whether this process is a torchrun rank whose process group is still open (``adapt`` leaves it open)."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is None or not torch_distributed.is_available() or not torch_distributed.is_initialized():
        return False
    from .rl import distributed

    return distributed.launch_from_env() is not None


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _set_thread_policy(argv)
    _quiet_libraries()
    if not argv:  # bare `ttrv-edge`: the help, not an empty usage error
        argv = ["--help"]
    try:
        code = app(args=argv, prog_name=PROG, standalone_mode=False)
    except typer.Exit as done:
        return done.exit_code
    except typer.Abort:
        stderr.print("aborted")
        return 130
    except typer.TyperException as error:  # usage errors: unknown option, a value of the wrong type
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        if not message.strip() and getattr(error, "ctx", None) is not None:  # a group called without a command
            print(error.ctx.get_help())
            return 0
        stderr.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except ValueError as error:
        _say_error(error)
        return EXIT_USAGE
    return code if isinstance(code, int) else 0


def _say_error(error: ValueError) -> None:
    """``error: ...`` on stderr. Under torchrun (RANK > 0) an error every rank raises alike (``SharedError``) is left
    to rank 0, and any other names its rank."""
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else "0"
    if rank != "0" and type(error).__name__ == "SharedError":
        return
    where = f"rank {rank}: " if rank != "0" else ""
    stderr.print(f"error: {where}{error}", markup=False, highlight=False, soft_wrap=True)


def entry_point() -> None:
    sys.exit(main())
