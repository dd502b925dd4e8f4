"""A quantized base under the LoRA adapter: ``--quantize none|int8|int4|nf4``.

- ``int8`` / ``int4``: optimum-quanto weight-only quantization (qint8 / qint4, per-channel scales) of the language
  model's linear layers, on CPU or GPU. Activations stay in the model dtype. qint4 builds a C++ extension on its
  first use (measured: about 5 minutes on a busy 2-core machine, then cached with the package).
- ``nf4``: bitsandbytes 4-bit NormalFloat with double quantization and bf16 compute, applied while loading (QLoRA).
  CUDA only: bitsandbytes' 4-bit CPU path is not the standard QLoRA path, so on CPU it is a
  ValueError that points to int8/int4.

Only the text decoder is quantized. The vision tower and the connector stay in full precision (they are run once
per input and are sensitive to quantization), and so does ``lm_head``: the fused log-prob kernel reads its weight
directly. LoRA then wraps the quantized q/k/v/o projections (peft treats quanto's ``QLinear``, an ``nn.Linear``
subclass, as a linear layer and bitsandbytes' ``Linear4bit`` through its own dispatcher); only LoRA trains.

Deviations: QLoRA's ``prepare_model_for_kbit_training`` is not called: it upcasts norms and enables input grads for
gradient checkpointing, neither of which ttrv-edge uses. And quanto's linear saves its input for a weight gradient
even when the weight is frozen, which on the SmolVLM-256M architecture made an int8 loss forward keep ~0.45 GB more
activations than fp32 (measured). The language model's quantized linears are therefore switched to
``FrozenQuantizedLinear``, whose backward needs only the weight (dequantized layer by layer): input gradient only.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import sys

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
    frozen = _frozen_class()
    for module in decoder.modules():
        if type(module).__name__ == "QLinear":
            module.__class__ = frozen  # same state, a backward that keeps no input (see the module docstring)
    _detach_from_checkpoint_file(model)
    release_freed_memory()
    return model


def _detach_from_checkpoint_file(model) -> None:
    """Copy the unquantized CPU tensors out of the safetensors file mapping, so that the mapping (and the float
    text weights read through it while quantizing) leaves the process. Without this the int8 model's RSS kept the
    whole float file mapped (measured on the SmolVLM-256M architecture: 1.59 GB RSS for int8 vs 1.47 GB for fp32
    with every weight touched; 1.18 GB with the copy)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


class _InputGradOnly(torch.autograd.Function):
    """``module(x)`` for a frozen quantized linear: nothing saved but the module; grad = gO @ dequantized W."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        with torch.no_grad():
            return module.quantized_forward(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.module.qweight.dequantize().to(grad.dtype)
        return grad.matmul(weight), None


_FROZEN: dict[str, type] = {}


def _frozen_class() -> type:
    """``FrozenQuantizedLinear``: quanto's ``QLinear`` with an input-gradient-only backward (built lazily, since
    optimum-quanto is optional)."""
    if "cls" not in _FROZEN:
        from optimum.quanto import QLinear

        class FrozenQuantizedLinear(QLinear):
            def quantized_forward(self, x):
                return QLinear.forward(self, x)

            def forward(self, x):
                if torch.is_grad_enabled() and x.requires_grad and not self.weight.requires_grad:
                    return _InputGradOnly.apply(x, self)
                return self.quantized_forward(x)

        _FROZEN["cls"] = FrozenQuantizedLinear
    return _FROZEN["cls"]


def release_freed_memory() -> None:
    """Hand the freed float weights back to the OS (glibc keeps freed heap memory in the process)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


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
