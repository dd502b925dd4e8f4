"""Peak memory and step time of one TTRV step on real-size architectures, against a TRL-style baseline.

For every (model, quantization, N) the script runs these methods, on CPU each in a fresh process (so peak RSS
starts clean), on CUDA every case of a (model, quantization) in one process after an untimed warm-up of the same
method at N=3 (the peak is reset per case; one process per case would spend most of a GPU session loading):

- ``ttrv``: ttrv-edge's step: image encoded and prompt prefilled once, N rollouts decoded from the shared KV cache,
  then the loss forward/backward with the image encoded once and the fused lm_head+log-prob kernel (no [N, T, V]
  logits), micro-batched by the memory planner (``--memory-budget``), LoRA-only AdamW step;
- ``trl``: what TRL's GRPOTrainer computes for the same step: ``generate(num_return_sequences=N)`` (prompt and
  image repeated N times), one forward with full completion logits [N, T, V] (``logits_to_keep``), eager
  log-softmax + gather and the entropy from those logits, token-mean GRPO loss, backward, the same AdamW step;
- ``sample-shared`` / ``sample-plain``: the sampling phase alone, from the shared prefix (ttrv-edge) or by
  ``generate(num_return_sequences=N)``, same seed and settings (the shared-prefix sampling benchmark).

Both load the model with the same ``load_vlm`` (same LoRA, same quantization) and measure the same way: the peak is
reset after loading and one warm-up generate (and on CUDA the warm-up step), then one step is timed. Peak memory is
``max_memory_allocated`` on CUDA and the process's peak RSS (VmHWM) on CPU; the ttrv row also gives the planner's
first estimate and its error, and per phase (sample, train) the first estimate beside the measured peak.
The models have random weights (bench/real_size.py), so rollouts rarely stop early: every rollout runs
``--new-tokens`` tokens. On CPU the OpenMP wait policy is set per run (``--omp-policy``) and written in the CSV, with
the 1-minute load average when the run started. The step is the single-image one (``views=1``).

``ttrv-edge doctor`` runs once per (model, N), in its own process, on the same model folder with the same N, new
tokens and image size; its estimate of the step's peak (CPU fp32, or the GPU bf16 one on CUDA) is written beside the
measured peak of the unquantized ttrv rows (``doctor_estimate_bytes``, ``doctor_error``). Rows are merged into
``--out``: only the cases measured again are replaced (``memory_report.py``), and a markdown table (``.md``) and the
PNG are written from all rows. ``--dry-run`` prints the runs and the doctor commands without building anything.

  python bench/bench_memory.py --models smolvlm-256m --quantize none,int8 --rollouts 4,8 --new-tokens 8
  python bench/bench_memory.py --models internvl3-1b --quantize none --rollouts 8 --methods ttrv --repeats 2
  python bench/bench_memory.py --device cuda --models smolvlm-500m,qwen2-vl-2b --quantize none,nf4 \\
      --rollouts 8,16 --new-tokens 64 --dtype bf16 --memory-budget 6GB --out bench/results/memory_gpu.csv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import error_line, versions
from memory_report import merge_rows, plot, read_csv, write_csv, write_markdown

LIBRARIES = ("torch", "transformers", "peft", "triton", "bitsandbytes", "optimum-quanto")

RESULTS = Path(__file__).resolve().parent / "results"


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
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG and .md of --out from its CSV")
    parser.add_argument("--no-doctor", action="store_true", help="skip `ttrv-edge doctor`'s estimate")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and doctor commands, build nothing")
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
        """Answers x, y, x, x, y, ... in call order (a fresh one per run): every group has non-zero advantages."""

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
        views=1,
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
    phases = {f"{phase}_estimate_bytes": value for phase, value in report["estimated_peak_bytes"].items()}
    phases.update({f"{phase}_peak_bytes": value for phase, value in report["measured_peak_bytes"].items()})
    return {
        **phases,
        "resident_bytes": report["resident_bytes"],
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


def worker(jobs: list[dict]) -> list[dict]:
    """Run ``jobs`` (one model and quantization) in this process; one row per job.

    CPU: one job per process (peak RSS cannot be reset reliably enough between jobs). CUDA: every job of a model and
    quantization in one process, each after an untimed warm-up of the same method at 3 rollouts and 4 new tokens
    (Triton kernels compiled, cuBLAS initialised); the peak is ``max_memory_allocated``, reset before each job."""
    import gc

    import torch

    from ttrv_edge.memory import PeakMeter
    from ttrv_edge.models import load_vlm
    from ttrv_edge.rl.sampling import greedy_text

    first = jobs[0]
    torch.set_num_threads(first["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[first["dtype"]]
    vlm = load_vlm(first["model_dir"], quantize=first["quantize"], dtype=dtype, device=first["device"])
    meter = PeakMeter(vlm.device)
    inputs = vlm.prompt_inputs(_image(first["image_size"]), _pattern_question().prompt())
    greedy_text(vlm, inputs, max_new_tokens=2)  # warm-up: weights paged in, kernels initialised
    loaded = meter.current()
    meta = versions(vlm.device, {dist: dist for dist in LIBRARIES})
    rows = []
    for job in jobs:  # a failing job is recorded and the next one still runs
        warm = vlm.device.type == "cuda"
        try:
            if warm:
                RUNS[job["method"]](vlm, inputs, _pattern_question(), {**job, "rollouts": 3, "new_tokens": 4}, meter)
                gc.collect()
                torch.cuda.empty_cache()
            meter.reset()
            row = RUNS[job["method"]](vlm, inputs, _pattern_question(), job, meter)
            row["step_s"] = row["sample_s"] + row["update_s"]
        except Exception as exc:  # noqa: BLE001 - out of memory, a library's error: the row says which
            row = {"error": error_line(exc, 250)}
        row.update(prompt_tokens=int(inputs["input_ids"].shape[1]), loaded_bytes=loaded, warmed_up=warm, **meta)
        rows.append(row)
        gc.collect()
        if warm:
            torch.cuda.empty_cache()
    return rows


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


def _doctor_command(args, model_dir, image_size: int, rollouts: int) -> list[str] | None:
    """The ``ttrv-edge doctor`` command whose estimate matches the runs of (model, N), or None when none does."""
    if args.no_doctor or (args.device, args.dtype) not in (("cpu", "fp32"), ("cuda", "bf16")):
        return None
    if args.device == "cpu" and args.memory_budget:  # doctor's CPU estimate is for all rollouts at once
        return None
    command = [sys.executable, "-m", "ttrv_edge", "doctor", str(model_dir), "--rollouts", str(rollouts)]
    command += ["--max-new-tokens", str(args.new_tokens), "--image-size", f"{image_size}x{image_size}", "--json"]
    return command + ["--gpu-budget", args.memory_budget or "6GB"]


def _doctor_estimate(command: list[str] | None, args) -> int | None:
    if command is None:
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0 or not done.stdout.strip():
        print(f"doctor failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}", file=sys.stderr)
        return None
    estimate = json.loads(done.stdout)["estimate"]
    return estimate["cpu" if args.device == "cpu" else "gpu"]["peak_bytes"]


def _groups(jobs: list[dict], device: str) -> list[list[dict]]:
    """The jobs each worker process runs: one per process on CPU, one model and quantization per process on CUDA."""
    if device != "cuda":
        return [[job] for job in jobs]
    groups: dict[tuple, list[dict]] = {}
    for job in jobs:
        groups.setdefault((job["model"], job["quantize"]), []).append(job)
    return list(groups.values())


def _run_group(jobs: list[dict], args) -> list[dict]:
    env = dict(os.environ, OMP_WAIT_POLICY=args.omp_policy, OMP_NUM_THREADS=str(args.threads))
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    command = [sys.executable, __file__, "--worker", json.dumps(jobs)]
    keys = ("model", "method", "run", "quantize", "rollouts", "new_tokens", "device", "dtype", "threads")
    load = round(os.getloadavg()[0], 2)
    bases = [{**{k: job[k] for k in keys}, "omp_policy": args.omp_policy, "load_1m": load} for job in jobs]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout * len(jobs))
    except subprocess.TimeoutExpired:
        return [{**base, "error": f"timeout after {args.timeout * len(jobs)} s"} for base in bases]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return [{**base, "error": tail[:300]} for base in bases]
    rows = []
    for base, measured in zip(bases, json.loads(lines[-1]), strict=True):
        row = {**base, **measured}
        if row.get("peak_bytes") is not None:
            row["peak_GB"] = round(row["peak_bytes"] / 2**30, 3)
        for key in ("sample_s", "update_s", "step_s", "estimate_error"):
            if row.get(key) is not None:
                row[key] = round(row[key], 3)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        sys.stdout.write(json.dumps(worker(args.worker)) + "\n")
        return 0
    if args.replot:
        rows = read_csv(args.out)
        plot(rows, args.out.with_suffix(".png"))
        write_markdown(rows, args.out.with_suffix(".md"))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from real_size import build_model_dir, load_spec

    for method in args.methods:
        if method not in RUNS:
            raise SystemExit(f"--methods: unknown method {method!r} ({', '.join(RUNS)})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    specs = {name: load_spec(name) for name in args.models}
    dirs = {name: args.cache_dir / f"{name}-{args.dtype}" for name in specs}
    if args.dry_run:
        for job in _jobs(args, specs, dirs):
            print(json.dumps(job))
        for name in specs:
            for n in args.rollouts:
                print(
                    " ".join(_doctor_command(args, dirs[name], specs[name]["bench"]["image_size"], n) or ["no doctor"])
                )
        return 0
    for name, spec in specs.items():
        print(f"building {name} ...", file=sys.stderr, flush=True)
        dirs[name] = build_model_dir(spec, dirs[name], dtype=dtype)
    commands = {
        (name, n): _doctor_command(args, dirs[name], specs[name]["bench"]["image_size"], n)
        for name in specs
        for n in args.rollouts
    }
    with ThreadPoolExecutor(max_workers=min(8, len(commands))) as pool:  # CPU-only estimates, side by side
        doctor = dict(zip(commands, pool.map(lambda command: _doctor_estimate(command, args), commands.values())))
    old, rows = read_csv(args.out), []
    for group in _groups(list(_jobs(args, specs, dirs)), args.device):
        for row in _run_group(group, args):
            estimate = doctor[row["model"], row["rollouts"]]
            if estimate is not None and row.get("peak_bytes") and row["method"] == "ttrv" and row["quantize"] == "none":
                row.update(
                    doctor_estimate_bytes=estimate,
                    doctor_error=round((estimate - row["peak_bytes"]) / row["peak_bytes"], 3),
                )
            rows.append(row)
            shown = {k: row.get(k) for k in ("model", "method", "quantize", "rollouts", "peak_GB", "step_s", "error")}
            print(json.dumps(shown), file=sys.stderr, flush=True)
        write_csv(merge_rows(old, rows), args.out)
    merged = read_csv(args.out)
    plot(merged, args.out.with_suffix(".png"))
    write_markdown(merged, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and its .png and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
