"""Latency per answer on CPU: torch (the adapter unmerged, as `ttrv-edge adapt` answers; and merged) vs onnxruntime
(fp32 and dynamic int8 graphs from `ttrv-edge export`), in one run, on the same images and questions.

    python bench/bench_onnx.py --n 64 --threads 1,2                                   # the demo model (default)
    python bench/bench_onnx.py --model demo --adapter ttrv-out --n 64                  # with an adapted LoRA
    python bench/bench_onnx.py --model tiny --n 24 --stem onnx_latency_tiny           # the tiny random model

Writes bench/results/<stem>.csv (one row per provider and thread count) and <stem>.png. The inputs are the demo's
synthetic scenes and questions (``ttrv_edge.demo.scenes``), so ``accuracy`` (answers equal to the scene's correct
letter) means something for the demo model; for random models it is chance or zero.

What is timed: one answer = preprocessing (processor / numpy), the vision encoder, the prefill and greedy decoding
with the KV cache up to ``--new-tokens`` tokens (stopping at EOS), then answer extraction: the whole
`answer` path, from a PIL image to the extracted answer. ms: median (and mean, p90) over ``--n`` answers after
``--warmup`` answers. Threads: ``torch.set_num_threads`` for torch, ``intra_op_num_threads`` for onnxruntime.
OMP_WAIT_POLICY is PASSIVE unless set (tiny models on a shared CPU, see ttrv_edge/cli.py); it is recorded in the CSV.
Agreement columns: the fraction of answers (extracted) and texts identical to the unmerged torch model's;
``answered``: the fraction of texts an answer could be extracted from (random models mostly answer nothing).

Without ``--adapter`` the model gets a fresh LoRA, zero (the base model's answers) unless ``--perturb STD`` adds
Gaussian noise to lora_B; the latency does not depend on the LoRA values.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "model",
    "provider",
    "threads",
    "n",
    "ms_median",
    "ms_mean",
    "ms_p90",
    "new_tokens_mean",
    "ms_per_token",
    "answered",
    "accuracy",
    "answer_agreement",
    "text_agreement",
    "graph_MB",
    "omp_wait_policy",
)


def scenes(n: int, seed: int):
    """n (image, Question, correct letter) triples: the demo's synthetic scenes (ttrv_edge.demo.scenes)."""
    from ttrv_edge.demo.scenes import make_scene

    out = []
    for index in range(n):
        scene = make_scene(seed * 100_000 + index)
        out.append((scene.image(), scene.question, scene.answer))
    return out


def _adapter_dir(args, vlm, workdir: Path) -> Path:
    if args.adapter:
        return Path(args.adapter)
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in vlm.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * args.perturb)
    vlm.model.save_pretrained(workdir / "adapter", safe_serialization=True)
    return workdir / "adapter"


def _time(answer_fn, items, warmup: int):
    for image, question, _ in items[:warmup]:
        answer_fn(image, question)
    times, outputs = [], []
    for image, question, _ in items:
        started = time.perf_counter()
        outputs.append(answer_fn(image, question))
        times.append((time.perf_counter() - started) * 1000)
    return times, outputs


def _row(model, provider, threads, times, outputs, reference, truth, graph_mb) -> dict:
    tokens = statistics.mean(o[2] for o in outputs)
    same_answer = sum(o[0] == r[0] for o, r in zip(outputs, reference)) / len(outputs)
    same_text = sum(o[1] == r[1] for o, r in zip(outputs, reference)) / len(outputs)
    median = statistics.median(times)
    return {
        "model": model,
        "provider": provider,
        "threads": threads,
        "n": len(times),
        "ms_median": round(median, 2),
        "ms_mean": round(statistics.mean(times), 2),
        "ms_p90": round(float(np.percentile(times, 90)), 2),
        "new_tokens_mean": round(tokens, 2),
        "ms_per_token": round(median / max(tokens, 1), 3),
        "answered": round(sum(o[0] is not None for o in outputs) / len(outputs), 3),
        "accuracy": round(sum(o[0] == t for o, t in zip(outputs, truth)) / len(outputs), 3),
        "answer_agreement": round(same_answer, 3),
        "text_agreement": round(same_text, 3),
        "graph_MB": graph_mb,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
    }


def run(args) -> list[dict]:
    import torch

    from ttrv_edge.export.merge import merge_lora
    from ttrv_edge.export.onnx import export_onnx
    from ttrv_edge.models import load_vlm
    from ttrv_edge.runtime.runner import OnnxVLM, load_manifest

    workdir = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    torch.set_grad_enabled(False)
    torch.manual_seed(args.seed)  # a fresh LoRA's lora_A is drawn from torch's global generator
    if args.onnx and not args.adapter:  # the torch side must run the adapter that was exported
        args.adapter = load_manifest(args.onnx)["adapter"]["path"]
    vlm = load_vlm(args.model, device="cpu", dtype=torch.float32, adapter=args.adapter)
    adapter = _adapter_dir(args, vlm, workdir)
    onnx_dir = Path(args.onnx) if args.onnx else workdir / "onnx"
    if not args.onnx:
        print(f"exporting to {onnx_dir} ...", file=sys.stderr)
        export_onnx(adapter, onnx_dir, model=args.model, int8=True)
    merged_vlm = load_vlm(args.model, device="cpu", dtype=torch.float32, adapter=str(adapter))
    merged_vlm.model = merge_lora(merged_vlm.model)
    items = scenes(args.n, args.seed)
    truth = [answer for _, _, answer in items]
    quantized = load_manifest(onnx_dir)["int8"].values()
    sizes = {"fp32": sum(q["fp32_bytes"] for q in quantized) / 1e6, "int8": sum(q["bytes"] for q in quantized) / 1e6}

    def torch_answer(model_vlm):
        def answer(image, question):  # what rl.sampling.greedy_text does for one prompt, keeping the token count
            inputs = model_vlm.prompt_inputs(image, question.prompt())
            sequences = model_vlm.model.generate(
                **inputs,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=model_vlm.eos_token_ids,
                pad_token_id=model_vlm.pad_token_id,
            )
            new = sequences[0, inputs["input_ids"].shape[1] :].tolist()
            text = model_vlm.tokenizer.decode(
                [t for t in new if t not in model_vlm.eos_token_ids], skip_special_tokens=True
            )
            return question.extract(text), text, len(new)

        return answer

    def onnx_answer(runner):
        def answer(image, question):
            result = runner.answer(image, question, max_new_tokens=args.new_tokens)
            return result["answer"], result["text"], result["new_tokens"]

        return answer

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        providers = [
            ("torch (LoRA unmerged)", torch_answer(vlm), ""),
            ("torch (merged)", torch_answer(merged_vlm), ""),
            ("onnxruntime fp32", onnx_answer(OnnxVLM(onnx_dir, threads=threads)), round(sizes["fp32"], 2)),
            ("onnxruntime int8", onnx_answer(OnnxVLM(onnx_dir, int8=True, threads=threads)), round(sizes["int8"], 2)),
        ]
        reference = None
        for provider, fn, mb in providers:
            times, outputs = _time(fn, items, args.warmup)
            reference = reference or outputs
            rows.append(_row(args.label or args.model, provider, threads, times, outputs, reference, truth, mb))
            print(rows[-1], file=sys.stderr)
    return rows


def write(rows: list[dict], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    providers = list(dict.fromkeys(r["provider"] for r in rows))
    threads = sorted({r["threads"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(threads)
    for j, t in enumerate(threads):
        values = [next(r["ms_median"] for r in rows if r["provider"] == p and r["threads"] == t) for p in providers]
        bars = ax.bar(np.arange(len(providers)) + j * width, values, width, label=f"{t} thread(s)")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(np.arange(len(providers)) + width * (len(threads) - 1) / 2, providers, fontsize=8)
    ax.set_ylabel("ms per answer (median)")
    ax.set_title(f"{rows[0]['model']}\none answer on CPU (preprocess + vision + greedy decode)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="model folder, hub id, 'demo' or 'tiny' (default demo)")
    parser.add_argument("--label", default=None, help="model name written in the CSV and plot (default: --model)")
    parser.add_argument("--adapter", default=None, help="a LoRA adapter folder (default: a fresh perturbed LoRA)")
    parser.add_argument("--perturb", type=float, default=0.0, help="std of noise put in a fresh LoRA's lora_B")
    parser.add_argument(
        "--onnx", default=None, help="reuse this export folder instead of exporting (torch runs its recorded adapter)"
    )
    parser.add_argument("--n", type=int, default=24, help="answers timed per provider")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16, help="max new tokens per answer")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stem", default="onnx_latency", help="output file name stem under bench/results/")
    args = parser.parse_args()
    rows = run(args)
    write(rows, args.stem)
    for r in rows:
        print(
            f"{r['provider']:24s} threads={r['threads']} {r['ms_median']:8.1f} ms/answer  "
            f"answers={r['answer_agreement']:.2f} texts={r['text_agreement']:.2f}"
        )


if __name__ == "__main__":
    main()
