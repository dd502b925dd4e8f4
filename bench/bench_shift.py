"""The shift benchmark: base vs self-consistency vs TTRL vs TTRV (transductive, episodic) vs TENT per corruption.

    python bench/bench_shift.py run --corruptions all --severity 3 --n 64          # the main table
    python bench/bench_shift.py ablation --corruptions blur,contrast --n 48        # alpha, signal, N, rank
    python bench/bench_shift.py report                                             # CSV + markdown + PNG

``run`` and ``ablation`` append one JSON line per (condition, method/variant) to bench/results/shift_runs.jsonl and
shift_ablation.jsonl (so several processes can share the work and a crash loses one line, not the table); ``report``
renders the newest line of each condition into shift_table.csv / .md / .png and shift_ablation.csv / .md. Each
condition's scenes are encoded once and every method sees exactly the same inputs and seeds.

Everything goes through the public API (``ttrv_edge.api.TTRVModel`` and its ``AdaptationLoop``, ``TTRVModel.loop``);
the per-method code is in ``ttrv_edge.demo.eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from ttrv_edge.demo import BENCH_EPOCHS, BENCH_LR

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tiny model on a shared CPU: see ttrv_edge/cli.py

RESULTS = Path(__file__).parent / "results"
TUNING_CORRUPTIONS = ("gaussian_noise", "contrast")  # the hyperparameters were chosen on these two (README)
TABLE_METHODS = ("base", "ttrl", "ttrv", "ttrv-episodic", "tent")
COLUMNS = (
    ("base greedy", "base", "before", "greedy"),
    ("self-consistency", "base", "before", "majority"),
    ("TTRL", "ttrl", "after", "greedy"),
    ("TTRV transductive", "ttrv", "after", "greedy"),
    ("TTRV episodic", "ttrv-episodic", "after", "greedy"),
    ("TENT (entropy min.)", "tent", "after", "greedy"),
    ("base sampled", "base", "before", "sampled"),
    ("TTRV trans. sampled", "ttrv", "after", "sampled"),
    ("entropy before", "base", "before", "entropy"),
    ("entropy after (TTRV trans.)", "ttrv", "after", "entropy"),
)


def _config(args, **overrides):
    from ttrv_edge.config import TTRVConfig

    base = TTRVConfig(
        rollouts=args.rollouts,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lora_rank=args.lora_rank,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        alpha=args.alpha,
        baseline=args.baseline,
        entropy_signal=args.entropy_signal,
        seed=args.seed,
        views=1,  # the table's methods are the paper's single-image ones (views: bench_shift_paired.py)
    )
    return dataclasses.replace(base, **overrides)


def _loop(args, config):
    from ttrv_edge.api import TTRVModel

    return TTRVModel.from_pretrained(args.model, config).loop


def _corruptions(value: str) -> list[str]:
    from ttrv_edge.demo.shift import CORRUPTIONS

    names = list(CORRUPTIONS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name != "clean" and name not in CORRUPTIONS:
            raise SystemExit(f"error: --corruptions: unknown corruption {name!r}")
    return names


def _append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def cmd_run(args) -> None:
    from ttrv_edge.demo.eval import evaluate, prepare_items

    config = _config(args)
    loop = _loop(args, config)
    methods = TABLE_METHODS if args.methods == "all" else args.methods.split(",")
    for corruption in _corruptions(args.corruptions):
        severity = 0 if corruption == "clean" else args.severity
        items = prepare_items(loop, corruption, severity, args.n, args.start)
        for method in methods:
            started = time.perf_counter()
            record = evaluate(loop, corruption, severity, method, items=items)
            record["tag"] = args.tag
            _append(RESULTS / "shift_runs.jsonl", record)
            after = record["after"]
            print(
                f"{corruption:15s} s{severity} {method:14s} greedy {record['before']['greedy']:.3f} -> "
                f"{after['greedy']:.3f}  maj {after['majority']:.3f}  H {after['entropy']:.3f}  "
                f"{time.perf_counter() - started:.0f}s",
                flush=True,
            )


ABLATIONS = (
    ("alpha=0 (batch baseline)", dict(alpha=0.0, baseline="batch")),
    ("alpha=0.75 (batch baseline)", dict(alpha=0.75, baseline="batch")),
    ("alpha=0.75, self-certainty", dict(alpha=0.75, entropy_signal="self-certainty")),
    ("N=8", dict(rollouts=8)),
    ("N=16", dict(rollouts=16)),
    ("N=32", dict(rollouts=32)),
    ("rank=4", dict(lora_rank=4)),
    ("rank=16", dict(lora_rank=16)),
)


def cmd_ablation(args) -> None:
    from ttrv_edge.demo.eval import evaluate, prepare_items

    chosen = ABLATIONS if args.variants == "all" else [a for a in ABLATIONS if a[0] in args.variants.split(";")]
    for corruption in _corruptions(args.corruptions):
        loop, loop_rank, items = None, None, None
        for name, overrides in chosen:
            config = _config(args, **overrides)
            if loop is None or loop_rank != config.lora_rank:
                loop, loop_rank = _loop(args, config), config.lora_rank
                items = prepare_items(loop, corruption, args.severity, args.n, args.start)
            loop.config = config
            record = evaluate(loop, corruption, args.severity, "ttrv", items=items)
            record.update(variant=name, tag=args.tag)
            _append(RESULTS / "shift_ablation.jsonl", record)
            print(
                f"{corruption:15s} {name:30s} greedy {record['before']['greedy']:.3f} -> "
                f"{record['after']['greedy']:.3f} sampled {record['before']['sampled']:.3f} -> "
                f"{record['after']['sampled']:.3f}  {record['seconds']:.0f}s",
                flush=True,
            )


def _latest(path: Path, key) -> dict:
    """The newest record of each key among those with the most scenes: a smaller run never replaces a larger one."""
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                kept = rows.get(key(record))
                if kept is None or record.get("n", 0) >= kept.get("n", 0):
                    rows[key(record)] = record
    return rows


def cmd_report(args) -> None:
    try:  # checked before anything is written: a missing plotting library must not leave half-written tables
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("error: report needs matplotlib (pip install 'ttrv-edge[bench]'); nothing written") from None
    every = _latest(RESULTS / "shift_runs.jsonl", lambda r: (r["corruption"], r["severity"], r["method"], r["tag"]))
    tuning = [
        [
            c,
            s,
            m,
            t,
            r["n"],
            f"{r['config']['lr']:g}",
            r["config"]["epochs"],
            r["config"]["temperature"],
            r["config"]["rollouts"],
            r["before"]["greedy"],
            r["after"]["greedy"],
            r["after"]["sampled"],
            r["after"]["entropy"],
        ]
        for (c, s, m, t), r in sorted(every.items())
        if t.startswith("tune") and m != "base"
    ]
    head = ["corruption", "severity", "method", "tag", "n", "lr", "epochs", "T", "N"]
    head += ["greedy before", "greedy after", "sampled after", "entropy after"]
    _write_markdown(RESULTS / "shift_tuning.md", head, tuning)
    base = {k[:3]: r for k, r in every.items() if k[2] == "base" and k[3] == ""}  # independent of the settings
    for tag in sorted({k[3] for k in every if not k[3].startswith("tune")}):
        runs = {k[:3]: r for k, r in every.items() if k[3] == tag}
        conditions = {k[:2] for k in runs}
        runs = {**{k: r for k, r in base.items() if k[:2] in conditions}, **runs}
        _write_table(runs, f"shift_table_{tag}" if tag else "shift_table")
    ablation = _latest(RESULTS / "shift_ablation.jsonl", lambda r: (r["corruption"], r["severity"], r["variant"]))
    head = [
        "corruption",
        "severity",
        "variant",
        "n",
        "greedy before",
        "greedy after",
        "sampled before",
        "sampled after",
        "entropy before",
        "entropy after",
        "updates",
        "s/item",
    ]
    rows = [
        [
            c,
            s,
            v,
            r["n"],
            r["before"]["greedy"],
            r["after"]["greedy"],
            r["before"]["sampled"],
            r["after"]["sampled"],
            r["before"]["entropy"],
            r["after"]["entropy"],
            r["updates"],
            r["seconds_per_item"],
        ]
        for (c, s, v), r in sorted(ablation.items())
    ]
    _write_csv(RESULTS / "shift_ablation.csv", head, rows)
    _write_markdown(RESULTS / "shift_ablation.md", head, rows)
    print((RESULTS / "shift_table.md").read_text())
    print((RESULTS / "shift_ablation.md").read_text())


def _write_table(runs: dict, stem: str) -> None:
    """One table (rows = conditions, columns = COLUMNS) with means over all shifts and over the held-out ones."""
    conditions = sorted({(c, s) for c, s, _ in runs}, key=lambda cs: (cs[0] != "clean", cs[0], cs[1]))
    header = ["corruption", "severity", "n"] + [c[0] for c in COLUMNS]
    table = []
    for corruption, severity in conditions:
        row = [corruption, severity, runs.get((corruption, severity, "base"), {}).get("n", "")]
        for _, method, when, metric in COLUMNS:
            record = runs.get((corruption, severity, method))
            row.append(None if record is None else record[when][metric])
        table.append(row)
    means = []
    for severity in sorted({r[1] for r in table if r[0] != "clean"}):
        shifted = [r for r in table if r[0] != "clean" and r[1] == severity]
        held_out = [r for r in shifted if r[0] not in TUNING_CORRUPTIONS]
        groups = [(f"mean of {len(shifted)} shifts", shifted)]
        if 0 < len(held_out) < len(shifted):
            groups.append((f"mean of {len(held_out)} held out", held_out))
        for label, rows in groups:
            mean = [label, severity, ""]
            for j in range(3, len(header)):
                values = [r[j] for r in rows if r[j] is not None]
                mean.append(sum(values) / len(values) if values else None)
            means.append(mean)
    _write_csv(RESULTS / f"{stem}.csv", header, table + means)
    _write_markdown(RESULTS / f"{stem}.md", header, table + means)
    _plot(RESULTS / f"{stem}.png", header, table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _write_csv(path: Path, header, rows) -> None:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([[_fmt(v) for v in row] for row in rows])


def _write_markdown(path: Path, header, rows) -> None:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _plot(path: Path, header, rows) -> None:
    """Grouped bars of the six greedy/majority accuracy columns per condition (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = header[3:9]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows)), 4.5))
    for k, name in enumerate(series):
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(rows))]
        bars = [(x, row[3 + k]) for x, row in zip(xs, rows) if row[3 + k] is not None]
        ax.bar([x for x, _ in bars], [v for _, v in bars], width, label=name)
    ax.set_xticks(range(len(rows)), [f"{row[0]}\ns{row[1]}" for row in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Demo model under shift: greedy accuracy (self-consistency = majority of N samples)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "ablation", "report"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--corruptions", default="all", help="comma-separated, 'all', or 'clean'")
    parser.add_argument("--methods", default="all", help=f"comma-separated from {', '.join(TABLE_METHODS)}")
    parser.add_argument("--variants", default="all", help="ablation variants, ';'-separated names, or 'all'")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="scenes per condition")
    parser.add_argument("--start", type=int, default=0, help="first scene seed")
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=BENCH_EPOCHS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=BENCH_LR)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.75)
    parser.add_argument("--baseline", default="group")
    parser.add_argument("--entropy-signal", default="answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    {"run": cmd_run, "ablation": cmd_ablation, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
