"""Merge a TTRV LoRA adapter into its base model: find the base, hash the adapter, dequantize, add the deltas.

Whatever the adapter trains is merged: LoRA deltas on the language model, the vision tower and the connector
(``--lora-targets``), and the trained copies of the vision norms (``--train-norms``: peft ``modules_to_save``), which
replace the original norms.

Deviation: a quantized base (optimum-quanto, torchao, bitsandbytes) is dequantized to fp32 before the merge, so the
merged weights are the dequantized base the adapter was trained against plus the LoRA delta.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

__all__ = ["adapter_sha256", "base_model_for", "dequantize_model", "merge_lora"]


def base_model_for(adapter_dir: str | Path, model: str | None = None) -> str:
    """The base model to merge into: ``model`` when given, else the adapter's base_model_name_or_path when that is
    a local directory (the tiny models and any local folder qualify; hub ids need ``--model``)."""
    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(
            f"ADAPTER_DIR: {adapter_dir} has no adapter_config.json (save one with `ttrv-edge adapt --out`)"
        )
    if model is not None:
        return model
    recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not recorded:
        raise ValueError("--model: the adapter does not record its base model; pass --model")
    if not Path(recorded).is_dir():
        raise ValueError(f"--model: the adapter's base model {recorded!r} is not a local folder; pass --model")
    return recorded


def adapter_sha256(adapter_dir: str | Path) -> dict:
    """sha256 of the adapter's weight file (and its config), as recorded in the manifest."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"ADAPTER_DIR: {adapter_dir} has no adapter_model.safetensors (peft safetensors format)")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    return {
        "file": weights.name,
        "sha256": digest(weights),
        "config_sha256": digest(adapter_dir / "adapter_config.json"),
    }


def dequantize_model(model) -> int:
    """Replace every quantized linear layer (optimum-quanto, torchao, bitsandbytes) by an fp32 ``nn.Linear`` holding
    its dequantized weight, in place. Returns the number of layers replaced (0 for an fp32 model)."""
    replaced = 0
    for name, module in list(model.named_modules()):
        weight = _dequantized_weight(module)
        if weight is None:
            continue
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.float())
            if module.bias is not None:
                linear.bias.copy_(module.bias.detach().float())
        linear.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced += 1
    return replaced


def _dequantized_weight(module) -> torch.Tensor | None:
    if next(module.children(), None) is not None:  # only leaves: a peft LoRA wrapper forwards .weight to its base
        return None
    if type(module) is torch.nn.Linear and not _is_quantized(module.weight):
        return None
    qweight = getattr(module, "qweight", None)  # optimum-quanto QLinear
    if qweight is not None and hasattr(qweight, "dequantize"):
        return qweight.dequantize().detach()
    weight = getattr(module, "weight", None)
    if weight is None or not hasattr(module, "in_features"):
        return None
    if type(weight).__name__ in ("Params4bit", "Int8Params"):  # bitsandbytes
        import bitsandbytes.functional as bnb_f

        if type(weight).__name__ == "Params4bit":
            return bnb_f.dequantize_4bit(weight.data, weight.quant_state).detach()
        scale = getattr(module.state, "SCB", None) if hasattr(module, "state") else None
        return (weight.data.float() * scale.float()[:, None] / 127.0).detach() if scale is not None else None
    if _is_quantized(weight):  # torchao and other tensor subclasses
        return weight.dequantize().detach()
    return None


def _is_quantized(weight) -> bool:
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize")


def merge_lora(peft_model):
    """The transformers model with every LoRA delta added into its base weights (scale alpha / r included) and the
    trained norm copies in place of the originals, the peft wrappers removed. A quantized base is dequantized first.
    The peft model is consumed."""
    dequantize_model(peft_model)
    with torch.no_grad():
        merged = peft_model.merge_and_unload(safe_merge=True)
    return merged.eval()
