"""Random-weight VLMs of real architectures, built offline from their published hyperparameters.

``bench/configs/<name>.json`` holds each architecture's transformers config fields (text and vision towers, from the
model cards / config.json of SmolVLM-256M-Instruct, SmolVLM-500M-Instruct, Qwen2-VL-2B-Instruct and
InternVL3-1B-hf) plus a ``bench`` section (image size, processor settings, published parameter count).
``build_model_dir`` writes a model folder that ``ttrv_edge.models.loading.load_vlm`` loads like a hub checkpoint.

Deviations from the real checkpoints, and why (none changes memory or compute of a step):
- weights are random (seeded), so rollouts are gibberish that rarely stops at EOS: every rollout runs the full
  ``--new-tokens``, the worst case for memory;
- the tokenizer is ttrv-edge's offline WordLevel tokenizer padded with filler words to the real vocabulary size,
  so embedding, lm_head, logits and sampling have their real sizes; prompts are a little shorter than with the real
  BPE tokenizer;
- SmolVLM's image splitting is off by default (one 512 px image = 64 tokens); ``image_splitting`` in the JSON turns
  it on (the real processor then sends 4x4 crops + a global view for large images, 17 x 64 tokens).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def load_spec(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ValueError(f"--models: no architecture {name_or_path!r} (known: {known}; or a path to a JSON spec)")
    spec = json.loads(path.read_text())
    spec.setdefault("name", path.stem)
    return spec


def _filler_words(count: int) -> list[str]:
    """``count`` distinct lowercase letter strings (digits would be split by the pre-tokenizer)."""
    letters = string.ascii_lowercase
    words = []
    i = 0
    while len(words) < count:
        n, word = i, ""
        while True:
            word = letters[n % 26] + word
            n //= 26
            if n == 0:
                break
        words.append("zq" + word)
        i += 1
    return words


def _tokenizer(arch: str, vocab: int, template: str):
    from ttrv_edge.models.tiny import _build_tokenizer

    base = len(_build_tokenizer(arch, None, template))
    return _build_tokenizer(arch, _filler_words(max(vocab - base, 0)), template)


def _idefics3(spec: dict):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from ttrv_edge.models.tiny import IDEFICS3_TEMPLATE

    cfg, bench = spec["config"], spec["bench"]
    tokenizer = _tokenizer("idefics3", cfg["text_config"]["vocab_size"], IDEFICS3_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(cfg["text_config"], vocab_size=max(cfg["text_config"]["vocab_size"], len(tokenizer)))
    text.update(pad_token_id=ids("<pad>"), bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"))
    config = Idefics3Config(
        vision_config=cfg["vision_config"],
        text_config=text,
        scale_factor=cfg["scale_factor"],
        image_token_id=ids("<image>"),
        pad_token_id=ids("<pad>"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )
    vision = cfg["vision_config"]
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=bench.get("image_splitting", False),
        size={"longest_edge": bench.get("longest_edge", vision["image_size"])},
        max_image_size={"longest_edge": vision["image_size"]},
        resample=3,
    )
    seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // cfg["scale_factor"] ** 2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len, chat_template=IDEFICS3_TEMPLATE
    )
    return Idefics3ForConditionalGeneration, config, processor, tokenizer


def _qwen2_vl(spec: dict):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from ttrv_edge.models.loading import _image_only
    from ttrv_edge.models.tiny import QWEN2_VL_TEMPLATE

    cfg, bench = spec["config"], spec["bench"]
    tokenizer = _tokenizer("qwen2_vl", cfg["text_config"]["vocab_size"], QWEN2_VL_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(cfg["text_config"], vocab_size=max(cfg["text_config"]["vocab_size"], len(tokenizer)))
    text.update(bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    config = Qwen2VLConfig(
        vision_config=cfg["vision_config"],
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
    )
    vision = cfg["vision_config"]
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": unit * unit, "longest_edge": bench["max_pixels"]},
        patch_size=vision["patch_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        merge_size=vision["spatial_merge_size"],
    )
    processor = _image_only(Qwen2VLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_TEMPLATE
    )
    return Qwen2VLForConditionalGeneration, config, processor, tokenizer


BUILDERS = {"idefics3": _idefics3, "qwen2_vl": _qwen2_vl}


def parameter_count(spec: dict) -> int:
    """Parameters of the architecture, counted on the meta device (no memory, seconds)."""
    model_cls, config, _, _ = BUILDERS[spec["config"]["model_type"]](spec)
    with torch.device("meta"):
        model = model_cls(config)
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def build_model_dir(spec: dict, out_dir: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random-weight model of ``spec`` to ``out_dir`` (once; a complete folder is reused)."""
    out_dir = Path(out_dir)
    marker = out_dir / "ttrv_bench.json"
    stamp = {"spec": spec, "dtype": str(dtype), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir
    model_type = spec["config"]["model_type"]
    if model_type not in BUILDERS:
        raise ValueError(f"--models: no offline builder for model type {model_type!r} ({', '.join(BUILDERS)})")
    model_cls, config, processor, tokenizer = BUILDERS[model_type](spec)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
    )
    gen.do_sample = False
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(stamp))
    return out_dir
