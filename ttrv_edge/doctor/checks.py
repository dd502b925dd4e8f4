"""The checks of ``ttrv-edge doctor``: load a model without adapting it and report, as a JSON-able dict, its family,
parameter counts, LoRA targets, image tokens per image, chat template, generation config, export support and the
memory planner's estimate of one step.

The model is loaded on the CPU in the checkpoint's own dtype (``dtype="auto"``: nothing runs through it, so fp32
would only double the memory doctor needs); the processor is loaded as ``adapt`` loads it and builds prompts for
probe images. No forward pass, no LoRA attached: LoRA targets are found by the rules peft applies
(``models/lora.py``), and the memory of one step is the planner's estimate (``memory/``) for fp32 on this CPU and
for bf16 on a GPU with a budget (default 6 GB).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace

__all__ = ["PROBE_SIZES", "diagnose", "probe_image", "probe_sizes"]

PROBE_SIZES = ((640, 480), (320, 320))
"""Probe images (width, height): image tokens are reported at the first; a second size of another aspect ratio
shows whether the count depends on the image (Idefics3 splitting, InternVL tiles, Qwen2-VL dynamic resolution)."""
GPU_DTYPE_BYTES = 2  # bf16, what adapt uses on CUDA
CPU_DTYPE_BYTES = 4  # fp32, what adapt uses on CPU
LORA_DTYPE_BYTES = 4  # peft keeps adapter weights in fp32 under a bf16 base


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load(model: str, trust_remote_code: bool):
    """(path, config, model, processor); ValueError "doctor: cannot ..." naming the part that failed."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..models import load_processor, resolve_model_path

    try:
        path = resolve_model_path(model)
    except ValueError as exc:
        raise ValueError("doctor: " + str(exc).removeprefix("--model: ")) from exc
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure here means "this folder's config is broken"
        raise ValueError(f"doctor: cannot read the config of {path} ({_first_line(exc)})") from exc
    try:
        base = AutoModelForImageTextToText.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        what = f"a {config.model_type} model" if getattr(config, "model_type", None) else "a model"
        raise ValueError(
            f"doctor: cannot load {path} as an image-text-to-text model ({what}: {_first_line(exc)})"
        ) from exc
    try:
        processor = load_processor(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"doctor: cannot load the processor of {path} ({_first_line(exc)})") from exc
    for p in base.parameters():
        p.requires_grad_(False)
    return path, config, base.eval(), processor


def _unique(tensors) -> dict[int, object]:
    return {id(t): t for t in tensors}


def _parameters(base) -> dict:
    """Parameter counts: vision tower, connector (vision-side modules outside the tower), language model (the rest:
    embeddings, decoder, lm_head); shared (tied) tensors count once."""
    from ..models import VISION_MARKERS, vision_tower

    tower = vision_tower(base)
    in_tower = _unique(tower.parameters()) if tower is not None else {}
    counts = {"vision_tower": 0, "connector": 0, "language_model": 0}
    seen: set[int] = set()
    for name, p in base.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = "vision_tower" if id(p) in in_tower else "language_model"
        if part == "language_model" and any(m in name for m in VISION_MARKERS):
            part = "connector"
        counts[part] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def _lora(base, rank: int) -> tuple[dict, list[str]]:
    """Modules and LoRA parameters at ``rank`` for ``--lora-targets language`` and ``vision``; problems found."""
    import torch

    from ..models import LORA_TARGET_REGEX, VISION_MARKERS
    from ..models.lora import lora_target_modules

    linear = {n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    language = [n for n in linear if re.fullmatch(LORA_TARGET_REGEX, n)]
    try:
        vision = list(lora_target_modules(base, "vision"))
    except ValueError:
        vision = []
    report = {"rank": rank}
    for key, names in (("language", language), ("vision", vision)):
        params = sum(rank * (linear[n].in_features + linear[n].out_features) for n in names)
        inputs = sum(linear[n].in_features for n in names)  # elements per token that LoRA casts to its dtype
        report[key] = {"modules": len(names), "parameters": params, "in_features": inputs}
    problems = []
    if not language:
        problems.append("no language-model attention projections (q/k/v/o_proj) for LoRA")
    elif any(m in n for n in language for m in VISION_MARKERS):
        problems.append("--lora-targets language would touch the vision side")
    return report, problems


def probe_image(size: tuple[int, int]):
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 10, height // 10, width // 2, height // 2), fill=(220, 30, 30))
    draw.rectangle((width // 2, height // 2, width - width // 10, height - height // 10), fill=(30, 60, 220))
    return image


def _image_token_id(config, processor) -> int | None:
    for source, attr in ((config, "image_token_id"), (config, "image_token_index"), (processor, "image_token_id")):
        value = getattr(source, attr, None)
        if isinstance(value, int):
            return value
    return None


def _tiling(image_processor) -> str | None:
    """The processor setting that makes the image-token count depend on the image, when one is on."""
    if getattr(image_processor, "do_image_splitting", False):
        return "image splitting"
    if getattr(image_processor, "crop_to_patches", False):
        return "crop_to_patches tiles"
    size = getattr(image_processor, "size", None)
    if getattr(size, "longest_edge", None) and getattr(size, "shortest_edge", None):
        return "dynamic resolution"
    return None


def probe_sizes(image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``image_size`` (the reported one) and a second probe of another shape: 320x320, or 640x480 for a square."""
    return (tuple(image_size), PROBE_SIZES[0] if image_size[0] == image_size[1] else PROBE_SIZES[1])


def _image_tokens(vlm, config, question: str, sizes) -> tuple[dict, object, list[str]]:
    """Image tokens per image at each probe size, and the first probe's prompt inputs (None when prompts fail)."""
    token = _image_token_id(config, vlm.processor)
    counts, inputs = [], None
    for size in sizes:
        try:
            batch = vlm.prompt_inputs(probe_image(size), question)
        except Exception as exc:  # noqa: BLE001 - a processor that cannot make a prompt is the finding
            return (
                {"token_id": token},
                None,
                [f"the processor cannot build a prompt with an image ({_first_line(exc)})"],
            )
        inputs = inputs if inputs is not None else batch
        ids = batch["input_ids"]
        counts.append(int((ids == token).sum()) if token is not None else 0)
    report = {
        "token_id": token,
        "per_image": counts[0],
        "probe_size": list(sizes[0]),
        "depends_on_size": len(set(counts)) > 1,
        "at_sizes": {f"{w}x{h}": n for (w, h), n in zip(sizes, counts)},
        "tiling": _tiling(getattr(vlm.processor, "image_processor", None)),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
    }
    problems = [] if counts[0] > 0 else ["a prompt with an image holds no image token"]
    return report, inputs, problems


def _generation(vlm) -> dict:
    """What ttrv-edge does with the checkpoint's generation config: the fields it drops, the ids it models."""
    from ..models import UNMODELLED_GENERATION_FIELDS, base_model

    gen = base_model(vlm.model).generation_config
    ignored = {}
    for field, neutral in UNMODELLED_GENERATION_FIELDS.items():
        value = getattr(gen, field, None)
        if value not in (None, neutral) and value != []:
            ignored[field] = value if isinstance(value, (int, float, str, bool, list)) else str(value)
    tokens = vlm.tokenizer.convert_ids_to_tokens
    eos, suppressed = vlm.eos_token_ids, vlm.suppress_token_ids
    return {
        "ignored": ignored,
        "modelled": {
            "eos_token_ids": eos,
            "eos_tokens": tokens(eos),
            "suppressed_token_ids": suppressed,
            "suppressed_tokens": tokens(suppressed),
        },
    }


def _costs_at(costs, base, dtype_bytes: int, lora: dict, fused_head: bool):
    """``costs`` with the weights and activations of a ``dtype_bytes`` float model plus fp32 LoRA (language; its
    doctor report), the loss on the Triton kernels or not (``fused_head``)."""
    from ..memory import tensor_bytes

    floats = other = 0
    frozen = [p for name, p in base.named_parameters() if "lora_" not in name]  # LoRA is counted below, in fp32
    for t in _unique(frozen + list(base.buffers())).values():
        if t.is_floating_point():
            floats += t.numel()
        else:
            other += tensor_bytes(t)
    adapter = lora["parameters"] * LORA_DTYPE_BYTES
    weights = floats * dtype_bytes + other + adapter
    return replace(
        costs,
        weights_bytes=weights,
        trainable_bytes=adapter,
        dtype_bytes=dtype_bytes,
        vision_trained=False,
        lora_inputs=lora["in_features"],
        lora_dtype_bytes=LORA_DTYPE_BYTES,
        fused_head=fused_head,
    )


def _plan(base, costs, resident: int, budget: int | None, rollouts: int, shape) -> dict:
    """The planner's micro-batches and peak estimate for one step of ``rollouts`` (budget None: all rows at once)."""
    from ..memory import PHASES, MemoryPlanner

    planner = MemoryPlanner(base, budget, device="cpu")
    planner.costs, planner.resident = costs, resident
    plan = {"weights_bytes": costs.weights_bytes, "resident_bytes": resident, "budget_bytes": budget}
    try:
        rows = {phase: planner.micro_batch(phase, rollouts, shape) for phase in PHASES}
    except ValueError as exc:
        need = max(planner.estimate(phase, 1, shape) for phase in PHASES)
        return {**plan, "fits": False, "peak_bytes": need, "reason": str(exc)}
    peak = max(planner.estimate(phase, rows[phase], shape) for phase in PHASES)
    return {
        **plan,
        "fits": budget is None or peak <= budget,
        "peak_bytes": peak,
        **{f"{p}_micro_batch": rows[p] for p in PHASES},
    }


def _memory_total() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _estimate(vlm, inputs, rollouts: int, new_tokens: int, lora: dict, gpu_budget: str, baseline: int) -> dict:
    from ..memory import model_costs, parse_memory_budget
    from ..rl.sampling import work_shape

    shape = work_shape(vlm, inputs, new_tokens)
    costs = model_costs(vlm.model)
    cpu_costs = _costs_at(costs, vlm.model, CPU_DTYPE_BYTES, lora, fused_head=False)
    gpu_costs = _costs_at(costs, vlm.model, GPU_DTYPE_BYTES, lora, fused_head=True)  # auto = Triton on CUDA
    cpu = _plan(vlm.model, cpu_costs, baseline + cpu_costs.weights_bytes, None, rollouts, shape)
    cpu.update(dtype="fp32", machine_memory_bytes=_memory_total())
    cpu["fits"] = cpu["peak_bytes"] <= cpu["machine_memory_bytes"]
    gpu = _plan(vlm.model, gpu_costs, gpu_costs.weights_bytes, parse_memory_budget(gpu_budget), rollouts, shape)
    gpu["dtype"] = "bf16"
    return {
        "rollouts": rollouts,
        "new_tokens": new_tokens,
        "prompt_tokens": shape.prompt_tokens,
        "vision_tokens": shape.vision_tokens,
        "cpu": cpu,
        "gpu": gpu,
    }


def diagnose(
    model: str,
    *,
    rollouts: int = 8,
    max_new_tokens: int = 16,
    lora_rank: int = 8,
    gpu_budget: str = "6GB",
    trust_remote_code: bool = False,
    image_size: tuple[int, int] = PROBE_SIZES[0],
) -> dict:
    """The doctor's report of ``model`` (a folder, a hub id, ``demo`` or ``tiny-<family>``) as a JSON-able dict.

    ``usable`` is False with ``problems`` naming what stops ``adapt``; a model or processor that does not load is a
    ValueError ("doctor: cannot load ...") instead."""
    from ..export.families import EXPORTABLE
    from ..io.answers import DEFAULT_QUESTION, Question
    from ..memory.meter import PeakMeter
    from ..models import LoadedVLM
    from ..models.families import FAMILIES

    if min(rollouts, max_new_tokens, lora_rank, *image_size) < 1:
        raise ValueError("doctor: --rollouts, --max-new-tokens, --lora-rank and --image-size must be >= 1")
    import peft  # noqa: F401 - adapt's process imports it (~190 MB of modules on CPU): part of the baseline

    baseline = PeakMeter("cpu").current()  # this process before the model loads (libraries, interpreter)
    path, config, base, processor = _load(model, trust_remote_code)
    vlm = LoadedVLM(base, processor, getattr(processor, "tokenizer", processor), model)
    model_type = getattr(config, "model_type", None)
    lora, problems = _lora(base, lora_rank)
    template = getattr(processor, "chat_template", None) or getattr(vlm.tokenizer, "chat_template", None)
    report = {
        "model": model,
        "path": path,
        "loaded_dtype": str(base.dtype).removeprefix("torch."),
        "family": {"model_type": model_type, "name": FAMILIES.get(model_type), "tested": model_type in FAMILIES},
        "parameters": _parameters(base),
        "lora": lora,
        "chat_template": bool(template),
        "generation": _generation(vlm),
        "export_supported": model_type in EXPORTABLE
        and importlib.util.find_spec(f"ttrv_edge.export.families.{model_type}") is not None,
    }
    if not template:
        problems.append("the processor has no chat template")
        report["image_tokens"], inputs = None, None
    else:
        report["image_tokens"], inputs, found = _image_tokens(
            vlm, config, Question(DEFAULT_QUESTION).prompt(), probe_sizes(image_size)
        )
        problems += found
    report["estimate"] = (
        None
        if inputs is None
        else _estimate(vlm, inputs, rollouts, max_new_tokens, lora["language"], gpu_budget, baseline)
    )
    report["problems"], report["usable"] = problems, not problems
    return report
