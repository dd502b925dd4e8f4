"""Offline builders of random-weight vision-language models: tiny ones for the tests and the demo, real-size ones
for the benchmarks.

The package never downloads a model in tests, and the README's demo must run before the trained demo model exists.
So this module builds, from configs alone, a random VLM that is saved to a directory and then loads like any hub
model (``AutoModelForImageTextToText.from_pretrained(dir)`` and ``ttrv_edge.models.load_processor(dir)``).
``build_random_vlm`` builds one from transformers config fields (bench/real_size.py passes the published
hyperparameters of real checkpoints); ``build_tiny_vlm`` from the tiny configs of ``tiny_config`` (``--model
tiny-<family>``), cached by ``ensure_tiny_vlm``. What each family needs lives in ``models/families/``.

Deviations from real checkpoints, and why:

- The tokenizer is a ``tokenizers`` WordLevel model (a few hundred words), not the checkpoints' BPEs
  (``families/tokenizer.py``).
- Image processors are the PIL ones, built directly (torchvision is not installed); processors whose video half
  needs torchvision are saved without it and rebuilt from their parts by ``models.load_processor``.
- Weights are random (``torch.manual_seed(seed)``), so outputs are gibberish over the vocabulary; EOS is a real
  vocabulary token the model can sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .families import FAMILIES, family
from .families.tokenizer import BASE_WORDS, family_tokenizer

__all__ = [
    "ARCHS",
    "BASE_WORDS",
    "build_random_vlm",
    "build_tiny_vlm",
    "ensure_tiny_vlm",
    "random_vlm_parts",
    "tiny_cache_dir",
    "tiny_config",
]

ARCHS = tuple(FAMILIES)
CACHE_VERSION = "v1"


def random_vlm_parts(config: dict, settings: dict | None = None, words=None):
    """(model class, model config, processor, tokenizer) of the architecture that ``config`` describes.

    ``config`` holds transformers config fields: ``model_type`` (a key of ``families.FAMILIES``), ``text_config``,
    ``vision_config`` and the family's top-level fields (``scale_factor``, ``tie_word_embeddings``, ...); token ids
    come from the tokenizer, and ``text_config["vocab_size"]`` (if given) pads the vocabulary with filler words to
    that size. ``settings`` are image-processor settings (Idefics3 ``image_splitting`` and ``longest_edge``,
    Qwen2-VL ``max_pixels``, ...: see the family's module). ``words`` are added to the vocabulary.
    """
    module = family(config["model_type"])
    tokenizer = family_tokenizer(module, words, config["text_config"].get("vocab_size"))
    model_cls, model_config, processor = module.parts(config, settings or {}, tokenizer)
    return model_cls, model_config, processor, tokenizer


def build_random_vlm(
    out_dir: str | os.PathLike,
    config: dict,
    settings: dict | None = None,
    *,
    words=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Build a random-weight VLM (``random_vlm_parts``; weights drawn after ``torch.manual_seed(seed)``, in
    ``dtype``) and save model (safetensors), tokenizer, processor and chat template to ``out_dir``."""
    model_cls, model_config, processor, tokenizer = random_vlm_parts(config, settings, words)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(model_config)
    finally:
        torch.set_default_dtype(previous)
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    gen.do_sample = False
    gen.max_new_tokens = 16
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_config(arch: str, image_size: int, hidden: int, layers: int, patch: int) -> tuple[dict, dict]:
    """The (config, image-processor settings) of a tiny ``arch`` model, for ``build_random_vlm``."""
    return family(arch).tiny_config(image_size, hidden, layers, patch)


def build_tiny_vlm(
    out_dir: str | os.PathLike,
    arch: str = "idefics3",
    *,
    seed: int = 0,
    words=None,
    image_size: int = 64,
    hidden: int = 64,
    layers: int = 2,
    patch: int = 8,
) -> Path:
    """Build a tiny random VLM of ``arch`` (a key of ``families.FAMILIES``) and save it under ``out_dir``.

    ``words`` (iterable of strings) are pre-tokenized and added to the vocabulary. The directory holds the model
    (safetensors), tokenizer, processor and chat template; returns its path.
    """
    if arch not in ARCHS:
        raise ValueError(f"--model: unknown tiny architecture {arch!r} (choose from {', '.join(ARCHS)})")
    if image_size % (2 * patch):
        raise ValueError(f"image_size: must be a multiple of 2*patch ({2 * patch}), got {image_size}")
    config, settings = tiny_config(arch, image_size, hidden, layers, patch)
    out = build_random_vlm(out_dir, config, settings, words=words, seed=seed)
    (out / "ttrv_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "version": CACHE_VERSION}))
    return out


def tiny_cache_dir(arch: str = "idefics3") -> Path:
    """Where ``ensure_tiny_vlm`` keeps a model: $TTRV_EDGE_CACHE or ~/.cache/ttrv-edge, then tiny-<arch>-v1."""
    root = os.environ.get("TTRV_EDGE_CACHE") or Path.home() / ".cache" / "ttrv-edge"
    return Path(root) / f"tiny-{arch.replace('_', '-')}-{CACHE_VERSION}"


def ensure_tiny_vlm(arch: str = "idefics3") -> Path:
    """Build the default tiny model of ``arch`` once into the cache directory and return its path.

    The model is built in a temporary sibling directory and renamed into place, so a crashed build never leaves a
    half-written model behind, and two processes building at once both end with a complete one.
    """
    import shutil

    path = tiny_cache_dir(arch)
    if _complete(path):
        return path
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build_tiny_vlm(tmp, arch)
    if path.exists() and not _complete(path):
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _complete(path: Path) -> bool:
    return (path / "ttrv_tiny.json").is_file() and (path / "model.safetensors").is_file()
