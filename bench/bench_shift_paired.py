"""Paired shift benchmark: every method against base greedy on the same scenes, with intervals and flip counts.

    python bench/bench_shift_paired.py run --methods base,view-vote --n 128            # per-scene records
    python bench/bench_shift_paired.py report                                           # tables + plot

``run`` appends one JSON line per (method, condition, scene) to ``--records`` (default
bench/results/shift_paired_runs.jsonl): the correct answer, the base model's greedy answer and the method's
answer, so that ``report`` computes, for each method and condition, the accuracy, the paired difference to base
greedy with a 95% bootstrap interval over scenes, and the flips (right->wrong, wrong->right), for the three
question kinds separately and together. Scenes are ``make_scene(seed)`` for seeds start..start+n-1 (kinds mixed),
corrupted at ``--severity``; every method sees the same images and seeds. The hyperparameters were tuned only on
the TUNING conditions (gaussian noise and contrast): the report marks their rows and keeps them out of the headline
mean over the six held-out shifts, which is given with and without the hue-on-colour cell (a rotated hue changes the
colour name itself: no label-free method can recover it).

Methods (``METHODS``): each is a demo-eval method (``ttrv_edge.demo.eval``) with config overrides; one factor varies
at a time around the episodic recipe. Everything runs through ``TTRVModel.loop``, the public loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # tiny model on a shared CPU: see ttrv_edge/cli.py

RESULTS = Path(__file__).parent / "results"
DEFAULT_RECORDS = str(RESULTS / "shift_paired_runs.jsonl")
FULL_SIZE = 128  # scenes per condition of the committed results: a smaller run must not mix into them
TUNING = ("gaussian_noise", "contrast")
HELD_OUT = ("blur", "hue", "jpeg", "pixelate", "sketch", "invert")
CONDITIONS = ("clean", *TUNING, *HELD_OUT)
CHANCE = 0.25  # four options per question
VIEWS = {"views": 8}
ONE = {"views": 1}  # the image only (the paper's setting), pinned: the package default votes across views
# name -> (demo-eval method, config overrides, which prediction is the method's answer)
METHODS = {
    "base": ("base", ONE, "answer"),  # "answer": greedy; "majority": the vote of the N samples
    "self-consistency": ("base", ONE, "majority"),
    "view-vote": ("base", VIEWS, "majority"),
    "ttrv-episodic": ("ttrv-episodic", ONE, "answer"),
    "ttrv-episodic+views": ("ttrv-episodic", VIEWS, "answer"),
    "ttrv-episodic+views (vote)": ("ttrv-episodic", VIEWS, "majority"),
    "ttrv-episodic+views+gated": ("ttrv-episodic", {**VIEWS, "reward": "gated"}, "answer"),
    "ttrv-episodic+gated": ("ttrv-episodic", {**ONE, "reward": "gated"}, "answer"),
    "ttrv-transductive": ("ttrv", ONE, "answer"),
    "ttrv-transductive+views": ("ttrv", VIEWS, "answer"),
    "ttrl": ("ttrl", ONE, "answer"),
    "tent": ("tent", ONE, "answer"),
}
# methods that share one run (same method and overrides): the run is done once, both answers are recorded
SHARED = {"self-consistency": "base", "ttrv-episodic+views (vote)": "ttrv-episodic+views"}


def _config(args, overrides: dict):
    from ttrv_edge.config import TTRVConfig

    base = TTRVConfig(
        rollouts=args.rollouts,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        lora_targets=args.lora_targets,
    )
    return dataclasses.replace(base, **overrides)


def cmd_run(args) -> None:
    from ttrv_edge.api import TTRVModel
    from ttrv_edge.demo.eval import method_config, prepare_items, run_method

    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    conditions = CONDITIONS if args.conditions == "all" else args.conditions.split(",")
    runs = sorted({SHARED.get(m, m) for m in names}, key=list(METHODS).index)
    model = TTRVModel.from_pretrained(args.model, _config(args, {}))
    loop = model.loop
    records = Path(args.records)
    if args.records == DEFAULT_RECORDS and args.n < FULL_SIZE:
        raise SystemExit(
            f"error: --n {args.n}: a run smaller than {FULL_SIZE} scenes writes elsewhere (--records PATH)"
        )
    records.parent.mkdir(parents=True, exist_ok=True)
    for condition in conditions:
        base_config = loop.config
        items, answers = prepare_items(loop, condition, args.severity, args.n, args.start)
        for run in runs:
            method, overrides, _ = METHODS[run]
            loop.config = method_config(_config(args, overrides), method)
            started = time.perf_counter()
            try:
                results = run_method(loop, method, items)
            finally:
                loop.config = base_config
            seconds = (time.perf_counter() - started) / len(items)
            _save_config(records, run, method_config(_config(args, overrides), method))
            with records.open("a") as out:
                for name in [run] + [m for m, r in SHARED.items() if r == run and m in names]:
                    field = METHODS[name][2]
                    for item, result, answer in zip(items, results, answers):
                        after = result.after or result.before
                        record = {
                            "method": name if args.lora_targets == "language" else f"{name} [{args.lora_targets}]",
                            "condition": condition,
                            "severity": args.severity,
                            "scene": item.label,
                            "kind": _kind(item.label),
                            "answer": answer,
                            "base": result.before.answer,
                            "pred": getattr(after if method != "base" else result.before, field),
                            "updates": sum(s.updated for s in result.steps),
                            "seconds_per_item": round(seconds, 3),
                        }
                        out.write(json.dumps(record) + "\n")
            print(f"{condition:>15} {run:<28} {seconds:6.2f} s/scene", flush=True)


def _save_config(records: Path, run: str, config) -> None:
    """The config each method ran with, beside the records (``<records>.configs.json``)."""
    path = records.with_suffix(".configs.json")
    configs = json.loads(path.read_text()) if path.is_file() else {}
    configs[run] = config.to_dict()
    path.write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")


def _kind(label: str) -> str:
    from ttrv_edge.demo.scenes import make_scene

    return make_scene(int(label.split("-")[-1])).kind


# ------------------------------------------------------------------------------------------------ report


def paired(rows: list[dict], rng: random.Random, resamples: int = 2000) -> dict:
    """Accuracy, paired difference to base greedy with a 95% bootstrap interval over scenes, and flips."""
    right = [r["pred"] == r["answer"] for r in rows]
    base = [r["base"] == r["answer"] for r in rows]
    diffs = [int(a) - int(b) for a, b in zip(right, base)]
    n = len(rows)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {
        "n": n,
        "acc": sum(right) / n,
        "base": sum(base) / n,
        "diff": sum(diffs) / n,
        "lo": means[int(0.025 * resamples)],
        "hi": means[int(0.975 * resamples) - 1],
        "wrong_to_right": diffs.count(1),
        "right_to_wrong": diffs.count(-1),
    }


def pooled_mean(by_condition: dict[str, list[dict]], conditions, rng, drop=None, resamples: int = 2000) -> dict:
    """Mean over conditions of the paired difference, with a bootstrap that resamples scenes in every condition."""
    groups = []
    for c in conditions:
        rows = [r for r in by_condition.get(c, []) if drop is None or not drop(r)]
        if rows:
            groups.append([int(r["pred"] == r["answer"]) - int(r["base"] == r["answer"]) for r in rows])
    if not groups:
        return {}
    mean = sum(sum(g) / len(g) for g in groups) / len(groups)
    boots = sorted(
        sum(sum(g[rng.randrange(len(g))] for _ in g) / len(g) for g in groups) / len(groups) for _ in range(resamples)
    )
    return {"diff": mean, "lo": boots[int(0.025 * resamples)], "hi": boots[int(0.975 * resamples) - 1]}


def cmd_report(args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "error: report needs matplotlib (pip install 'ttrv-edge[bench]'); nothing was written"
        ) from None
    records = [
        json.loads(line)
        for path in args.records.split(",")
        for line in Path(path).read_text().splitlines()
        if line.strip()
    ]
    latest: dict = {}
    for r in records:  # the newest record of each (method, condition, scene) wins
        latest[(r["method"], r["condition"], r["scene"])] = r
    by = defaultdict(lambda: defaultdict(list))
    for (method, condition, _), r in latest.items():
        by[method][condition].append(r)
    rng = random.Random(0)
    out = Path(args.out)
    lines = ["# Paired shift benchmark (severity 3): method minus base greedy, same scenes", ""]
    lines += [f"Tuning conditions (marked *): {', '.join(TUNING)}. Held-out: {', '.join(HELD_OUT)}.", ""]
    header = "| method | condition | kind | n | acc | base | diff [95% CI] | wrong->right | right->wrong | s/scene |"
    csv = ["method,condition,kind,n,acc,base,diff,lo,hi,wrong_to_right,right_to_wrong,seconds_per_scene"]
    summary = ["", "## Means over the six held-out shifts (paired difference to base greedy, 95% bootstrap CI)", ""]
    summary += ["| method | all held-out | without hue-on-colour | tuning (*) | clean | worst condition |"]
    summary += ["|---|---|---|---|---|---|"]
    lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
    plot_rows = []
    for method in [m for m in METHODS if m in by] + sorted(m for m in by if m not in METHODS):  # + [targets]
        conds = [c for c in CONDITIONS if c in by[method]]
        worst = None
        for condition in conds:
            rows = by[method][condition]
            seconds = sum(r["seconds_per_item"] for r in rows) / len(rows)
            for kind in ("all", "shape", "colour", "count"):
                subset = rows if kind == "all" else [r for r in rows if r["kind"] == kind]
                if not subset:
                    continue
                s = paired(subset, rng)
                mark = "*" if condition in TUNING else ""
                lines.append(
                    f"| {method} | {condition}{mark} | {kind} | {s['n']} | {s['acc']:.3f} | {s['base']:.3f} | "
                    f"{s['diff']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}] | {s['wrong_to_right']} | "
                    f"{s['right_to_wrong']} | {seconds:.2f} |"
                )
                csv.append(
                    f"{method},{condition},{kind},{s['n']},{s['acc']:.4f},{s['base']:.4f},{s['diff']:.4f},"
                    f"{s['lo']:.4f},{s['hi']:.4f},{s['wrong_to_right']},{s['right_to_wrong']},{seconds:.3f}"
                )
                if kind == "all":
                    plot_rows.append((method, condition, s))
                    if worst is None or s["diff"] < worst[1]:
                        worst = (condition, s["diff"])
        held = pooled_mean(by[method], HELD_OUT, rng)
        no_hue = pooled_mean(
            by[method], HELD_OUT, rng, drop=lambda r: r["condition"] == "hue" and r["kind"] == "colour"
        )
        tuning = pooled_mean(by[method], TUNING, rng)
        clean = pooled_mean(by[method], ("clean",), rng)

        def fmt(x):
            return f"{x['diff']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}]" if x else "-"

        worst_text = f"{worst[0]} {worst[1]:+.3f}" if worst else "-"
        summary.append(f"| {method} | {fmt(held)} | {fmt(no_hue)} | {fmt(tuning)} | {fmt(clean)} | {worst_text} |")
    out.with_suffix(".md").write_text("\n".join(lines + summary) + "\n")
    out.with_suffix(".csv").write_text("\n".join(csv) + "\n")
    _plot(plt, plot_rows, out.with_suffix(".png"))
    print("\n".join(summary))


def _plot(plt, rows, path: Path) -> None:
    methods = list(dict.fromkeys(m for m, _, _ in rows))
    conditions = [c for c in CONDITIONS if any(c == cc for _, cc, _ in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(conditions)), 5.5))
    width = 0.8 / max(len(methods), 1)
    for k, method in enumerate(methods):
        xs, ys, errs = [], [], [[], []]
        for i, c in enumerate(conditions):
            s = next((s for m, cc, s in rows if m == method and cc == c), None)
            if s is None:
                continue
            xs.append(i + (k - (len(methods) - 1) / 2) * width)
            ys.append(s["acc"])
            errs[0].append(max(0.0, s["diff"] - s["lo"]))
            errs[1].append(max(0.0, s["hi"] - s["diff"]))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=method)
    ax.axhline(CHANCE, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(range(len(conditions)))
    ax.set_xticklabels([c + ("*" if c in TUNING else "") for c in conditions], rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    ax.set_title("Demo model under shift, severity 3 (* = tuning condition; bars: 95% CI of the paired difference)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from ttrv_edge.demo import BENCH_LR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--methods", default="all", help=f"comma-separated from: {', '.join(METHODS)}")
    parser.add_argument("--conditions", default="all", help=f"comma-separated from: {', '.join(CONDITIONS)}")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--n", type=int, default=128, help="scenes per condition")
    parser.add_argument("--start", type=int, default=0, help="first scene seed")
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=BENCH_LR)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lora-targets", default="language", help="LoRA targets of the loaded model; the method names get a suffix"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--records",
        default=DEFAULT_RECORDS,
        help="run: the JSONL to append to; report: one or more, comma-separated",
    )
    parser.add_argument("--out", default=str(RESULTS / "shift_paired"), help="report: path stem of .md/.csv/.png")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
