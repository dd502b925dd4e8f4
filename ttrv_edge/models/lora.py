"""What TTRV trains (LoRA on the language model, the vision side, or both; the vision tower's norms), attaching it,
checking where it landed, copying its weights in and out.

``lora_targets`` picks the LoRA modules (``lora_target_modules``):

- ``"language"`` (the paper's): the q/k/v/o projections of the text model (``LORA_TARGET_REGEX``);
- ``"vision"``: the attention projections of the vision tower (``VISION_ATTENTION_REGEX``: SigLIP's q/k/v/out_proj,
  Qwen2-VL's fused qkv and proj) and every linear layer of the connector/projector (``CONNECTOR_MARKERS``: Idefics3's
  connector, Qwen2-VL's merger, LLaVA's multi_modal_projector);
- ``"all"``: both; ``"none"``: no LoRA, only with ``train_norms``.

``train_norms`` also trains the affine weight and bias of every LayerNorm (or RMSNorm) inside the vision tower,
TENT-style, as peft ``modules_to_save``: a trainable copy of each norm beside the frozen original, saved in the
adapter's safetensors file, switched off by ``disable_adapter`` and merged by ``merge_and_unload`` like the LoRA
deltas. ``check_lora_placement`` then refuses a model whose LoRA modules or trainable norms are anywhere else. With
LoRA the reference policy of GRPO is the same model with the adapter disabled (``with model.disable_adapter():``),
so no second copy of the weights exists.

``lora_state`` / ``load_lora_state`` copy every adapted parameter (LoRA factors and trainable norms:
``is_adapted_param``) exactly (reset, rollback, checkpoints); a ``Snapshot`` adds the optimizer state, for undoing a
non-finite update and for the collapse guard's rollback.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CONNECTOR_MARKERS",
    "LORA_TARGETS",
    "LORA_TARGET_REGEX",
    "VISION_ATTENTION_REGEX",
    "VISION_MARKERS",
    "Snapshot",
    "adapted_parts",
    "adapted_targets",
    "attach_lora",
    "check_lora_placement",
    "is_adapted_param",
    "load_lora_state",
    "lora_state",
    "lora_target_modules",
    "restore_snapshot",
    "take_snapshot",
    "vision_norm_modules",
]

LORA_TARGETS = ("language", "vision", "all", "none")
LORA_TARGET_REGEX = (
    r".*(language_model|text_model)\.(layers|h|blocks)\.\d+\.(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj)"
)
VISION_ATTENTION_REGEX = (
    r".*(vision_model|visual|vision_tower)\.(encoder\.layers|encoder\.layer|layers|blocks)\.\d+\."
    r"(self_attn|attn|attention)\.(q_proj|k_proj|v_proj|out_proj|o_proj|qkv|proj|projection_layer)"
)
# Module names whose linear layers map vision features into the text model ("vision" LoRA covers all of them).
CONNECTOR_MARKERS = ("connector", "multi_modal_projector", "mm_projector", "merger")
# Module-name fragments that mark the vision side of a VLM.
VISION_MARKERS = ("vision", "visual", "connector", "multi_modal_projector", "mm_projector", "merger", "image_newline")
VISION_TOWER_NAMES = ("vision_model", "visual", "vision_tower")
NORM_TYPES = ("LayerNorm", "RMSNorm")
DUMMY_TARGETS = "dummy-target-modules"  # peft's target_modules for an adapter without LoRA layers


def _on_vision_side(name: str) -> bool:
    return any(marker in name for marker in VISION_MARKERS)


def is_adapted_param(name: str) -> bool:
    """Whether a parameter of the peft model is trained: a LoRA factor or a trainable norm copy (modules_to_save).

    By name, not ``requires_grad``: peft's ``disable_adapter`` flips ``requires_grad`` of the norm copies."""
    return "lora_" in name or ".modules_to_save." in name


def _is_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear)


def lora_target_modules(base, lora_targets: str) -> str | list[str]:
    """peft ``target_modules`` for ``lora_targets``: the language regex for "language"; the full names of the
    matching linear layers otherwise (a connector's activations sit beside its linear layers)."""
    if lora_targets not in LORA_TARGETS:
        raise ValueError(f"--lora-targets must be one of {', '.join(LORA_TARGETS)}; got {lora_targets!r}")
    if lora_targets == "language":
        return LORA_TARGET_REGEX
    if lora_targets == "none":
        return DUMMY_TARGETS
    names = []
    for name, module in base.named_modules():
        if not _is_linear(module):
            continue
        vision = re.fullmatch(VISION_ATTENTION_REGEX, name) is not None
        vision |= any(part in CONNECTOR_MARKERS for part in name.split("."))
        if vision or (lora_targets == "all" and re.fullmatch(LORA_TARGET_REGEX, name)):
            names.append(name)
    if not any(_on_vision_side(n) for n in names):
        raise ValueError(
            f"--lora-targets {lora_targets}: found no vision attention projections or connector layers to attach "
            f"LoRA to"
        )
    return names


def vision_norm_modules(base) -> list[str]:
    """Full names of the LayerNorm/RMSNorm modules inside the vision tower (``train_norms``)."""
    names = [
        name
        for name, module in base.named_modules()
        if any(part in VISION_TOWER_NAMES for part in name.split(".")[:-1])
        and (isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(NORM_TYPES))
        and getattr(module, "weight", None) is not None
    ]
    if not names:
        raise ValueError("--train-norms: found no LayerNorm with an affine weight inside the vision tower")
    return names


def adapted_parts(model) -> tuple[list[str], list[str]]:
    """The names of the modules that carry LoRA, and of the norms trained as peft ``modules_to_save``."""
    lora = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]
    norms = [n for n, m in model.named_modules() if hasattr(m, "modules_to_save") and hasattr(m, "original_module")]
    return lora, norms


def adapted_targets(model) -> tuple[str, bool]:
    """What a (loaded) peft model adapts: its ``lora_targets`` value and whether it trains the vision norms."""
    lora, norms = adapted_parts(model)
    return _targets_of(lora), bool(norms)


def _targets_of(lora: list[str]) -> str:
    language = any(not _on_vision_side(n) for n in lora)
    vision = any(_on_vision_side(n) for n in lora)
    return {(True, True): "all", (True, False): "language", (False, True): "vision"}.get((language, vision), "none")


def check_lora_placement(model, lora_targets: str | None = "language", train_norms: bool | None = False) -> list[str]:
    """The names of the modules that carry LoRA; ValueError unless LoRA sits exactly on ``lora_targets`` and the
    trainable norms are the vision tower's exactly when ``train_norms``. ``None``: whatever a loaded adapter holds,
    as long as it is a valid combination."""
    lora, norms = adapted_parts(model)
    found = _targets_of(lora)
    if lora_targets is None:
        lora_targets = found
    if train_norms is None:
        train_norms = bool(norms)
    if found != lora_targets:
        if lora_targets == "language" and not lora:
            raise ValueError("--model: found no language-model attention projections (q/k/v/o_proj) to attach LoRA to")
        if lora_targets == "language":
            bad = next(n for n in lora if _on_vision_side(n))
            raise ValueError(
                f"--lora-targets language: LoRA would touch the vision side ({bad}); pass --lora-targets all"
            )
        raise ValueError(f"--lora-targets {lora_targets}: LoRA landed on {found!r} modules ({(lora or ['none'])[0]})")
    if lora_targets == "none" and not train_norms:
        raise ValueError("--lora-targets none trains nothing; it is allowed only with --train-norms")
    bad_norms = [n for n in norms if not _on_vision_side(n)]
    if bad_norms:
        raise ValueError(f"--train-norms: a trainable module sits outside the vision tower ({bad_norms[0]})")
    if bool(norms) != bool(train_norms):
        raise ValueError(
            "--train-norms: the model has trainable vision norms but --train-norms is off"
            if norms
            else "--train-norms: no vision norm was made trainable"
        )
    return lora


def attach_lora(
    base,
    lora_rank: int,
    lora_alpha: int | None,
    lora_dropout: float,
    adapter: str | None,
    lora_targets: str = "language",
    train_norms: bool = False,
):
    """``base`` wrapped in a ``peft.PeftModel``: a fresh LoRA (rank ``lora_rank``, alpha ``2 * lora_rank`` unless
    given) on ``lora_targets`` (plus the vision norms with ``train_norms``), or the saved adapter folder
    ``adapter``, trainable."""
    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing through a deprecated name
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return _attach_lora_quiet(base, lora_rank, lora_alpha, lora_dropout, adapter, lora_targets, train_norms)


def _attach_lora_quiet(base, lora_rank, lora_alpha, lora_dropout, adapter, lora_targets, train_norms):
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ValueError(f"--adapter: {adapter} has no adapter_config.json (expected a saved peft adapter dir)")
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    if lora_rank < 1:
        raise ValueError(f"--lora-rank: must be >= 1, got {lora_rank}")
    if lora_targets == "none" and not train_norms:
        raise ValueError("--lora-targets none trains nothing; it is allowed only with --train-norms")
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(base, lora_targets),
        modules_to_save=vision_norm_modules(base) if train_norms else None,
        bias="none",
    )
    return get_peft_model(base, config)


def _adapted_params(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if is_adapted_param(name)}


def lora_state(model) -> dict[str, torch.Tensor]:
    """A cloned copy of every adapted parameter, LoRA factors and trainable norms (for reset and snapshots)."""
    return {name: p.detach().clone() for name, p in _adapted_params(model).items()}


def load_lora_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``lora_state``) back into the adapted parameters, exactly."""
    params = _adapted_params(model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"LoRA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


@dataclass
class Snapshot:
    """The adapted weights (LoRA and trainable norms) and the optimizer state at one moment, deep copies."""

    lora: dict[str, torch.Tensor]
    optimizer: dict


def take_snapshot(model, optimizer: torch.optim.Optimizer) -> Snapshot:
    return Snapshot(lora_state(model), copy.deepcopy(optimizer.state_dict()))


def restore_snapshot(model, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> None:
    """Put the weights and optimizer state of ``snapshot`` back, exactly (the snapshot stays reusable)."""
    load_lora_state(model, snapshot.lora)
    optimizer.load_state_dict(copy.deepcopy(snapshot.optimizer))
