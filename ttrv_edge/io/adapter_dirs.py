"""Adapter folders as ttrv-edge writes them: which ``--out`` may be written, the base model's recorded name, the card.

- ``check_out_dir``: ``--out`` may be a new or empty folder, or an adapter folder (only the files ttrv-edge writes
  there), which is replaced; any other non-empty folder is refused unless ``--overwrite``. Checked before the model
  loads, so a run never ends by overwriting someone's folder.
- ``base_model_label``: the base model as the user named it ("demo", "tiny", a hub id, a local folder's name), what
  ``adapter_config.json`` records as ``base_model_name_or_path`` instead of the absolute path it was loaded from.
- ``model_card``: the adapter folder's README.md: base model, LoRA and TTRV settings, date, how to load it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..models.families import TINY_NAMES
from .checkpoints import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .images import display_name

__all__ = ["ADAPTER_FILES", "BUILT_IN_MODELS", "MODEL_CARD", "base_model_label", "check_out_dir", "model_card"]

MODEL_CARD = "README.md"
ADAPTER_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CARD})
"""Every file a saved adapter folder holds: a folder with nothing else is one ttrv-edge may replace."""
BUILT_IN_MODELS = ("demo", *TINY_NAMES)
CARD_SETTINGS = ("rollouts", "steps", "epochs", "batch_size", "lr", "temperature", "reward", "alpha", "seed")


def check_out_dir(out: Path, overwrite: bool = False) -> bool:
    """Whether writing the adapter to ``out`` replaces an adapter saved there before. Raises ValueError (naming
    ``--out``) for a file, or for a non-empty folder holding other files unless ``overwrite``."""
    out = Path(out)
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"--out: {display_name(out)} exists and is not a folder")
    names = {p.name for p in out.iterdir()}
    if not names:
        return False
    if ADAPTER_CONFIG in names and names <= ADAPTER_FILES:
        return True
    if overwrite:
        return ADAPTER_CONFIG in names
    raise ValueError(
        f"--out: {display_name(out)} is not empty and is not an adapter folder written by ttrv-edge; choose another "
        "folder or pass --overwrite to write the adapter files into it"
    )


def base_model_label(name: str) -> str:
    """How a saved adapter names its base model: "demo", "tiny" and hub ids as given; a local folder by its name."""
    if name in BUILT_IN_MODELS:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve().name
    return name


def model_card(base_model: str, settings: dict, lora: dict, mode: str | None, directory: str | Path) -> str:
    """The README.md of an adapter folder (Hugging Face model card with front matter)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    built_in = base_model in BUILT_IN_MODELS
    local = not built_in and "/" not in base_model
    model_arg = "PATH/TO/" + base_model if local else base_model
    shown = {k: settings[k] for k in CARD_SETTINGS if k in settings}
    what = {"episodic": "one image (episodic mode)", "transductive": "a set of inputs (transductive mode)"}
    lines = [
        "---",
        *([] if built_in or local else [f"base_model: {base_model}"]),
        "library_name: peft",
        "tags:",
        "- ttrv-edge",
        "- lora",
        "- test-time-adaptation",
        "---",
        "",
        f"# TTRV LoRA adapter for `{base_model}`",
        "",
        f"LoRA weights adapted without labels to {what.get(mode or '', 'its inputs')} by ttrv-edge {__version__} "
        "(TTRV: test-time reinforcement learning for vision-language models).",
        "",
        f"- Base model: `{base_model}`"
        + (" (built into ttrv-edge)" if built_in else " (a local folder: pass its path)" if local else " (hub id)"),
        f"- LoRA: rank {lora.get('r')}, alpha {lora.get('lora_alpha')}, on {_targets(lora.get('target_modules'))}",
        "- TTRV settings: " + ", ".join(f"{k}={v}" for k, v in shown.items()),
        f"- Saved: {when}",
        "",
        "## Load it",
        "",
        "```bash",
        f"ttrv-edge adapt IMAGE --model {model_arg} --adapter {directory} --question ...   # adapt further",
        f"ttrv-edge export {directory} exported/" + ("" if built_in else f" --model {model_arg}") + "   # ONNX",
        "```",
        "",
        "```python",
        "from ttrv_edge import TTRVModel",
        "",
        f'model = TTRVModel.from_pretrained("{model_arg}", adapter="{directory}")',
        "```",
        "",
        "It is a peft LoRA adapter (safetensors): `PeftModel.from_pretrained(base, DIR)` loads it on the base model.",
        "",
    ]
    return "\n".join(lines)


def _targets(modules) -> str:
    if isinstance(modules, str):  # a regular expression over module names
        return f"the modules matching `{modules}`"
    return ", ".join(sorted(modules or [])) or "no module (norms only)"
