"""Load a vision-language model and its processor, attach LoRA to the language model only.

What this module guarantees to the rest of ttrv-edge:

- ``load_vlm`` returns a ``LoadedVLM`` whose ``model`` is a ``peft.PeftModel`` with LoRA on the q/k/v/o projections of
  the text model only (checked: no LoRA module inside a vision tower or connector), every other parameter frozen,
  ``model.eval()`` set. With LoRA the reference policy of GRPO is the same model with the adapter disabled
  (``with model.disable_adapter(): ...``), so no second copy of the weights exists.
- ``backbone_hidden_states`` runs the VLM's inner model (vision tower + connector + text model, final norm included)
  and returns the last hidden states without computing logits, so the fused lm_head+log-prob kernel can project
  them chunk by chunk: ``lm_head(model)(backbone_hidden_states(model, **inputs))`` equals the model's logits.
- ``trust_remote_code`` reaches transformers only from the caller's argument.

Deviations and traps handled here:

- Qwen2-VL (and Qwen2.5-VL) processors own a video processor that needs torchvision, which is not installed on CPU
  machines (DESIGN section 4). ``load_processor`` rebuilds such a processor from its image processor and tokenizer
  with the video part dropped; videos are not supported by ttrv-edge anyway.
- transformers 5.24's Qwen2-VL needs ``mm_token_type_ids`` to compute its 3-D rope positions. ``prompt_inputs``
  keeps it when the forward accepts it, and ``backbone_hidden_states`` extends it with zeros (text) when completion
  tokens were appended to the prompt, or derives it from the image token when missing.
"""

from __future__ import annotations

import inspect
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "LORA_TARGET_REGEX",
    "LoadedVLM",
    "backbone_hidden_states",
    "load_lora_state",
    "load_processor",
    "load_vlm",
    "lm_head",
    "lora_state",
    "policy_generation_config",
    "resolve_model_path",
    "sequence_inputs",
]

LORA_TARGET_REGEX = (
    r".*(language_model|text_model)\.(layers|h|blocks)\.\d+\.(self_attn|attn)\.(q_proj|k_proj|v_proj|o_proj)"
)
# Module-name fragments that mark the vision side of a VLM; a LoRA module there is a bug.
VISION_MARKERS = ("vision", "visual", "connector", "multi_modal_projector", "mm_projector", "merger", "image_newline")
TINY_NAMES = {"tiny": "idefics3", "tiny-idefics3": "idefics3", "tiny-qwen2-vl": "qwen2_vl", "tiny-qwen2_vl": "qwen2_vl"}
# Processors whose video half needs torchvision; they are rebuilt image-only when AutoProcessor cannot load them.
VIDEO_PROCESSOR_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")


@dataclass
class LoadedVLM:
    """A VLM with a LoRA adapter, its processor and tokenizer."""

    model: Any  # peft.PeftModel
    processor: Any
    tokenizer: Any
    name: str

    def prompt_inputs(self, image, prompt: str):
        """Inputs for one user turn (the image, then ``prompt``) with the assistant generation prompt appended.

        Returns a ``BatchFeature`` with batch size 1 on the model's device, holding only the keys the model's
        forward/generate accept (input_ids, attention_mask, pixel_values and pixel_attention_mask or image_grid_thw,
        plus mm_token_type_ids on transformers versions whose Qwen2-VL needs it). Pixel values use the model dtype.
        """
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        batch = self.processor(images=[image], text=[text], return_tensors="pt")
        accepted = _forward_params(self.model)
        for key in list(batch.keys()):
            if key not in accepted:
                del batch[key]
        batch = batch.to(self.device)
        for key in ("pixel_values",):
            if key in batch and batch[key].is_floating_point():
                batch[key] = batch[key].to(self.dtype)
        return batch

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a completion: the generation config's EOS ids, then the tokenizer's."""
        ids: list[int] = []
        gen = getattr(_base(self.model), "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if value is None:
                continue
            for i in value if isinstance(value, (list, tuple)) else [value]:
                if int(i) not in ids:
                    ids.append(int(i))
        return ids

    @property
    def suppress_token_ids(self) -> list[int]:
        """Token ids a completion must never contain: image/video placeholders and markers (a sampled placeholder
        breaks the next forward: "image features and image tokens do not match"), and the pad token unless it is
        an EOS; plus any the checkpoint's generation config suppresses. ``load_vlm`` puts them in
        ``generation_config.suppress_tokens``; the sampler masks them and the loss adds the same -inf bias."""
        found = set(_suppress_ids(_base(self.model).config, self.processor, self.tokenizer, self.eos_token_ids))
        gen = getattr(_base(self.model), "generation_config", None)
        found.update(int(i) for i in (getattr(gen, "suppress_tokens", None) or []))
        return sorted(found)

    def logit_bias(self) -> torch.Tensor | None:
        """[V] bias added to the logits wherever log-probs are scored: lm_head's own bias (if any) plus -inf at the
        suppressed ids, so the loss scores tokens under the distribution the sampler drew them from. Cached."""
        head = lm_head(self.model)
        key = (head.weight.device, head.weight.dtype, tuple(self.suppress_token_ids))
        cached = getattr(self, "_logit_bias", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        bias = None if head.bias is None else head.bias.detach().clone()
        if key[2]:
            if bias is None:
                bias = torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device)
            bias[list(key[2])] = float("-inf")
        self._logit_bias = (key, bias)
        return bias

    @property
    def pad_token_id(self) -> int:
        """The padding id (the tokenizer's pad token, else the first EOS id)."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_token_ids[0]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return lm_head(self.model).weight.dtype


PLACEHOLDER_ATTRS = (
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "video_token_index",
    "vision_start_token_id",
    "vision_end_token_id",
    "fake_image_token_id",
    "global_image_token_id",
    "boi_token_id",
    "eoi_token_id",
)


# Generation-config fields that add a logits processor or warper, with the value at which they do nothing. ttrv-edge
# samples from softmax((logits + suppression bias) / T) and scores the sampled tokens under exactly that
# distribution; any of these would make the sampler differ from what the loss scores, so they are dropped.
UNMODELLED_GENERATION_FIELDS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": 0,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "watermarking_config": None,
}
_warned_generation: set[str] = set()


def policy_generation_config(original, eos_ids: list[int], suppress_ids: list[int], name: str):
    """The generation config ttrv-edge installs on a loaded model: EOS, padding and the suppressed token ids, and
    nothing else that changes the sampling distribution.

    transformers fills every field a ``generate`` call leaves unset from the model's own generation config, so a
    checkpoint's ``repetition_penalty`` or ``no_repeat_ngram_size`` would silently reach the sampler while the loss
    scores tokens under the plain softmax. The suppressed ids are modelled (the loss adds the same -inf bias); every
    other processor in ``UNMODELLED_GENERATION_FIELDS`` is dropped, and said once on stderr.
    """
    import sys

    from transformers import GenerationConfig

    ignored = {
        field: getattr(original, field, None)
        for field, neutral in UNMODELLED_GENERATION_FIELDS.items()
        if getattr(original, field, None) not in (None, neutral) and getattr(original, field, None) != []
    }
    if ignored and name not in _warned_generation:
        _warned_generation.add(name)
        listed = ", ".join(f"{k}={v}" for k, v in sorted(ignored.items()))
        sys.stderr.write(
            f"ttrv-edge: {name}: ignoring generation_config settings it cannot score ({listed}); rollouts are "
            "sampled from softmax(logits / temperature) with image placeholders suppressed\n"
        )
    pad = original.pad_token_id if original.pad_token_id is not None else eos_ids[0] if eos_ids else None
    return GenerationConfig(
        bos_token_id=original.bos_token_id,
        eos_token_id=eos_ids or original.eos_token_id,
        pad_token_id=pad,
        suppress_tokens=suppress_ids or None,
    )


def _suppress_ids(config, processor, tokenizer, eos_ids: list[int]) -> list[int]:
    found: list[int] = []
    for source in (config, processor):
        for attr in PLACEHOLDER_ATTRS:
            found.append(getattr(source, attr, None))
    found.extend(getattr(processor, "row_col_ids", None) or [])
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        found.append(tokenizer.pad_token_id)
    vocab = _text_vocab_size(config, tokenizer)
    unk = tokenizer.unk_token_id
    ids = {int(i) for i in found if isinstance(i, int) and 0 <= i < vocab and i not in eos_ids and i != unk}
    return sorted(ids)


def _text_vocab_size(config, tokenizer) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or len(tokenizer))


def _base(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _inner(model):
    """The VLM's inner model (vision tower + connector + text model, no lm_head)."""
    base = _base(model)
    inner = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if inner is None or inner is base:
        raise TypeError(f"{type(base).__name__} has no inner model under .{base.base_model_prefix}")
    return inner


def _forward_params(model) -> set[str]:
    return set(inspect.signature(_base(model).forward).parameters)


def lm_head(model) -> torch.nn.Linear:
    """The output projection ([V, H] weight, tied or not), through a peft wrapper if any."""
    head = _base(model).get_output_embeddings()
    head = getattr(head, "base_layer", head)  # a LoRA-wrapped head: its frozen projection
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"expected an nn.Linear output projection, got {type(head).__name__}")
    return head


def backbone_hidden_states(model, **inputs) -> torch.Tensor:
    """Last-layer hidden states [B, L, H] of the inner model (no logits), with LoRA active.

    ``inputs`` are what the model's forward takes (input_ids, attention_mask, pixel_values, ...). For Qwen2-VL the
    inner model computes the 3-D rope positions from input_ids and image_grid_thw; an ``mm_token_type_ids`` shorter
    than input_ids (prompt only, completions appended) is extended with zeros.
    """
    inputs = {k: v for k, v in inputs.items() if v is not None}
    inner = _inner(model)
    params = set(inspect.signature(inner.forward).parameters)
    if "mm_token_type_ids" in params and "image_grid_thw" in inputs and "input_ids" in inputs:
        inputs["mm_token_type_ids"] = _mm_token_types(model, inputs["input_ids"], inputs.get("mm_token_type_ids"))
    else:
        inputs.pop("mm_token_type_ids", None)
    inputs.pop("logits_to_keep", None)
    out = inner(**inputs, use_cache=False, return_dict=True)
    return out.last_hidden_state


def sequence_inputs(prompt_inputs, sequences: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """Forward inputs for ``sequences`` [B, P + T] = one prompt (batch 1, from ``prompt_inputs``) + B completions.

    Image tensors are repeated B times along dim 0 (this holds for Idefics3's [1, n, C, H, W] pixels and for
    Qwen2-VL's [patches, D] pixels with [n, 3] grids), ``mm_token_type_ids`` is extended with zeros. The image is
    re-encoded per row; the frozen vision tower makes that wasteful but exact.
    """
    batch = sequences.shape[0]
    out = {"input_ids": sequences}
    out["attention_mask"] = torch.ones_like(sequences) if attention_mask is None else attention_mask
    for key, value in prompt_inputs.items():
        if key in ("input_ids", "attention_mask") or not torch.is_tensor(value):
            continue
        if key == "mm_token_type_ids":
            pad = value.new_zeros(value.shape[0], sequences.shape[1] - value.shape[1])
            out[key] = torch.cat([value, pad], dim=1).repeat(batch // value.shape[0], 1)
        else:
            out[key] = value.repeat(batch, *([1] * (value.dim() - 1)))
    return out


def _mm_token_types(model, input_ids: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
    if types is None:
        config = _base(model).config
        image_id = getattr(config, "image_token_id", None)
        return (input_ids == image_id).to(torch.int32) if image_id is not None else torch.zeros_like(input_ids)
    missing = input_ids.shape[1] - types.shape[1]
    if missing > 0:
        types = torch.cat([types, types.new_zeros(types.shape[0], missing)], dim=1)
    if types.shape[0] != input_ids.shape[0] and types.shape[0] == 1:
        types = types.expand(input_ids.shape[0], -1)
    return types


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


def resolve_model_path(name_or_path: str) -> str:
    """Map "demo" to the packaged demo model and the tiny aliases to their built directory; check local paths; pass
    hub ids through."""
    if name_or_path == "demo":
        from ..demo import demo_model_dir

        return str(demo_model_dir())
    if name_or_path in TINY_NAMES:
        from .tiny import ensure_tiny_vlm

        return str(ensure_tiny_vlm(TINY_NAMES[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model: {name_or_path} is a file; expected a model directory or a hub id")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model: {name_or_path} has no config.json; is it a transformers model directory?")
        return str(path)
    if HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise ValueError(f"--model: {name_or_path} is neither an existing directory nor a hub id (owner/name)")


def _model_type(path: str) -> str | None:
    config = Path(path) / "config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("model_type")
    return None


def _image_only(processor_cls):
    """A subclass of ``processor_cls`` without its video processor (which needs torchvision)."""

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs
            )
            self.video_processor = None

    ImageOnlyProcessor.__name__ = processor_cls.__name__
    ImageOnlyProcessor.__qualname__ = processor_cls.__qualname__
    return ImageOnlyProcessor


def _processor_from_parts(path: str, model_type: str, trust_remote_code: bool):
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg_file = Path(path) / "processor_config.json"
    cls_name = json.loads(cfg_file.read_text()).get("processor_class") if cfg_file.is_file() else None
    if cls_name is None:
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

        cls_name = PROCESSOR_MAPPING_NAMES.get(model_type)
    processor_cls = getattr(transformers, cls_name or "", None)
    if processor_cls is None:
        raise ValueError(f"--model: no processor class for model type {model_type!r}")
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    template_file = Path(path) / "chat_template.jinja"
    template = template_file.read_text() if template_file.is_file() else getattr(tokenizer, "chat_template", None)
    return _image_only(processor_cls)(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


def load_processor(path, trust_remote_code: bool = False):
    """The model's processor (image processor + tokenizer + chat template), video part dropped where it needs
    torchvision (Qwen2-VL family)."""
    from transformers import AutoProcessor

    path = str(path)
    model_type = _model_type(path)
    if model_type in VIDEO_PROCESSOR_TYPES and not _has_torchvision():
        return _processor_from_parts(path, model_type, trust_remote_code)
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, AttributeError, ValueError, TypeError):
        if model_type not in VIDEO_PROCESSOR_TYPES:
            raise
        return _processor_from_parts(path, model_type, trust_remote_code)


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def _default_device(device: str | None) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _default_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_base(path: str, dtype: torch.dtype, trust_remote_code: bool, **extra):
    from transformers import AutoModelForImageTextToText

    try:
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model: cannot load {path} as an image-text-to-text model ({first})") from exc


def _check_lora_placement(model) -> list[str]:
    names = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]
    if not names:
        raise ValueError("--model: found no language-model attention projections (q/k/v/o_proj) to attach LoRA to")
    bad = [n for n in names if any(marker in n for marker in VISION_MARKERS)]
    if bad:
        raise ValueError(f"--model: LoRA would touch the vision side ({bad[0]}); only the language model is adapted")
    return names


def _attach_lora(base, lora_rank: int, lora_alpha: int | None, lora_dropout: float, adapter: str | None):
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


def load_vlm(
    name_or_path: str,
    *,
    lora_rank: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    adapter: str | None = None,
    quantize: str = "none",
) -> LoadedVLM:
    """Load an image-text-to-text model from a directory, a hub id, or "tiny"/"tiny-qwen2-vl", with LoRA attached.

    LoRA (rank ``lora_rank``, alpha ``2 * lora_rank`` unless given) goes on the q/k/v/o projections of the language
    model; ``adapter`` loads a saved peft adapter directory instead. Everything else is frozen. dtype defaults to
    fp32 on CPU and bf16 on CUDA; the model is in eval mode. ``quantize`` ("int8"/"int4": optimum-quanto, "nf4":
    bitsandbytes on CUDA) quantizes the language model's base weights before LoRA is attached; the vision tower and
    lm_head stay unquantized (see ttrv_edge/quantize.py).
    """
    from .quantize import check_quantize, load_kwargs, quantize_text_model

    path = resolve_model_path(name_or_path)
    dev = _default_device(device)
    check_quantize(quantize, dev)
    dtype = _default_dtype(dtype, dev)
    base = _load_base(path, dtype, trust_remote_code, **load_kwargs(quantize, dev, dtype))
    try:
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model: cannot load the processor of {path} ({first})") from exc
    tokenizer = getattr(processor, "tokenizer", processor)
    if base.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    for p in base.parameters():
        p.requires_grad_(False)
    if quantize in ("int8", "int4"):
        quantize_text_model(base.to(dev), quantize)
    eos = LoadedVLM(base, processor, tokenizer, name_or_path).eos_token_ids
    suppress = set(base.generation_config.suppress_tokens or []) | set(
        _suppress_ids(base.config, processor, tokenizer, eos)
    )
    base.generation_config = policy_generation_config(base.generation_config, eos, sorted(suppress), name_or_path)
    model = _attach_lora(base, lora_rank, lora_alpha, lora_dropout, adapter)
    _check_lora_placement(model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    if quantize != "nf4":  # bitsandbytes placed the nf4 model while loading
        model.to(dev)
    model.eval()
    return LoadedVLM(model=model, processor=processor, tokenizer=tokenizer, name=name_or_path)
