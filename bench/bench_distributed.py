"""Seconds per epoch of a transductive run with P=1 and P=2 processes on one set (``ttrv_edge/rl/distributed.py``).

The demo model (``--model demo``, a 2 MB Idefics3 trained on synthetic shape scenes) adapts to ``--items`` demo
scenes under gaussian noise (severity 3, as in the shift benchmark: multiple choice, and the model is unsure enough
that the groups carry signal); every configuration runs the same command on the same set:

- ``P=1, T threads``: one process, ``OMP_NUM_THREADS=T`` (``ttrv-edge adapt``: T=2 uses the whole 2-core machine,
  T=1 is one rank's share of it);
- ``P=2, 1 thread``: ``torchrun --standalone --nproc_per_node 2`` with gloo, one thread per rank (torchrun's
  default), each rank sampling and training on half of every step.

Per run: seconds per epoch (the steps' wall time, from rank 0's step records, which include the waits at the
collectives), the whole adaptation (answering before and after included, model loading and process start excluded),
the time per step spent in collectives (all-reduces and gathers, waits for the slower rank included), the pure cost of
one all-reduce of the LoRA gradients (the flat buffer, timed after a barrier, 30 repeats), the max |difference| of the
final adapter from the P=1 (1 thread) one, and the 1-minute load average before and after (the machine is shared:
other jobs add time). Writes ``bench/results/distributed.csv``, ``.png`` and ``.md``.

  python bench/bench_distributed.py --items 48 --batch-size 8 --epochs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "model",
    "items",
    "batch_size",
    "rollouts",
    "epochs",
    "steps",
    "processes",
    "threads_per_process",
    "repeat",
    "seconds_per_epoch",
    "adapt_seconds",
    "step_seconds_mean",
    "comm_seconds_per_step",
    "comm_share_of_step",
    "allreduce_ms",
    "lora_grad_numel",
    "max_abs_diff_vs_p1_1thread",
    "updates_run",
    "loadavg_1m_before",
    "loadavg_1m_after",
    "cpus",
    "torch",
    "date",
)
CONFIGS = ((1, 2), (1, 1), (2, 1))  # (processes, threads per process)


def make_set(folder: Path, count: int) -> Path:
    """``count`` demo scenes under gaussian noise as PNG files and a JSONL file of their questions and choices."""
    from ttrv_edge.demo.scenes import make_scene
    from ttrv_edge.demo.shift import corrupt

    lines = []
    for seed in range(count):
        scene = make_scene(seed)
        corrupt(scene.image(), "gaussian_noise", 3, seed=seed).save(folder / f"scene-{seed:04d}.png")
        question = scene.question
        lines.append(
            json.dumps({"image": f"scene-{seed:04d}.png", "question": question.text, "choices": question.choices})
        )
    data = folder / "set.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data


# ------------------------------------------------------------------------------------------------ one run (a rank)


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: adapt, time the steps and their collectives, rank 0 writes the results."""
    import torch

    from ttrv_edge.api import TTRVModel
    from ttrv_edge.io.answers import Question
    from ttrv_edge.io.inputs import collect_items
    from ttrv_edge.rl import distributed
    from ttrv_edge.rl.loop import AdaptationLoop

    launch = distributed.launch_from_env()
    group = distributed.init(launch) if launch is not None else distributed.SINGLE
    options = dict(rollouts=args.rollouts, batch_size=args.batch_size, epochs=args.epochs, seed=0)
    model = TTRVModel.from_pretrained(args.model, **options)
    _, items = collect_items(Path(args.data), Question("What is shown in the image?"), [])
    steps: list[tuple[int, float, float]] = []
    real_step = AdaptationLoop.step

    def timed_step(self, batch, step, seed):
        comm, start = group.comm_seconds, time.perf_counter()
        record = real_step(self, batch, step, seed)
        steps.append((step, time.perf_counter() - start, group.comm_seconds - comm))
        return record

    AdaptationLoop.step = timed_step
    group.barrier()
    start = time.perf_counter()
    model.adapt_dataset(items)
    adapt_seconds = time.perf_counter() - start
    model.save_adapter(Path(args.out) / "adapter")
    params = [p for p in model.vlm.model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    allreduce_ms = None
    if group.enabled:
        flat = torch.zeros(numel, device=group.device)
        group.barrier()
        begin = time.perf_counter()
        for _ in range(30):
            torch.distributed.all_reduce(flat)
        allreduce_ms = (time.perf_counter() - begin) / 30 * 1000
    if group.is_main:
        per_epoch: dict[int, float] = {}
        steps_per_epoch = -(-len(items) // args.batch_size)
        for step, seconds, _ in steps:
            per_epoch[step // steps_per_epoch] = per_epoch.get(step // steps_per_epoch, 0.0) + seconds
        result = {
            "seconds_per_epoch": sum(per_epoch.values()) / len(per_epoch),
            "adapt_seconds": adapt_seconds,
            "step_seconds_mean": sum(s for _, s, _ in steps) / len(steps),
            "comm_seconds_per_step": sum(c for _, _, c in steps) / len(steps),
            "steps": len(steps),
            "allreduce_ms": allreduce_ms,
            "lora_grad_numel": numel,
            "updates_run": model.run_info["updates_run"],
        }
        (Path(args.out) / "result.json").write_text(json.dumps(result), encoding="utf-8")
    if launch is not None:
        distributed.shutdown()


# ------------------------------------------------------------------------------------------------ the configurations


def run_config(args, data: Path, processes: int, threads: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    script = [str(Path(__file__).resolve()), "--worker", "--data", str(data), "--out", str(out)]
    script += ["--model", args.model, "--rollouts", str(args.rollouts), "--batch-size", str(args.batch_size)]
    script += ["--epochs", str(args.epochs)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    before = os.getloadavg()[0]
    done = subprocess.run([*launcher, *script], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"P={processes} T={threads} failed:\n{done.stderr[-3000:]}")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    result.update(loadavg_1m_before=round(before, 2), loadavg_1m_after=round(os.getloadavg()[0], 2))
    return result


def max_abs_diff(a: Path, b: Path) -> float:
    """Max |a - b| over the adapters the two runs saved."""
    from safetensors.torch import load_file

    a, b = a / "adapter", b / "adapter"

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "distributed.csv"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (the best is reported)")
    parser.add_argument("--from-csv", action="store_true", help="redraw the plot and summary of --out's CSV")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.from_csv:
        return summarise(read_rows(Path(args.out)), Path(args.out))
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        data = make_set(Path(tmp), args.items)
        for repeat in range(args.repeats):  # round-robin, so that a busy minute does not hit one configuration only
            for processes, threads in CONFIGS:
                out = Path(tmp) / f"p{processes}t{threads}r{repeat}"
                print(f"P={processes}, {threads} thread(s) per process, run {repeat + 1} ...", file=sys.stderr)
                result = run_config(args, data, processes, threads, out)
                rows.append({"processes": processes, "threads_per_process": threads, "repeat": repeat, **result})
                rows[-1]["out"] = out
        for row in rows:
            row["max_abs_diff_vs_p1_1thread"] = f"{max_abs_diff(row.pop('out'), Path(tmp) / 'p1t1r0'):.3g}"
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for row in rows:
        row.update(model=args.model, items=args.items, batch_size=args.batch_size, rollouts=args.rollouts)
        row.update(epochs=args.epochs, cpus=os.cpu_count(), torch=torch.__version__, date=stamp)
        row["comm_share_of_step"] = round(row["comm_seconds_per_step"] / row["step_seconds_mean"], 3)
        for key in ("seconds_per_epoch", "adapt_seconds", "step_seconds_mean", "comm_seconds_per_step"):
            row[key] = round(row[key], 4)
        row["allreduce_ms"] = "" if row["allreduce_ms"] is None else round(row["allreduce_ms"], 3)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summarise(read_rows(path), path)


def read_rows(path: Path) -> list[dict]:
    """The CSV's rows with numbers as numbers (the empty all-reduce cell of a P=1 run stays "")."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, value in row.items():
            try:
                row[key] = int(value) if value.lstrip("-").isdigit() else float(value)
            except ValueError:
                pass
    return rows


def summarise(rows: list[dict], path: Path) -> None:
    """The plot and the markdown summary of the best run of each configuration."""
    best = [min((r for r in rows if (r["processes"], r["threads_per_process"]) == c), key=seconds) for c in CONFIGS]
    plot(best, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(report(best, rows), encoding="utf-8")
    print(path.with_suffix(".md").read_text(encoding="utf-8"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"P={r['processes']}\n{r['threads_per_process']} thread(s) each" for r in rows]
    comm = [r["comm_seconds_per_step"] * r["steps"] / r["epochs"] for r in rows]
    compute = [r["seconds_per_epoch"] - c for r, c in zip(rows, comm)]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.bar(labels, compute, label="sampling + backward", color="#4c72b0")
    ax.bar(labels, comm, bottom=compute, label="in collectives (incl. waits)", color="#dd8452")
    for x, r in enumerate(rows):
        ax.text(x, r["seconds_per_epoch"], f"{r['seconds_per_epoch']:.1f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds per epoch")
    ax.set_ylim(0, 1.15 * max(r["seconds_per_epoch"] for r in rows))
    r = rows[0]
    ax.set_title(
        f"{r['model']} model, {r['items']} scenes, batch {r['batch_size']}, N={r['rollouts']}, {r['cpus']} CPUs"
    )
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def seconds(row: dict) -> float:
    return row["seconds_per_epoch"]


def ratio(slow: dict, fast: dict) -> float:
    return slow["seconds_per_epoch"] / fast["seconds_per_epoch"]


def report(rows: list[dict], every: list[dict]) -> str:
    """The markdown summary: the best run of each configuration (``rows``), the spread over all runs (``every``)."""
    by = {(r["processes"], r["threads_per_process"]): r for r in rows}
    spread = {key: [seconds(r) for r in every if (r["processes"], r["threads_per_process"]) == key] for key in by}
    whole, one, two = by[1, 2], by[1, 1], by[2, 1]
    lines = [
        "# Data-parallel transductive adaptation on CPU: P=1 vs P=2",
        "",
        f"`python bench/bench_distributed.py --items {whole['items']} --batch-size {whole['batch_size']} "
        f"--rollouts {whole['rollouts']} --epochs {whole['epochs']} --repeats {len(every) // len(rows)}` "
        f"({whole['date']}, torch {whole['torch']}, {platform.machine()}, {whole['cpus']} CPUs, gloo). "
        "Model: the demo model (2 MB Idefics3), demo scenes "
        f"under gaussian noise (severity 3); {whole['steps']} update steps, {whole['updates_run']} of them updated.",
        "",
        f"Best of {len(every) // len(rows)} runs per configuration (round-robin); all runs are in the CSV.",
        "",
        "| processes x threads | s / epoch (all runs) | adaptation s | s / step | in collectives / step | share | "
        "all-reduce of the LoRA grads | max abs diff vs P=1 (1 thread) | load 1 min before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reduce = f"{r['allreduce_ms']} ms ({r['lora_grad_numel']} floats)" if r["allreduce_ms"] != "" else "-"
        lines.append(
            f"| {r['processes']} x {r['threads_per_process']} | {r['seconds_per_epoch']:.2f} "
            f"({', '.join(f'{x:.1f}' for x in spread[r['processes'], r['threads_per_process']])}) | "
            f"{r['adapt_seconds']:.1f} | {r['step_seconds_mean']:.3f} | {r['comm_seconds_per_step'] * 1000:.1f} ms | "
            f"{r['comm_share_of_step']:.0%} | {reduce} | {r['max_abs_diff_vs_p1_1thread']} | "
            f"{r['loadavg_1m_before']} / {r['loadavg_1m_after']} |"
        )
    lines += [
        "",
        f"- Speed-up of P=2 over one process using both cores: {ratio(whole, two):.2f}x per epoch; over one "
        f"single-threaded process (one rank's share): {ratio(one, two):.2f}x.",
        "- The time in collectives includes waiting for the slower rank (the ranks' inputs decode to different "
        "lengths); the all-reduce itself is the column beside it.",
        "- The machine is shared with other jobs: the 1-minute load average is recorded before and after each run (it "
        "counts the benchmark's own 1-2 busy threads too); the spread between the runs of one configuration is that "
        "noise.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
