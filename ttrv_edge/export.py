"""Merge a TTRV LoRA adapter into its base model and export the result as ONNX graphs for onnxruntime.

``export_onnx(adapter_dir, out_dir)`` writes two graphs, the processor/tokenizer files and ``manifest.json``:

- ``vision.onnx``: vision tower + connector, pixels -> image features [n_tokens, hidden] (one row per image token).
- ``decoder.onnx``: token ids [1, L] + image features [n, hidden] + 4-D additive attention mask + position ids +
  past keys/values of every layer -> last-position logits [1, V] + present keys/values. Inside: the embedding
  lookup, the image features written into the image-token rows (the models' masked_scatter), the text model and
  the lm_head. The prefill is this graph over the whole prompt with an empty past; a decode step is this graph on
  one new token with the past and zero image features.

Why not optimum: its ONNX exporter covers neither Idefics3/SmolVLM nor Qwen2-VL and pins an older transformers
(DESIGN section 4), so everything here is ``torch.onnx.export(dynamo=True)`` on small wrapper modules.

Deviations from a plain "export the model" and why:

- Prefill and decode share one decoder graph (an empty past is a [1, kv_heads, 0, head_dim] tensor), so the text
  weights are stored (and exported) once, not twice as with separate prefill and decode-with-past graphs.
- The causal mask is an input (built by the runner in numpy), not built in the graph: transformers' mask helpers
  branch on shapes and would be specialised at trace time. Position ids are inputs for the same reason, and
  because Qwen2-VL's 3-D rope positions come from a data-dependent loop over the prompt.
- Qwen2-VL's vision attention splits the patch sequence per image with ``.tolist()`` (not exportable). The wrapper
  runs the same blocks with one attention over all patches under a block-diagonal mask built in the graph from a
  ``segment_ids`` input (one segment per image), and takes the vision rope positions as an input.
- A quantized base (optimum-quanto, torchao, bitsandbytes) is dequantized to fp32 before the merge: the merged
  weights are the dequantized base the adapter was trained against plus the LoRA delta.
- ``--int8``: onnxruntime dynamic quantization (int8 weights of MatMul/Gemm, activations quantized at run time) of
  every graph, written beside the fp32 graphs (``*.int8.onnx``); the runner picks them with ``int8=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .models import load_vlm, resolve_model_path

__all__ = [
    "DEFAULT_OPSET",
    "base_model_for",
    "dequantize_model",
    "export_lines",
    "export_onnx",
    "export_summary",
    "merge_lora",
    "quantize_int8",
]

DEFAULT_OPSET = 18
FORMAT = "ttrv-edge-onnx/1"
GRAPHS = ("vision", "decoder")
IDEFICS3_TYPES = ("idefics3", "smolvlm")
QWEN2_VL_TYPES = ("qwen2_vl",)
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf files stop at 2 GB: larger graphs keep weights in a .data file
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json")


# ----------------------------------------------------------------------------------------------- loading, merge


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
    """The transformers model with every LoRA delta added into its base weights (scale alpha / r included), the
    peft wrappers removed. A quantized base is dequantized first. The peft model is consumed."""
    dequantize_model(peft_model)
    with torch.no_grad():
        merged = peft_model.merge_and_unload(safe_merge=True)
    return merged.eval()


# ----------------------------------------------------------------------------------------------- export wrappers


class _Decoder(torch.nn.Module):
    """Embedding + image-feature merge + text model + lm_head, with the KV cache as flat tensors.

    The merge is the models' ``masked_scatter`` written with plain ops that also work with zero features (decode
    steps): the k-th image token takes row k of ``image_features`` (padded with one zero row so the gather never
    reads an empty tensor)."""

    def __init__(self, text_model, head, image_token_id: int):
        super().__init__()
        self.text, self.head, self.config = text_model, head, text_model.config
        self.embed = text_model.get_input_embeddings()
        self.image_token_id = image_token_id

    def forward(self, input_ids, image_features, attention_mask, position_ids, past):
        from transformers import DynamicCache

        embeds = self.embed(input_ids)
        is_image = input_ids == self.image_token_id
        index = (torch.cumsum(is_image.to(torch.int64), dim=-1) - 1).clamp(min=0)
        padded = torch.cat([image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])])
        embeds = torch.where(is_image[..., None], padded[index], embeds)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.config)
        out = self.text(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        logits = self.head(out.last_hidden_state[:, -1])
        present = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *present)


class _Idefics3Vision(torch.nn.Module):
    """SigLIP tower + pixel-shuffle connector; every crop is full size, so the patch mask is all ones."""

    def __init__(self, inner):
        super().__init__()
        self.vision, self.connector = inner.vision_model, inner.connector

    def forward(self, pixel_values):
        features = self.connector(self.vision(pixel_values=pixel_values).last_hidden_state)
        return features.reshape(-1, features.shape[-1])


class _Qwen2VLVision(torch.nn.Module):
    """Qwen2-VL's vision blocks with one block-diagonal-masked attention instead of a split per image."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values, rope_positions, segment_ids):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, rope_positions)
        same = segment_ids[:, None] == segment_ids[None, :]
        bias = torch.where(same, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype)[None, None]
        for block in visual.blocks:
            attn = block.attn
            x = block.norm1(hidden)
            q, k, v = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
            hidden = hidden + attn.proj(out[0].transpose(0, 1).reshape(x.shape[0], -1))
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


# ----------------------------------------------------------------------------------------------- architectures


def probe_image(size: int = 64) -> Image.Image:
    """A fixed synthetic image (red circle, blue square on white) used for example inputs and the self-check."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.1, size * 0.1, size * 0.45, size * 0.45), fill=(220, 30, 30))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.9), fill=(30, 60, 220))
    return image


def _arch(model) -> str:
    model_type = model.config.model_type
    if model_type in IDEFICS3_TYPES:
        return "idefics3"
    if model_type in QWEN2_VL_TYPES:
        return "qwen2_vl"
    raise ValueError(f"--model: ONNX export supports Idefics3/SmolVLM and Qwen2-VL, not {model_type!r}")


def _text_model(model, arch: str):
    return model.model.text_model if arch == "idefics3" else model.model.language_model


def _image_config(processor, arch: str) -> dict:
    ip = processor.image_processor.to_dict()
    common = {k: ip.get(k) for k in ("do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean")}
    common.update(image_std=ip.get("image_std"), resample=int(ip.get("resample") or 3), kind=arch)
    if arch == "idefics3":
        return common | {
            "longest_edge": int(ip["size"]["longest_edge"]),
            "max_image_size": int(ip["max_image_size"]["longest_edge"]),
            "do_image_splitting": bool(ip.get("do_image_splitting")),
            "image_seq_len": int(processor.image_seq_len),
            "image_token": processor.image_token,
            "fake_image_token": processor.fake_image_token,
            "global_image_token": processor.global_image_tag,
        }
    size = ip.get("size") or {}
    return common | {
        "min_pixels": int(size.get("shortest_edge") or ip["min_pixels"]),
        "max_pixels": int(size.get("longest_edge") or ip["max_pixels"]),
        "patch_size": int(ip["patch_size"]),
        "temporal_patch_size": int(ip["temporal_patch_size"]),
        "merge_size": int(ip["merge_size"]),
        "image_token": processor.image_token,
    }


def _vision_example(arch: str, batch, image_cfg: dict):
    """Example inputs and dynamic axes of the vision graph, from the processor's output for the probe image."""
    if arch == "idefics3":
        pixels = batch["pixel_values"].reshape(-1, *batch["pixel_values"].shape[2:]).float()
        pixels = torch.cat([pixels, pixels.flip(-1)]) if pixels.shape[0] == 1 else pixels  # a size-1 dim would freeze
        return (pixels,), ["pixel_values"], {"pixel_values": {0: "num_crops"}}
    from .onnx_preprocess import qwen2vl_vision_positions

    grid = tuple(int(x) for x in batch["image_grid_thw"][0])
    rope = torch.from_numpy(qwen2vl_vision_positions(grid, image_cfg["merge_size"]))
    pixels = batch["pixel_values"].float()
    segments = torch.zeros(pixels.shape[0], dtype=torch.int64)
    axes = {"pixel_values": {0: "patches"}, "rope_positions": {0: "patches"}, "segment_ids": {0: "patches"}}
    return (pixels, rope, segments), ["pixel_values", "rope_positions", "segment_ids"], axes


def _decoder_example(text_config, arch: str, image_token_id: int, seq: int = 5, past: int = 3):
    kv_heads = text_config.num_key_value_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    layers = text_config.num_hidden_layers
    ids = torch.tensor([[1, image_token_id, image_token_id, 2, 3]], dtype=torch.int64)[:, :seq]
    features = torch.randn(2, text_config.hidden_size)
    mask = torch.zeros(1, 1, seq, past + seq)
    positions = torch.arange(past, past + seq)[None]
    positions = positions[None].expand(3, 1, seq).contiguous() if arch == "qwen2_vl" else positions
    pasts = [torch.randn(1, kv_heads, past, head_dim) for _ in range(2 * layers)]
    names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    axes = {"input_ids": {1: "sequence"}, "image_features": {0: "image_tokens"}}
    axes["attention_mask"] = {2: "sequence", 3: "total"}
    axes["position_ids"] = {positions.dim() - 1: "sequence"}
    axes["past"] = [{2: "past"} for _ in names]
    inputs = ["input_ids", "image_features", "attention_mask", "position_ids", *names]
    outputs = ["logits"] + [name.replace("past_", "present_") for name in names]
    info = {
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": text_config.hidden_size,
    }
    return (ids, features, mask, positions, pasts), inputs, outputs, axes, info


# ----------------------------------------------------------------------------------------------- export


@contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter (missing torchvision ops, axis renames, quantizer advice) on stderr."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "root")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _export_graph(module, args, path: Path, inputs, outputs, axes, opset: int) -> None:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=axes,
            opset_version=opset,
            external_data=params > EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    program.save(str(path), external_data=params > EXTERNAL_DATA_BYTES)


def _graph_signature(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {v: k for k, v in onnx.TensorProto.DataType.items()}

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "shape": shape, "dtype": names[t.elem_type].lower()})
        return out

    return {"file": path.name, "inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _write_processor_files(vlm, out: Path) -> None:
    vlm.processor.save_pretrained(out)
    tokenizer = vlm.tokenizer
    if not (out / "tokenizer.json").is_file():
        tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").is_file():
        template = getattr(vlm.processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("--model: the processor has no chat template; ONNX answering needs one")
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    if not (out / "tokenizer.json").is_file():
        raise ValueError("--model: the tokenizer has no tokenizer.json (a fast tokenizer is needed without torch)")


def _special_tokens(tokenizer) -> dict:
    return {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


def export_onnx(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    trust_remote_code: bool = False,
    check: bool = True,
    log=None,
) -> dict:
    """Merge ``adapter_dir`` into its base model and write the ONNX graphs, processor files and manifest.json to
    ``out_dir``. ``model`` overrides the base recorded in the adapter. ``int8`` adds dynamically quantized copies.
    ``check`` runs the exported graphs once on a probe image and records their agreement with torch in the manifest.
    ``log`` (a callable taking a string) receives progress lines. Returns the manifest."""
    started = time.perf_counter()
    log = log or (lambda message: None)
    adapter = adapter_sha256(adapter_dir)
    base = resolve_model_path(base_model_for(adapter_dir, model))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR: {out} exists and is not a folder")
    log(f"loading {base} with the adapter")
    vlm = load_vlm(
        base, adapter=str(adapter_dir), device="cpu", dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    arch = _arch(vlm.model.get_base_model())
    eos_ids = vlm.eos_token_ids
    merged = merge_lora(vlm.model)
    out.mkdir(parents=True, exist_ok=True)
    _write_processor_files(vlm, out)
    image_cfg = _image_config(vlm.processor, arch)
    batch = vlm.processor(images=[probe_image()], text=[_probe_prompt(vlm)], return_tensors="pt")
    with torch.no_grad():
        torch.manual_seed(0)
        args, names, axes = _vision_example(arch, batch, image_cfg)
        vision = _Idefics3Vision(merged.model) if arch == "idefics3" else _Qwen2VLVision(merged.model.visual)
        log("exporting vision.onnx")
        _export_graph(vision.eval(), args, out / "vision.onnx", names, ["image_features"], axes, opset)
        text = _text_model(merged, arch)
        image_token_id = int(merged.config.image_token_id)
        args, inputs, outputs, axes, text_info = _decoder_example(text.config, arch, image_token_id)
        log("exporting decoder.onnx")
        decoder = _Decoder(text, merged.get_output_embeddings(), image_token_id).eval()
        _export_graph(decoder, args, out / "decoder.onnx", inputs, outputs, axes, opset)
    graphs = {name: _graph_signature(out / f"{name}.onnx") for name in GRAPHS}
    config = merged.config
    manifest = {
        "format": FORMAT,
        "architecture": arch,
        "model_type": config.model_type,
        "source_model": str(base),
        "adapter": {"path": str(Path(adapter_dir).resolve()), **adapter},
        "opset": opset,
        "exporter": {"torch": torch.__version__, "transformers": _version("transformers"), "dtype": "float32"},
        "graphs": graphs,
        "text": text_info | {"vocab_size": int(merged.get_output_embeddings().weight.shape[0]), "dtype": "float32"},
        "tokens": {
            "eos_token_ids": eos_ids,
            "suppress_token_ids": sorted(int(i) for i in (merged.generation_config.suppress_tokens or [])),
            "image_token_id": image_token_id,
            "special_tokens": _special_tokens(vlm.tokenizer),
            "clean_up_tokenization_spaces": bool(getattr(vlm.tokenizer, "clean_up_tokenization_spaces", False)),
        },
        "preprocess": image_cfg,
        "files": {"tokenizer": "tokenizer.json", "chat_template": "chat_template.jinja"},
    }
    if int8:
        log("quantizing to int8")
        manifest["int8"] = quantize_int8(out)
    _write_manifest(out, manifest)
    if check:
        log("checking onnxruntime against torch on a probe image")
        manifest["check"] = _self_check(merged, vlm.processor, out, eos_ids, int8)
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    return _write_manifest(out, manifest)


def export_summary(manifest: dict, out_dir: str | Path) -> dict:
    """What the CLI reports after an export: files and sizes, the self-check, the adapter hash, the time taken."""
    out = Path(out_dir)
    graphs = {
        name: {"file": g["file"], "bytes": _graph_bytes(out, g["file"])} for name, g in manifest["graphs"].items()
    }
    return {
        "out_dir": str(out),
        "architecture": manifest["architecture"],
        "source_model": manifest["source_model"],
        "adapter_sha256": manifest["adapter"]["sha256"],
        "opset": manifest["opset"],
        "graphs": graphs,
        "int8": manifest.get("int8"),
        "check": manifest.get("check"),
        "seconds": manifest.get("export_seconds"),
    }


def export_lines(summary: dict) -> list[str]:
    """The summary as a few human-readable lines."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    lines = [f"exported {summary['architecture']} from {summary['source_model']} to {summary['out_dir']}"]
    for name, graph in summary["graphs"].items():
        quant = (summary["int8"] or {}).get(name)
        extra = f", int8 {quant['file']} {mb(quant['bytes'])}" if quant else ""
        lines.append(f"  {name}: {graph['file']} {mb(graph['bytes'])}{extra}")
    check = summary["check"]
    if check:
        same = "identical" if check["tokens_equal"] else "DIFFERENT"
        lines.append(
            f"  check: greedy tokens {same} to torch over {check['new_tokens']} steps, "
            f"max |logit diff| {check['max_abs_logit_diff']:.2e}"
        )
    lines.append(f"  adapter sha256 {summary['adapter_sha256'][:16]}..., {summary['seconds']} s")
    return lines


def _probe_prompt(vlm) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    return vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _write_manifest(out: Path, manifest: dict) -> dict:
    """Write manifest.json; returns the manifest as read back (tuples become lists)."""
    text = json.dumps(manifest, indent=2) + "\n"
    (out / "manifest.json").write_text(text, encoding="utf-8")
    return json.loads(text)


def quantize_int8(out_dir: str | Path) -> dict:
    """Dynamic int8 quantization (onnxruntime.quantization.quantize_dynamic, int8 weights) of every exported graph,
    written as ``<name>.int8.onnx``. Returns {name: {"file", "bytes", "fp32_bytes"}}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out_dir)
    sizes = {}
    for name in GRAPHS:
        source, target = out / f"{name}.onnx", out / f"{name}.int8.onnx"
        external = (out / f"{name}.onnx.data").is_file()
        with _quiet_exporter():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, use_external_data_format=external)
        sizes[name] = {
            "file": target.name,
            "bytes": _graph_bytes(out, target.name),
            "fp32_bytes": _graph_bytes(out, source.name),
        }
    return sizes


def _graph_bytes(out: Path, file: str) -> int:
    return sum(p.stat().st_size for p in out.glob(f"{file}*"))


def _self_check(merged, processor, out: Path, eos_ids: list[int], int8: bool, new_tokens: int = 8) -> dict:
    """Greedy tokens and logits of the exported graphs vs the merged torch model on the probe image."""
    from .onnx_runner import OnnxVLM

    prompt = "What is shown?"
    runner = OnnxVLM(out)
    result = runner.generate(probe_image(), prompt, max_new_tokens=new_tokens, return_logits=True)
    batch = processor(images=[probe_image()], text=[runner.chat.render(prompt)], return_tensors="pt")
    keys = {
        "input_ids",
        "attention_mask",
        "pixel_values",
        "pixel_attention_mask",
        "image_grid_thw",
        "mm_token_type_ids",
    }
    inputs = {k: v for k, v in batch.items() if k in keys}
    with torch.no_grad():
        ref = merged.generate(
            **inputs,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos_ids,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=eos_ids[0],
        )
    ref_tokens = ref.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    steps = min(len(ref.logits), len(result.logits))
    diff = max(float(np.abs(result.logits[i] - ref.logits[i][0].numpy()).max()) for i in range(steps))
    report = {"new_tokens": new_tokens, "tokens_equal": ref_tokens == result.token_ids, "max_abs_logit_diff": diff}
    if int8:
        quant = OnnxVLM(out, int8=True).generate(probe_image(), prompt, max_new_tokens=new_tokens)
        report["int8_tokens_equal"] = quant.token_ids == ref_tokens
    return report
