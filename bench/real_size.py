"""Random-weight VLMs of real architectures, built offline from their published hyperparameters.

``bench/configs/<name>.json`` holds each architecture's transformers config fields (text and vision towers) plus a
``bench`` section (image size, processor settings, published parameter count). The values are the published
config.json fields of the public checkpoints, written from memory of those configs (nothing is downloaded here):
HuggingFaceTB/SmolVLM-256M-Instruct, SmolVLM-500M-Instruct, Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct,
OpenGVLab/InternVL3-1B-hf and InternVL3-2B-hf (vocabulary sizes, hidden/intermediate sizes, layers, heads, KV heads,
rope, tying, vision depth/width/patch/merge/window settings). Their parameter counts, counted on the meta device by
``parameter_count``, are within 0.2% of the published totals (``published_parameters``), which checks them: 256.5M,
507.5M, 2.209B, 3.755B, 938.2M and 2.089B against 256M, 507M, 2.21B, 3.75B, 938M and 2.09B.
``build_model_dir`` writes a model folder that ``ttrv_edge.models.load_vlm`` loads like a hub checkpoint; the model
is built by ``ttrv_edge.models.builders.build_random_vlm``, the same builder as the tiny test models.

Deviations from the real checkpoints, and why (none changes memory or compute of a step):
- weights are random (seeded), so rollouts are gibberish that rarely stops at EOS: every rollout runs the full
  ``--new-tokens``, the worst case for memory;
- the tokenizer is ttrv-edge's offline WordLevel tokenizer padded with filler words to the real vocabulary size,
  so embedding, lm_head, logits and sampling have their real sizes; prompts are a little shorter than with the real
  BPE tokenizer;
- SmolVLM's image splitting is off by default (one 512 px image = 64 tokens); ``image_splitting`` in the JSON turns
  it on (the real processor then sends 4x4 crops + a global view for large images, 17 x 64 tokens);
- InternVL tiles as the checkpoints do (``crop_to_patches``, up to 12 tiles of 448 px + a thumbnail); the benchmark's
  square 448 px image is one tile, 256 tokens. Qwen2-VL / Qwen2.5-VL images are capped at ``max_pixels`` 448 x 448
  (256 tokens after the 2x2 merge) instead of the checkpoints' 12.8 MP.
"""

from __future__ import annotations

import json
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


def parameter_count(spec: dict) -> int:
    """Parameters of the architecture, counted on the meta device (no memory, seconds)."""
    from ttrv_edge.models.builders import random_vlm_parts

    model_cls, config, _, _ = random_vlm_parts(spec["config"], spec["bench"])
    with torch.device("meta"):
        model = model_cls(config)
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


def build_model_dir(spec: dict, out_dir: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random-weight model of ``spec`` to ``out_dir`` (once; a complete folder is reused)."""
    from ttrv_edge.models.builders import ARCHS, build_random_vlm

    out_dir = Path(out_dir)
    marker = out_dir / "ttrv_bench.json"
    stamp = {"spec": spec, "dtype": str(dtype), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return out_dir
    model_type = spec["config"]["model_type"]
    if model_type not in ARCHS:
        raise ValueError(f"--models: no offline builder for model type {model_type!r} ({', '.join(ARCHS)})")
    build_random_vlm(out_dir, spec["config"], spec["bench"], seed=seed, dtype=dtype)
    marker.write_text(json.dumps(stamp))
    return out_dir
