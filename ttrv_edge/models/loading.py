"""Load a vision-language model and its processor, with LoRA attached (by default to the language model only).

What ``load_vlm`` guarantees to the rest of ttrv-edge: it returns a ``LoadedVLM`` whose ``model`` is a
``peft.PeftModel`` with LoRA exactly on ``lora_targets`` (default: the q/k/v/o projections of the text model) and,
with ``train_norms``, trainable copies of the vision tower's norms (``models/lora.py`` checks both), every other
parameter frozen, ``model.eval()`` set; and ``trust_remote_code`` reaches transformers only from the caller's
argument.

Deviation: the generation config that comes with a checkpoint is replaced by one that holds only EOS, padding and
the suppressed token ids (``policy_generation_config``): rollouts are sampled from exactly the distribution the
loss scores, so a checkpoint's repetition penalty or n-gram blocking is dropped, and said once on stderr.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .families import TINY_NAMES
from .forward import base_model, forward_params, lm_head
from .lora import adapted_targets, attach_lora, check_lora_placement, is_adapted_param
from .processors import load_processor

__all__ = [
    "UNMODELLED_GENERATION_FIELDS",
    "LoadedVLM",
    "load_vlm",
    "policy_generation_config",
    "resolve_model_path",
]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedVLM:
    """A VLM with LoRA on its language model, its processor and tokenizer."""

    model: Any  # peft.PeftModel
    processor: Any
    tokenizer: Any
    name: str

    def prompt_inputs(self, image, prompt: str):
        """Inputs for one user turn (the image, or several images in order, then ``prompt``) with the assistant
        generation prompt appended.

        ``image`` is a PIL image or a list of them (a multi-image prompt: one image placeholder per image, before
        the text, as the family's chat template places them). Returns a ``BatchFeature`` with batch size 1 on the
        model's device, holding only the keys the model's forward/generate accept (input_ids, attention_mask,
        pixel_values and pixel_attention_mask or image_grid_thw, plus mm_token_type_ids on transformers versions
        whose Qwen2-VL needs it). Pixel values use the model dtype.
        """
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image: a prompt needs at least one image")
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [im if getattr(im, "mode", "RGB") == "RGB" else im.convert("RGB") for im in images]
        nested = [images] if len(images) > 1 else images  # one sample's images: a nested list when several
        batch = self.processor(images=nested, text=[text], return_tensors="pt")
        accepted = forward_params(self.model)
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
        gen = getattr(base_model(self.model), "generation_config", None)
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
        found = set(_suppress_ids(base_model(self.model).config, self.processor, self.tokenizer, self.eos_token_ids))
        gen = getattr(base_model(self.model), "generation_config", None)
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
    "start_image_token_id",  # InternVL's <img> and </img>
    "end_image_token_id",
)
PLACEHOLDER_TOKEN_ATTRS = ("fake_image_token", "global_image_token")
"""Processor attributes that name image-marker tokens without an id attribute beside them (SmolVLM2's)."""
ROW_COL_TOKEN = re.compile(r"<row_\d+_col_\d+>")  # crop markers of split images (SmolVLM2 keeps no row_col_ids)


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
    named = [getattr(processor, attr, None) for attr in PLACEHOLDER_TOKEN_ATTRS]
    named += [token for token in tokenizer.all_special_tokens if ROW_COL_TOKEN.fullmatch(token)]
    found.extend(tokenizer.convert_tokens_to_ids(token) for token in named if isinstance(token, str))
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        found.append(tokenizer.pad_token_id)
    vocab = _text_vocab_size(config, tokenizer)
    unk = tokenizer.unk_token_id
    ids = {int(i) for i in found if isinstance(i, int) and 0 <= i < vocab and i not in eos_ids and i != unk}
    return sorted(ids)


def _text_vocab_size(config, tokenizer) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", None) or len(tokenizer))


def resolve_model_path(name_or_path: str) -> str:
    """Map "demo" to the packaged demo model and the tiny aliases to their built directory; check local paths; pass
    hub ids through, or without a network their cached snapshot folder (``models/hub.py``: no network and no cached
    copy fails at once, saying how to get the model)."""
    if name_or_path == "demo":
        from ..demo import demo_model_dir

        return str(demo_model_dir())
    if name_or_path in TINY_NAMES:
        from .builders import ensure_tiny_vlm

        return str(ensure_tiny_vlm(TINY_NAMES[name_or_path]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model: {name_or_path} is a file; expected a model directory or a hub id")
        if not (path / "config.json").is_file():
            raise ValueError(f"--model: {name_or_path} has no config.json; is it a transformers model directory?")
        return str(path)
    if HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        from .hub import resolve_hub_id

        return resolve_hub_id(name_or_path)
    raise ValueError(f"--model: {name_or_path} is neither an existing directory nor a hub id (owner/name)")


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
    lora_targets: str | None = None,
    train_norms: bool | None = None,
) -> LoadedVLM:
    """Load an image-text-to-text model from a directory, a hub id, or "tiny"/"tiny-qwen2-vl", with LoRA attached.

    LoRA (rank ``lora_rank``, alpha ``2 * lora_rank`` unless given) goes on ``lora_targets`` ("language", the
    default: the q/k/v/o projections of the language model; "vision"; "all"; or "none" with ``train_norms``, which
    also trains the vision tower's norms; see ``models/lora.py``). ``adapter`` loads a saved peft adapter directory
    instead; it must hold what ``lora_targets``/``train_norms`` ask for, when they are given (None: whatever it
    holds). Everything else is frozen. dtype defaults to fp32 on CPU and bf16 on CUDA; the model is in eval mode.
    ``quantize`` ("int8"/"int4": optimum-quanto, "nf4": bitsandbytes on CUDA) quantizes the language model's base
    weights before LoRA is attached; the vision tower and lm_head stay unquantized (see ttrv_edge/models/quantize.py).
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
    targets = "language" if lora_targets is None else lora_targets
    model = attach_lora(base, lora_rank, lora_alpha, lora_dropout, adapter, targets, bool(train_norms))
    if adapter is not None:
        _check_adapter_targets(model, adapter, lora_targets, train_norms)
        check_lora_placement(model, None, None)
    else:
        check_lora_placement(model, targets, bool(train_norms))
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapted_param(name))
    if quantize != "nf4":  # bitsandbytes placed the nf4 model while loading
        model.to(dev)
    model.eval()
    return LoadedVLM(model=model, processor=processor, tokenizer=tokenizer, name=name_or_path)


def _check_adapter_targets(model, adapter: str, lora_targets: str | None, train_norms: bool | None) -> None:
    """Refuse an adapter that adapts other modules than the run asks for (None: no request)."""
    found, norms = adapted_targets(model)
    if (lora_targets is None or lora_targets == found) and (train_norms is None or bool(train_norms) == norms):
        return
    flags = f"--lora-targets {found}" + (" --train-norms" if norms else "")
    raise ValueError(f"--adapter: {adapter} was saved with {flags}; load it with the same options")
