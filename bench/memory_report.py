"""bench_memory.py's records: the CSV (merged with the rows already there), a markdown table and the PNG.

A run writes its rows into ``--out`` without dropping the rows of other cases: a committed row is replaced only by a
row of the same case (model, method, quantization, N, new tokens, device, dtype, run index), so measuring one more
architecture never overwrites the committed results of the others. The markdown table (``.md`` beside the CSV)
lists every row with the planner's and ``ttrv-edge doctor``'s estimates against the measured peak, and the machine's
1-minute load average when the run started.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

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
    "load_1m",
    "sample_s",
    "update_s",
    "step_s",
    "peak_bytes",
    "peak_GB",
    "loaded_bytes",
    "weights_bytes",
    "estimate_bytes",
    "estimate_error",
    "doctor_estimate_bytes",
    "doctor_error",
    "budget_bytes",
    "resident_bytes",
    "sample_estimate_bytes",
    "sample_peak_bytes",
    "train_estimate_bytes",
    "train_peak_bytes",
    "sample_micro_batch",
    "train_micro_batch",
    "warmed_up",
    "device_name",
    "torch",
    "transformers",
    "peft",
    "triton",
    "bitsandbytes",
    "optimum-quanto",
    "error",
)
CASE = ("model", "method", "quantize", "rollouts", "new_tokens", "device", "dtype", "run")


def case(row: dict) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in CASE)


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` without the cases ``new`` measured again, then ``new``, in order."""
    fresh = {case(r) for r in new}
    return [r for r in old if case(r) not in fresh] + list(new)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV written by ``write_csv`` (older files without the newer columns read as empty)."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as handle:
        for found in csv.DictReader(handle):
            row = {k: found.get(k) or "" for k in COLUMNS}
            for key in ("peak_GB", "step_s"):
                row[key] = float(row[key]) if row[key] else None
            row["rollouts"] = int(row["rollouts"])
            rows.append(row)
    return rows


def _gb(value) -> str:
    return f"{int(value) / 2**30:.2f}" if value not in (None, "") else "-"


def _pct(value) -> str:
    return f"{float(value):+.0%}" if value not in (None, "") else "-"


def write_markdown(rows: list[dict], path: Path) -> None:
    """Every row: measured peak and step time against the planner's and doctor's estimates."""
    head = (
        "| model | method | quantize | N | new tokens | prompt tokens | device, dtype, threads | load (1 min) "
        "| peak GB | step s | planner estimate GB (error) | doctor estimate GB (error) |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {r['quantize']} | {r['rollouts']} | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['method']} | {r['quantize']} | {r['rollouts']} | {r['new_tokens']} "
            f"| {r.get('prompt_tokens') or '-'} | {r['device']}, {r['dtype']}, {r['threads']} "
            f"| {r.get('load_1m') or '-'} | {_gb(r['peak_bytes'])} | {r['step_s']} "
            f"| {_gb(r.get('estimate_bytes'))} ({_pct(r.get('estimate_error'))}) "
            f"| {_gb(r.get('doctor_estimate_bytes'))} ({_pct(r.get('doctor_error'))}) |"
        )
    note = (
        "One TTRV step at random weights (bench/bench_memory.py); peak: CUDA max_memory_allocated or the process's "
        "peak RSS on CPU. Errors are (estimate - peak) / peak. Load: os.getloadavg() when the run started."
    )
    path.write_text(note + "\n\n" + "\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if not r.get("error")]
    if not good:
        return
    labels = sorted({(r["model"], r["quantize"], r["rollouts"]) for r in good})
    methods = sorted({r["method"] for r in good})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(labels)), 5))
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
        ax.set_xticks(ticks, names, fontsize=8, rotation=20, ha="right")
        ax.set_title(title)
        ax.legend()
    models = ", ".join(sorted({r["model"] for r in good}))
    tokens = ", ".join(sorted({str(r["new_tokens"]) for r in good}))
    fig.suptitle(
        f"{models}: one TTRV step, {tokens} new tokens, {good[0]['dtype']}, random weights\n"
        "(bars: median of runs, whiskers: min-max)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
