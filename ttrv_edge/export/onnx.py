"""Export a TTRV adapter, merged into its base model (``merge.py``), as ONNX graphs for onnxruntime.

``export_onnx(adapter_dir, out_dir)`` writes two graphs, the processor/tokenizer files and ``manifest.json``:

- ``vision.onnx``: vision tower + connector, pixels -> image features [n_tokens, hidden] (one row per image token).
- ``decoder.onnx``: token ids [1, L] + image features [n, hidden] + 4-D additive attention mask + position ids +
  past keys/values of every layer -> last-position logits [1, V] + present keys/values. Inside: the embedding
  lookup, the image features written into the image-token rows (the models' masked_scatter), the text model and
  the lm_head. The prefill is this graph over the whole prompt with an empty past; a decode step is this graph on
  one new token with the past and zero image features.

Why not optimum: its ONNX exporter covers neither Idefics3/SmolVLM nor Qwen2-VL and pins an older transformers,
so everything here is ``torch.onnx.export(dynamo=True)`` on small wrapper modules (``graphs.py``, and the vision
graph of each family in ``families/``).

Deviations from a plain "export the model" and why:

- Prefill and decode share one decoder graph (an empty past is a [1, kv_heads, 0, head_dim] tensor), so the text
  weights are stored (and exported) once, not twice as with separate prefill and decode-with-past graphs.
- The causal mask is an input (built by the runner in numpy), not built in the graph: transformers' mask helpers
  branch on shapes and would be specialised at trace time. Position ids are inputs for the same reason, and
  because Qwen2-VL's 3-D rope positions come from a data-dependent loop over the prompt.
- Qwen2-VL's vision attention splits the patch sequence per image with ``.tolist()`` (not exportable). The wrapper
  runs the same blocks with one attention over all patches under a block-diagonal mask built in the graph from a
  ``segment_ids`` input (one segment per image), and takes the vision rope positions as an input.
  Qwen2.5-VL's window attention is the same with same-window masks; LLaVA's tower is run up to its feature layer
  by hand (``families/``: each module says what it replaces and why).
- A quantized base is dequantized to fp32 before the merge (``merge.py``).
- An adapter that trains the vision side (``--lora-targets vision/all``, ``--train-norms``) is merged into the vision
  tower and connector like the language LoRA, so ``vision.onnx`` carries the adapted tower; the manifest records
  what the adapter trains (``adapter.lora_targets``, ``adapter.train_norms``).
- ``--int8``: onnxruntime dynamic quantization (int8 weights of MatMul/Gemm, activations quantized at run time) of
  every graph, written beside the fp32 graphs (``*.int8.onnx``); the runner picks them with ``int8=True``.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..models.loading import load_vlm, resolve_model_path
from ..models.lora import adapted_targets
from .families import export_family
from .graphs import DecoderGraph, architecture, decoder_example, image_config, probe_image
from .merge import adapter_sha256, base_model_for, merge_lora

__all__ = ["DEFAULT_OPSET", "export_lines", "export_onnx", "export_summary", "quantize_int8"]

DEFAULT_OPSET = 18
FORMAT = "ttrv-edge-onnx/1"
GRAPHS = ("vision", "decoder")
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf files stop at 2 GB: larger graphs keep weights in a .data file


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


def export_onnx(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    int8: bool = False,
    quantize: str = "none",
    opset: int = DEFAULT_OPSET,
    trust_remote_code: bool = False,
    check: bool = True,
    log=None,
) -> dict:
    """Merge ``adapter_dir`` into its base model and write the ONNX graphs, processor files and manifest.json to
    ``out_dir``. ``model`` overrides the base recorded in the adapter. ``int8`` adds dynamically quantized copies.
    ``quantize`` is the base quantization the adapter was adapted on (``adapt --quantize``): the base is quantized
    the same way, then dequantized, so the merged weights are the ones the adapter was trained against.
    ``check`` runs the exported graphs once on a probe image and records their agreement with torch in the manifest.
    ``log`` (a callable taking a string) receives progress lines. Returns the manifest."""
    started = time.perf_counter()
    log = log or (lambda message: None)
    if opset < DEFAULT_OPSET:
        raise ValueError(f"--opset: the dynamo exporter needs opset >= {DEFAULT_OPSET}, got {opset}")
    adapter = adapter_sha256(adapter_dir)
    base = resolve_model_path(base_model_for(adapter_dir, model))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR: {out} exists and is not a folder")
    log(f"loading {base} with the adapter")
    vlm = load_vlm(
        base,
        adapter=str(adapter_dir),
        device="cpu",
        dtype=torch.float32,
        trust_remote_code=trust_remote_code,
        **_quantize_kwargs(quantize),
    )
    arch = architecture(vlm.model.get_base_model())
    targets, norms = adapted_targets(vlm.model)
    adapter["lora_targets"], adapter["train_norms"] = targets, norms
    eos_ids = vlm.eos_token_ids
    merged = merge_lora(vlm.model)
    out.mkdir(parents=True, exist_ok=True)
    _write_processor_files(vlm, out)
    image_cfg = image_config(vlm.processor, arch)
    text_info = _export_graphs(merged, vlm, arch, image_cfg, out, opset, log)
    manifest = {
        "format": FORMAT,
        "architecture": arch,
        "model_type": merged.config.model_type,
        "source_model": str(base),
        "adapter": {"path": str(Path(adapter_dir).resolve()), **adapter},
        "base_quantization": quantize,
        "opset": opset,
        "exporter": {"torch": torch.__version__, "transformers": _version("transformers"), "dtype": "float32"},
        "graphs": {name: _graph_signature(out / f"{name}.onnx") for name in GRAPHS},
        "text": text_info,
        "tokens": _token_info(merged, vlm, eos_ids),
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


def _export_graphs(merged, vlm, arch: str, image_cfg: dict, out: Path, opset: int, log) -> dict:
    """Write vision.onnx and decoder.onnx; returns the decoder's KV-cache layout for the manifest."""
    batch = vlm.processor(images=[probe_image()], text=[_probe_prompt(vlm)], return_tensors="pt")
    with torch.no_grad():
        torch.manual_seed(0)
        family = export_family(arch)
        args, names, axes = family.vision_example(batch, image_cfg)
        vision = family.vision_graph(merged)
        log("exporting vision.onnx")
        _export_graph(vision.eval(), args, out / "vision.onnx", names, ["image_features"], axes, opset)
        text = family.text_model(merged)
        image_token_id = int(merged.config.image_token_id)
        args, inputs, outputs, axes, text_info = decoder_example(text.config, family.MROPE, image_token_id)
        log("exporting decoder.onnx")
        decoder = DecoderGraph(text, merged.get_output_embeddings(), image_token_id).eval()
        _export_graph(decoder, args, out / "decoder.onnx", inputs, outputs, axes, opset)
    vocab = int(merged.get_output_embeddings().weight.shape[0])
    return text_info | {"vocab_size": vocab, "dtype": "float32"}


def _token_info(merged, vlm, eos_ids: list[int]) -> dict:
    """What decoding and text handling need: EOS, suppressed and image token ids, special tokens, cleanup."""
    return {
        "eos_token_ids": eos_ids,
        "suppress_token_ids": sorted(int(i) for i in (merged.generation_config.suppress_tokens or [])),
        "image_token_id": int(merged.config.image_token_id),
        "special_tokens": {k: v for k, v in vlm.tokenizer.special_tokens_map.items() if isinstance(v, str)},
        "clean_up_tokenization_spaces": bool(getattr(vlm.tokenizer, "clean_up_tokenization_spaces", False)),
    }


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


def _quantize_kwargs(quantize: str) -> dict:
    if quantize == "none":
        return {}
    if "quantize" not in inspect.signature(load_vlm).parameters:
        raise ValueError("--quantize: this ttrv-edge build cannot quantize a base model")
    return {"quantize": quantize}


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
    from ..runtime.runner import OnnxVLM

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
