"""A quantized base under the LoRA adapter: ``--quantize none|int8|int4|nf4``.

- ``int8`` / ``int4``: optimum-quanto weight-only quantization (qint8 / qint4, per-channel scales) of the language
  model's linear layers, on CPU or GPU. Activations stay in the model dtype. qint4 builds a C++ extension on its
  first use (measured: about 5 minutes on a busy 2-core machine, then cached with the package).
- ``nf4``: bitsandbytes 4-bit NormalFloat with double quantization and bf16 compute, applied while loading (QLoRA).
  CUDA only: bitsandbytes' 4-bit CPU path is not the standard QLoRA path (DESIGN section 4), so on CPU it is a
  ValueError that points to int8/int4.

Only the text decoder is quantized. The vision tower and the connector stay in full precision (they are run once
per input and are sensitive to quantization), and so does ``lm_head``: the fused log-prob kernel reads its weight
directly. LoRA then wraps the quantized q/k/v/o projections (peft treats quanto's ``QLinear``, an ``nn.Linear``
subclass, as a linear layer and bitsandbytes' ``Linear4bit`` through its own dispatcher); only LoRA trains.

Deviation: QLoRA's ``prepare_model_for_kbit_training`` is not called: it upcasts norms and enables input grads for
gradient checkpointing, neither of which ttrv-edge uses.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "QUANTIZE_MODES",
    "check_loaded",
    "check_quantize",
    "is_quantized",
    "load_kwargs",
    "quantize_text_model",
]

QUANTIZE_MODES = ("none", "int8", "int4", "nf4")
SKIP_MODULES = ("lm_head", "vision_model", "visual", "vision_tower", "connector", "multi_modal_projector", "merger")
"""Module names never quantized (bitsandbytes' ``llm_int8_skip_modules``); quanto only ever sees the text model."""


def check_quantize(mode: str, device: torch.device | str) -> None:
    """ValueError (naming --quantize) when ``mode`` is unknown, or cannot run on ``device`` with what is installed."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    device = torch.device(device)
    if mode == "nf4":
        if device.type != "cuda":
            raise ValueError("--quantize nf4 (bitsandbytes 4-bit) needs a CUDA GPU; on CPU use --quantize int8 or int4")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("--quantize nf4 needs bitsandbytes: pip install bitsandbytes")
    if mode in ("int8", "int4") and importlib.util.find_spec("optimum.quanto") is None:
        raise ValueError(f"--quantize {mode} needs optimum-quanto: pip install 'ttrv-edge[quant]'")


def load_kwargs(mode: str, device: torch.device | str, dtype: torch.dtype) -> dict:
    """Extra ``from_pretrained`` keyword arguments for ``mode`` (only nf4 quantizes while loading)."""
    if mode != "nf4":
        return {}
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=list(SKIP_MODULES),
    )
    return {"quantization_config": config, "device_map": {"": str(torch.device(device))}}


def text_model(model) -> torch.nn.Module:
    """The language model (decoder stack, no lm_head) of a VLM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if isinstance(decoder, torch.nn.Module) and decoder is not model:
        return decoder
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for name in ("language_model", "text_model"):
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"--quantize: cannot find the language model of {type(model).__name__}")


def quantize_text_model(model, mode: str):
    """Quantize the language model's linear weights of ``model`` (a transformers VLM, before LoRA) in place.

    ``none`` and ``nf4`` (done while loading) return the model unchanged. Returns the model.
    """
    if mode in ("none", "nf4"):
        return model
    from optimum.quanto import freeze, qint4, qint8, quantize

    decoder = text_model(model)
    quantize(decoder, weights=qint8 if mode == "int8" else qint4)
    freeze(decoder)  # replace the float weights by their quantized storage now, not at the first forward
    return model


def is_quantized(model) -> bool:
    """Whether any weight of ``model`` is quantized (a quanto tensor or a bitsandbytes parameter subclass)."""
    return any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in model.parameters())


def check_loaded(model, mode: str) -> None:
    """ValueError when a config asks for ``mode`` but ``model`` was loaded without it (a silent full-precision
    run would break the memory budget it was chosen for)."""
    if mode != "none" and not is_quantized(model):
        raise ValueError(
            f"--quantize {mode}: the model was loaded unquantized; load it with load_vlm(..., quantize={mode!r})"
        )
