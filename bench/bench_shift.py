"""The shift benchmark: base vs self-consistency vs TTRL vs TTRV (transductive, episodic) vs TENT per corruption.

    python bench/bench_shift.py run --corruptions all --severity 3 --n 64          # the main table
    python bench/bench_shift.py ablation --corruptions blur,contrast --n 48        # alpha, signal, N, rank
    python bench/bench_shift.py report                                             # CSV + markdown + PNG

``run`` and ``ablation`` append one JSON line per (condition, method/variant) to bench/results/shift_runs.jsonl and
shift_ablation.jsonl (so several processes can share the work and a crash loses one line, not the table); ``report``
renders the newest line of each condition into shift_table.csv / .md / .png and shift_ablation.csv / .md. Each
condition's scenes are encoded once and every method sees exactly the same inputs and seeds.

Everything goes through the public engine (``ttrv_edge.api.TTRVAdapter`` and its ``Adapter``); the per-method code
is in ``ttrv_edge.demo.eval``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from ttrv_edge.demo import BENCH_EPOCHS, BENCH_LR

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tiny model on a shared CPU: see DESIGN section 4

RESULTS = Path(__file__).parent / "results"
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
    )
    return dataclasses.replace(base, **overrides)


def _engine(args, config):
    from ttrv_edge.api import TTRVAdapter

    return TTRVAdapter.from_pretrained(args.model, config)._engine


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
    engine = _engine(args, config)
    methods = TABLE_METHODS if args.methods == "all" else args.methods.split(",")
    for corruption in _corruptions(args.corruptions):
        severity = 0 if corruption == "clean" else args.severity
        items = prepare_items(engine, corruption, severity, args.n, args.start)
        for method in methods:
            started = time.perf_counter()
            record = evaluate(engine, corruption, severity, method, items=items)
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
        engine, engine_rank, items = None, None, None
        for name, overrides in chosen:
            config = _config(args, **overrides)
            if engine is None or engine_rank != config.lora_rank:
                engine, engine_rank = _engine(args, config), config.lora_rank
                items = prepare_items(engine, corruption, args.severity, args.n, args.start)
            engine.config = config
            record = evaluate(engine, corruption, args.severity, "ttrv", items=items)
            record.update(variant=name, tag=args.tag)
            _append(RESULTS / "shift_ablation.jsonl", record)
            print(
                f"{corruption:15s} {name:30s} greedy {record['before']['greedy']:.3f} -> "
                f"{record['after']['greedy']:.3f} sampled {record['before']['sampled']:.3f} -> "
                f"{record['after']['sampled']:.3f}  {record['seconds']:.0f}s",
                flush=True,
            )


def _latest(path: Path, key) -> dict:
    rows = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                rows[key(record)] = record
    return rows


def cmd_report(args) -> None:
    every = _latest(RESULTS / "shift_runs.jsonl", lambda r: (r["corruption"], r["severity"], r["method"], r["tag"]))
    runs = {k[:3]: r for k, r in every.items() if not k[3].startswith("tune")}
    tuning = [
        [
            c,
            s,
            m,
            t,
            r["n"],
            f"{r['config']['lr']:g}",
            r["before"]["greedy"],
            r["after"]["greedy"],
            r["after"]["sampled"],
        ]
        for (c, s, m, t), r in sorted(every.items())
        if t.startswith("tune") and m != "base"
    ]
    head = ["corruption", "severity", "method", "tag", "n", "lr", "greedy before", "greedy after", "sampled after"]
    _write_markdown(RESULTS / "shift_tuning.md", head, tuning)
    conditions = sorted({(c, s) for c, s, _ in runs}, key=lambda cs: (cs[0] != "clean", cs[0], cs[1]))
    header = ["corruption", "severity", "n"] + [c[0] for c in COLUMNS]
    table = []
    for corruption, severity in conditions:
        row = [corruption, severity, runs.get((corruption, severity, "base"), {}).get("n", "")]
        for _, method, when, metric in COLUMNS:
            record = runs.get((corruption, severity, method))
            row.append(None if record is None else record[when][metric])
        table.append(row)
    for severity in sorted({r[1] for r in table if r[0] != "clean"}):
        shifted = [r for r in table if r[0] != "clean" and r[1] == severity]
        mean = [f"mean of {len(shifted)} shifts", severity, ""]
        for j in range(3, len(header)):
            values = [r[j] for r in shifted if r[j] is not None]
            mean.append(sum(values) / len(values) if values else None)
        table.append(mean)
    _write_csv(RESULTS / "shift_table.csv", header, table)
    _write_markdown(RESULTS / "shift_table.md", header, table)
    _plot(RESULTS / "shift_table.png", header, [r for r in table if not r[0].startswith("mean")])
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
    """Grouped bars of the six accuracy columns per condition, drawn with PIL (no plotting dependency)."""
    from PIL import Image, ImageDraw

    series = header[3:9]
    colours = [(120, 120, 120), (180, 180, 60), (70, 130, 200), (220, 80, 60), (240, 150, 50), (90, 170, 90)]
    group_w, bar_w, height, top, left = 12 + 10 * len(series), 10, 260, 40, 40
    width = left + group_w * max(len(rows), 1) + 20
    image = Image.new("RGB", (width, height + 110), "white")
    draw = ImageDraw.Draw(image)
    for k in range(0, 11, 2):
        y = top + height - k / 10 * height
        draw.line((left - 4, y, width - 10, y), fill=(225, 225, 225))
        draw.text((4, y - 6), f"{k / 10:.1f}", fill="black")
    for g, row in enumerate(rows):
        x0 = left + g * group_w + 6
        for s, value in enumerate(row[3:9]):
            if value is None:
                continue
            x = x0 + s * bar_w
            draw.rectangle((x, top + height - value * height, x + bar_w - 2, top + height), fill=colours[s])
        draw.text((x0, top + height + 4), f"{row[0][:9]}", fill="black")
        draw.text((x0, top + height + 16), f"s{row[1]}", fill="black")
    for s, name in enumerate(series):
        x = left + (s % 3) * 170
        y = top + height + 40 + (s // 3) * 16
        draw.rectangle((x, y, x + 10, y + 10), fill=colours[s])
        draw.text((x + 14, y - 1), name, fill="black")
    draw.text(
        (left, 10), "Greedy accuracy under shift (demo model); self-consistency = majority of N samples", fill="black"
    )
    image.save(path)


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
