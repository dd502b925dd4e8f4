"""Peak memory and step time of one TTRV step on real-size architectures, against a TRL-style baseline.

For every (model, quantization, N) the script runs, each in a fresh process (so peak RSS starts clean):

- ``ttrv``: ttrv-edge's step: image encoded and prompt prefilled once, N rollouts decoded from the shared KV cache,
  then the loss forward/backward with the image encoded once and the fused lm_head+log-prob kernel (no [N, T, V]
  logits), micro-batched by the memory planner (``--memory-budget``), LoRA-only AdamW step;
- ``trl``: what TRL's GRPOTrainer computes for the same step: ``generate(num_return_sequences=N)`` (prompt and
  image repeated N times), one forward with full completion logits [N, T, V] (``logits_to_keep``), eager
  log-softmax + gather and the entropy from those logits, token-mean GRPO loss, backward, the same AdamW step;
- ``sample-shared`` / ``sample-plain``: the sampling phase alone, from the shared prefix (ttrv-edge) or by
  ``generate(num_return_sequences=N)``, same seed and settings (the shared-prefix sampling benchmark).

Both load the model with the same ``load_vlm`` (same LoRA, same quantization) and measure the same way: the peak is
reset after loading and one warm-up generate, then one step is timed. Peak memory is ``max_memory_allocated`` on
CUDA and the process's peak RSS (VmHWM) on CPU; the ttrv row also gives the planner's first estimate and its error.
The models have random weights (bench/real_size.py), so rollouts rarely stop early: every rollout runs
``--new-tokens`` tokens. On CPU the OpenMP wait policy is set per run (``--omp-policy``) and written in the CSV.

  python bench/bench_memory.py --models smolvlm-256m --quantize none,int8 --rollouts 4,8 --new-tokens 8
  python bench/bench_memory.py --device cuda --models smolvlm-500m,qwen2-vl-2b --quantize none,nf4 \\
      --rollouts 8,16 --new-tokens 64 --dtype bf16 --memory-budget 6GB --out bench/results/memory_gpu.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "model",
    "method",
    "run",
    "quantize",
    "rollouts",
    "new_tokens",
    "prompt_tokens",
    "device",
    "dtype",
    "threads",
    "omp_policy",
    "sample_s",
    "update_s",
    "step_s",
    "peak_bytes",
    "peak_GB",
    "loaded_bytes",
    "weights_bytes",
    "estimate_bytes",
    "estimate_error",
    "budget_bytes",
    "sample_micro_batch",
    "train_micro_batch",
    "error",
)


def _csv_list(cast):
    return lambda text: [cast(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=_csv_list(str), default=["smolvlm-256m"], help="bench/configs names or paths")
    parser.add_argument("--quantize", type=_csv_list(str), default=["none", "int8"])
    parser.add_argument("--rollouts", type=_csv_list(int), default=[4, 8])
    parser.add_argument("--methods", type=_csv_list(str), default=["ttrv", "trl"])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--memory-budget", default=None, help="ttrv rows: the planner's budget (e.g. 4GB)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--omp-policy", default="ACTIVE", choices=("ACTIVE", "PASSIVE"))
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "ttrv-bench-models")
    parser.add_argument("--out", type=Path, default=RESULTS / "memory_cpu.csv")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process runs per case (CPU RSS is noisy)")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG of --out from its CSV")
    parser.add_argument("--worker", type=json.loads, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- one run (worker)


def _image(size: int):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 10, size // 10, size // 2, size // 2), fill=(220, 30, 30))
    draw.rectangle((size // 2, size // 2, size - size // 10, size - size // 10), fill=(30, 60, 220))
    return image


def _pattern_question():
    from ttrv_edge.io.answers import Question

    class Pattern(Question):
        """Answers x, x, y, ... in call order, so the random model's group has non-zero advantages."""

        def extract(self, text):
            count = self.__dict__.setdefault("_count", [0])
            count[0] += 1
            return "xxy"[count[0] % 3]

    return Pattern("Which shape is red? Answer with one word.")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ttrv(vlm, item_inputs, question, job, meter):
    from ttrv_edge.config import TTRVConfig
    from ttrv_edge.rl.loop import AdaptationLoop
    from ttrv_edge.rl.records import PreparedItem

    config = TTRVConfig(
        rollouts=job["rollouts"],
        max_new_tokens=job["new_tokens"],
        memory_budget=job["memory_budget"],
        quantize=job["quantize"],
        lr=1e-4,
    )
    loop = AdaptationLoop(vlm, config)
    item = PreparedItem("bench", question, item_inputs)
    start = time.perf_counter()
    rollouts, answers = loop.sample(item, seed=1)
    _sync(vlm.device)
    sampled = time.perf_counter()
    loss = loop.update([(rollouts, answers)]).loss
    _sync(vlm.device)
    done = time.perf_counter()
    if loss is None:
        raise RuntimeError("the update was skipped (no advantage signal)")
    report = loop.memory_report()
    estimate = max(v for v in report["estimated_peak_bytes"].values() if v is not None)
    peak = report["peak_memory_bytes"]
    return {
        "sample_s": sampled - start,
        "update_s": done - sampled,
        "peak_bytes": peak,
        "estimate_bytes": estimate,
        "estimate_error": (estimate - peak) / peak,
        "budget_bytes": report["budget_bytes"],
        "sample_micro_batch": report["sample_micro_batch"],
        "train_micro_batch": report["train_micro_batch"],
        "weights_bytes": report["weights_bytes"],
    }


def run_trl(vlm, inputs, question, job, meter):
    """TRL GRPOTrainer's computation for one step (generate with repeats, full logits, eager log-softmax)."""
    import torch

    from ttrv_edge.memory import model_costs
    from ttrv_edge.models import sequence_inputs
    from ttrv_edge.rl.rewards import compute_rewards
    from ttrv_edge.rl.sampling import completion_mask, decode

    model, n, new = vlm.model, job["rollouts"], job["new_tokens"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    meter.reset()
    start = time.perf_counter()
    torch.manual_seed(1)
    with torch.no_grad():
        sequences = model.generate(
            **inputs,
            num_return_sequences=n,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            eos_token_id=vlm.eos_token_ids,
            pad_token_id=vlm.pad_token_id,
        )
    prompt = inputs["input_ids"].shape[1]
    completions = sequences[:, prompt:]
    mask = completion_mask(completions, vlm.eos_token_ids)
    answers = [question.extract(t) for t in decode(vlm, completions, mask)]
    _sync(vlm.device)
    sampled = time.perf_counter()
    advantages = compute_rewards([answers], reward="ttrv", alpha=0.75).advantages[0].to(vlm.device)
    model.train()
    attention = torch.cat([inputs["attention_mask"].expand(n, -1), mask.to(inputs["attention_mask"].dtype)], 1)
    batch = sequence_inputs(inputs, sequences, attention)
    width = completions.shape[1]
    logits = model(**batch, logits_to_keep=width + 1).logits[:, :-1, :] / 1.0  # [N, T, V]
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # TRL's entropy_from_logits (logged)
    per_token = -torch.exp(logp - logp.detach()) * advantages.unsqueeze(1)
    loss = (per_token * mask).sum() / mask.sum().clamp_min(1.0)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    model.eval()
    del entropy
    _sync(vlm.device)
    done = time.perf_counter()
    return {
        "sample_s": sampled - start,
        "update_s": done - sampled,
        "peak_bytes": meter.peak(),
        "weights_bytes": model_costs(model).weights_bytes,
    }


def run_sampling(vlm, inputs, question, job, meter):
    """Only the N rollouts: shared prefix (``sample-shared``) or generate(num_return_sequences=N) (``sample-plain``)."""
    from ttrv_edge.memory import model_costs
    from ttrv_edge.rl.sampling import sample_rollouts

    meter.reset()
    start = time.perf_counter()
    sample_rollouts(
        vlm,
        inputs,
        job["rollouts"],
        temperature=1.0,
        max_new_tokens=job["new_tokens"],
        seed=1,
        shared_prefix=job["method"] == "sample-shared",
    )
    _sync(vlm.device)
    return {
        "sample_s": time.perf_counter() - start,
        "update_s": 0.0,
        "peak_bytes": meter.peak(),
        "weights_bytes": model_costs(vlm.model).weights_bytes,
    }


RUNS = {"ttrv": run_ttrv, "trl": run_trl, "sample-shared": run_sampling, "sample-plain": run_sampling}


def worker(job: dict) -> dict:
    import torch

    from ttrv_edge.memory import PeakMeter
    from ttrv_edge.models import load_vlm
    from ttrv_edge.rl.sampling import greedy_text

    torch.set_num_threads(job["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[job["dtype"]]
    vlm = load_vlm(job["model_dir"], quantize=job["quantize"], dtype=dtype, device=job["device"])
    meter = PeakMeter(vlm.device)
    question = _pattern_question()
    inputs = vlm.prompt_inputs(_image(job["image_size"]), question.prompt())
    greedy_text(vlm, inputs, max_new_tokens=2)  # warm-up: weights paged in, kernels initialised
    loaded = meter.current()
    meter.reset()
    row = RUNS[job["method"]](vlm, inputs, question, job, meter)
    row.update(prompt_tokens=int(inputs["input_ids"].shape[1]), loaded_bytes=loaded)
    row["step_s"] = row["sample_s"] + row["update_s"]
    return row


# ---------------------------------------------------------------------------------------------- the table


def _jobs(args, specs, dirs):
    for name in args.models:
        for quantize in args.quantize:
            for rollouts in args.rollouts:
                for method in args.methods:
                    for run in range(args.repeats):
                        yield {
                            "run": run,
                            "model": name,
                            "model_dir": str(dirs[name]),
                            "image_size": specs[name]["bench"]["image_size"],
                            "method": method,
                            "quantize": quantize,
                            "rollouts": rollouts,
                            "new_tokens": args.new_tokens,
                            "device": args.device,
                            "dtype": args.dtype,
                            "threads": args.threads,
                            "memory_budget": args.memory_budget,
                        }


def _run_job(job: dict, args) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=args.omp_policy, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    keys = ("model", "method", "run", "quantize", "rollouts", "new_tokens", "device", "dtype", "threads")
    base = {k: job[k] for k in keys}
    base["omp_policy"] = args.omp_policy
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timeout after {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**base, "error": tail[:300]}
    row = {**base, **json.loads(lines[-1])}
    row["peak_GB"] = round(row["peak_bytes"] / 2**30, 3)
    for key in ("sample_s", "update_s", "step_s", "estimate_error"):
        if row.get(key) is not None:
            row[key] = round(row[key], 3)
    return row


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key in ("peak_GB", "step_s"):
                row[key] = float(row[key]) if row.get(key) else None
            row["rollouts"] = int(row["rollouts"])
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error")]
    if not good:
        return
    labels = sorted({(r["model"], r["quantize"], r["rollouts"]) for r in good})
    methods = sorted({r["method"] for r in good})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(labels)), 4.5))
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs = [i + m * width for i in range(len(labels))]
        for ax, column in zip(axes, ("peak_GB", "step_s")):
            values = [
                [r[column] for r in good if r["method"] == method and (r["model"], r["quantize"], r["rollouts"]) == k]
                for k in labels
            ]
            medians = [statistics.median(v) if v else 0 for v in values]
            spread = [
                [med - (min(v) if v else 0) for med, v in zip(medians, values)],
                [(max(v) if v else 0) - med for med, v in zip(medians, values)],
            ]
            ax.bar(xs, medians, width, yerr=spread, capsize=3, label=method)
    ticks = [i + 0.4 - width / 2 for i in range(len(labels))]
    several = len({m for m, _, _ in labels}) > 1
    names = [(f"{m}\n" if several else "") + f"{q} N={n}" for m, q, n in labels]
    device = good[0]["device"]
    for ax, title in zip(axes, (f"peak memory (GB, {device})", f"step time (s, {device})")):
        ax.set_xticks(ticks, names, fontsize=8)
        ax.set_title(title)
        ax.legend()
    models = ", ".join(sorted({r["model"] for r in good}))
    fig.suptitle(
        f"{models}: one TTRV step, {good[0]['new_tokens']} new tokens, {good[0]['dtype']}, random weights\n"
        "(bars: median of runs, whiskers: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        sys.stdout.write(json.dumps(worker(args.worker)) + "\n")
        return 0
    if args.replot:
        plot(read_csv(args.out), args.out.with_suffix(".png"))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from real_size import build_model_dir, load_spec

    for method in args.methods:
        if method not in RUNS:
            raise SystemExit(f"--methods: unknown method {method!r} ({', '.join(RUNS)})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    specs = {name: load_spec(name) for name in args.models}
    dirs = {}
    for name, spec in specs.items():
        print(f"building {name} ...", file=sys.stderr, flush=True)
        dirs[name] = build_model_dir(spec, args.cache_dir / f"{name}-{args.dtype}", dtype=dtype)
    rows = []
    for job in _jobs(args, specs, dirs):
        row = _run_job(job, args)
        rows.append(row)
        shown = {k: row.get(k) for k in ("model", "method", "quantize", "rollouts", "peak_GB", "step_s", "error")}
        print(json.dumps(shown), file=sys.stderr, flush=True)
        write_csv(rows, args.out)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
