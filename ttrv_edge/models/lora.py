"""LoRA on the language model only: attaching it, checking where it landed, copying its weights in and out.

``attach_lora`` puts LoRA on the q/k/v/o projections of the text model (``LORA_TARGET_REGEX``), or loads a saved
peft adapter folder; ``check_lora_placement`` then refuses a model where a LoRA module sits inside a vision tower or
connector (``VISION_MARKERS``). With LoRA the reference policy of GRPO is the same model with the adapter disabled
(``with model.disable_adapter(): ...``), so no second copy of the weights exists.

``lora_state`` / ``load_lora_state`` copy the LoRA weights exactly (reset, rollback); a ``Snapshot`` adds the
optimizer state, for undoing a non-finite update and for the collapse guard's rollback.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "LORA_TARGET_REGEX",
    "VISION_MARKERS",
    "Snapshot",
    "attach_lora",
    "check_lora_placement",
    "load_lora_state",
    "lora_state",
    "restore_snapshot",
    "take_snapshot",
]

LORA_TARGET_REGEX = (
    r".*(language_model|text_model)\.(layers|h|blocks)\.\d+\.(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj)"
)
# Module-name fragments that mark the vision side of a VLM; a LoRA module there is a bug.
VISION_MARKERS = ("vision", "visual", "connector", "multi_modal_projector", "mm_projector", "merger", "image_newline")


def check_lora_placement(model) -> list[str]:
    """The names of the modules that carry LoRA; ValueError when there are none or one is on the vision side."""
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]
    if not names:
        raise ValueError("--model: found no language-model attention projections (q/k/v/o_proj) to attach LoRA to")
    bad = [n for n in names if any(marker in n for marker in VISION_MARKERS)]
    if bad:
        raise ValueError(f"--model: LoRA would touch the vision side ({bad[0]}); only the language model is adapted")
    return names


def attach_lora(base, lora_rank: int, lora_alpha: int | None, lora_dropout: float, adapter: str | None):
    """``base`` wrapped in a ``peft.PeftModel``: a fresh LoRA (rank ``lora_rank``, alpha ``2 * lora_rank`` unless
    given) on ``LORA_TARGET_REGEX``, or the saved adapter folder ``adapter``, trainable."""
    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing through a deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _attach_lora_quiet(base, lora_rank, lora_alpha, lora_dropout, adapter)


def _attach_lora_quiet(base, lora_rank: int, lora_alpha: int | None, lora_dropout: float, adapter: str | None):
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ValueError(f"--adapter: {adapter} has no adapter_config.json (expected a saved peft adapter dir)")
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    if lora_rank < 1:
        raise ValueError(f"--lora-rank: must be >= 1, got {lora_rank}")
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=LORA_TARGET_REGEX,
        bias="none",
    )
    return get_peft_model(base, config)


def lora_state(model) -> dict[str, torch.Tensor]:
    """A cloned copy of every LoRA parameter (for reset and snapshots)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``lora_state``) back into the LoRA parameters, exactly."""
    params = {name: p for name, p in model.named_parameters() if "lora_" in name}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"LoRA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


@dataclass
class Snapshot:
    """The LoRA weights and the optimizer state at one moment, deep copies."""

    lora: dict[str, torch.Tensor]
    optimizer: dict


def take_snapshot(model, optimizer: torch.optim.Optimizer) -> Snapshot:
    return Snapshot(lora_state(model), copy.deepcopy(optimizer.state_dict()))


def restore_snapshot(model, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> None:
    """Put the weights and optimizer state of ``snapshot`` back, exactly (the snapshot stays reusable)."""
    load_lora_state(model, snapshot.lora)
    optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
