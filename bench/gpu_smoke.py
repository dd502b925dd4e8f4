"""GPU smoke test: every op with both backends, and one episodic and one transductive adaptation per backend.

    python bench/gpu_smoke.py                                  # CUDA: tiny + smolvlm-256m in bf16
    python bench/gpu_smoke.py --device cpu --models tiny       # the CPU path, fp32 (Triton interpreter)

Run it first on a GPU machine: it fails (exit 1) on the first disagreement, before any benchmark is worth taking.
1. Ops: ``logprob_entropy``, ``linear_logprob_entropy`` (with a -inf suppression bias), ``linear_grpo_loss``
   (the same bias, masked -inf targets), ``grpo_loss`` and ``group_rewards`` on the device, Triton against torch
   on the same inputs: outputs and input gradients within a tolerance per dtype.
2. Adaptation: for each model (``tiny`` and random-weight real architectures from bench/configs), one episodic step
   and one transductive step (2 inputs, one update) with ``--backend torch`` and ``--backend triton``. The two
   backends must compute the same LoRA gradients for the update (relative error below the dtype's tolerance,
   captured just before AdamW's step), move the LoRA weights the same way (the fraction of changed weights moved in
   opposite directions below ``FLIP_LIMIT``) and keep a ``logprob_gap`` below the dtype's tolerance. The weights
   themselves are not compared element by element: AdamW's first step moves every weight by about +-lr whatever the
   size of its gradient, so a near-zero gradient component that bf16 rounds to the other sign moves the other way
   (seen on an H200: gradients within 0.8%, a handful of 3,072 tiny-model weights moved in opposite directions).
   A last check says whether the two backends sampled the same first rollouts: if not, different gradients come
   from different rollouts, not from the kernels (on an H200 one mode's gradients disagreed completely, 51% of the
   weights moved oppositely, while every op agreed to 1e-6).
Writes one CSV row per check (device name and library versions in every row) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = {"fp32": 2e-4, "bf16": 3e-2}  # relative, on op outputs/gradients and on the LoRA gradients
GAP_LIMIT = {"fp32": 1e-3, "bf16": 0.15}  # bf16 sampling and training forwards round differently
FLIP_LIMIT = {"fp32": 1e-3, "bf16": 1e-2}  # fraction of LoRA weights the two backends' updates move oppositely


def _rel(a, b) -> float:
    scale = max(float(b.abs().max()), 1e-12)
    return float((a.float() - b.float()).abs().max()) / scale


def check_ops(device: str, dtype_name: str) -> list[dict]:
    import torch

    from ttrv_edge import kernels

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, h, v = 64, 32, 1000
    rows = []

    def both(name, make_inputs, run, grad_of):
        results = {}
        drawn = make_inputs()  # once: both backends must see the same inputs
        for backend in ("torch", "triton"):
            inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in drawn)
            outputs = run(backend, *inputs)
            loss = sum(o.float().sum() for o in outputs if o.requires_grad)
            grads = [] if not torch.is_tensor(loss) else torch.autograd.grad(loss, [inputs[i] for i in grad_of])
            results[backend] = ([o.detach() for o in outputs], [g.detach() for g in grads])
        errors = [_rel(a, b) for a, b in zip(results["triton"][0], results["torch"][0])]
        errors += [_rel(a, b) for a, b in zip(results["triton"][1], results["torch"][1])]
        rows.append({"check": f"op {name}", "value": max(errors), "limit": TOLERANCE[dtype_name]})

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()

    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    bias = torch.zeros(v, device=device, dtype=dtype)
    bias[[1, 7, 99]] = float("-inf")
    targets[targets == 7] = 8
    both(
        "logprob_entropy",
        lambda: (leaf(n, v, scale=3.0),),
        lambda b, x: kernels.logprob_entropy(x, targets, 0.8, backend=b),
        (0,),
    )
    weight = (torch.randn(v, h, generator=gen) * 0.1).to(device, dtype)
    both(
        "linear_logprob_entropy",
        lambda: (leaf(n, h),),
        lambda b, x: kernels.linear_logprob_entropy(x, weight, targets, bias, 1.3, backend=b),
        (0,),
    )
    with torch.no_grad():  # per-token GRPO inputs around the current log-probs (clipping active for some)
        logp, _ = kernels.linear_logprob_entropy(leaf(n, h), weight, targets, bias, 1.3, backend="torch")
    token_old = logp + 0.3 * torch.randn(n, generator=gen).to(device)
    token_adv = torch.randn(n, generator=gen).to(device)
    token_mask = (torch.rand(n, generator=gen) > 0.2).float().to(device)
    token_mask[targets == 8] = 0.0
    targets_with_suppressed = torch.where(targets == 8, 7, targets)  # -inf target logits, masked out
    both(
        "linear_grpo_loss",
        lambda: (leaf(n, h),),
        lambda b, x: kernels.linear_grpo_loss(
            x, weight, targets_with_suppressed, token_old, token_adv, token_mask, ref_logp=token_old - 0.1,
            bias=bias, temperature=1.3, beta=0.1, entropy_coef=0.01, backend=b,
        )[:1],
        (0,),
    )  # fmt: skip
    mask = (torch.rand(8, 16, generator=gen) > 0.2).float().to(device)
    old = (-torch.rand(8, 16, generator=gen)).to(device)
    adv = torch.randn(8, generator=gen).to(device)
    both(
        "grpo_loss",
        lambda: (((-torch.rand(8, 16, generator=gen)).to(device)).requires_grad_(),),
        lambda b, x: (kernels.grpo_loss(x, old, adv, mask, ref_logp=old, beta=0.1, backend=b)[0],),
        (0,),
    )
    ids = torch.randint(-1, 3, (16, 8), generator=gen).to(device)
    both("group_rewards", lambda: (), lambda b: kernels.group_rewards(ids, 0.75, backend=b), ())
    return rows


def _word_bucket_question():
    from dataclasses import dataclass

    from ttrv_edge.io.answers import Question

    @dataclass(frozen=True)
    class WordBucket(Question):
        """The answer is one of three buckets of the first word: random-weight models give varied words, and 8
        rollouts in 3 buckets always share some, so every group has a signal."""

        def extract(self, text: str) -> str | None:
            return str(sum(map(ord, text.split()[0])) % 3) if text.split() else None

    return WordBucket


def check_adaptation(model_dir: str, label: str, device: str, dtype_name: str) -> list[dict]:

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from ttrv_edge.api import TTRVModel
    from ttrv_edge.demo.scenes import make_scene

    question = _word_bucket_question()("Describe the image.")
    scenes = [make_scene(seed) for seed in range(2)]
    rows, deltas, grads, first_rollouts = [], {}, {}, {}
    for backend in ("torch", "triton"):
        for mode in ("episodic", "transductive"):
            options = dict(backend=backend, rollouts=8, views=1, steps=1, epochs=1, batch_size=2, max_new_tokens=8)
            options["lr"] = 1e-2
            options["collapse_guard"] = False  # a random model's outputs are degenerate: no roll-back to compare
            model = TTRVModel.from_pretrained(model_dir, device=device, keep=True, **options)  # bf16 on CUDA
            trained = {n: p for n, p in model.vlm.model.named_parameters() if p.requires_grad}
            start = {n: p.detach().float().clone() for n, p in trained.items()}
            captured = {}

            def first_step_grads(optimizer, args, kwargs, trained=trained, captured=captured):
                if not captured:
                    captured.update(
                        {n: p.grad.detach().float().clone() for n, p in trained.items() if p.grad is not None}
                    )

            sampled = []  # the first step's rollout token ids: the same for both backends unless sampling diverged
            real_sample = model.loop.sample

            def sample(item, seed, real_sample=real_sample, sampled=sampled):
                rollouts, answers = real_sample(item, seed)
                if not sampled:
                    groups = rollouts if isinstance(rollouts, list) else [rollouts]
                    sampled.append([group.completion_ids.cpu() for group in groups])
                return rollouts, answers

            model.loop.sample = sample
            hook = register_optimizer_step_pre_hook(first_step_grads)
            started = time.perf_counter()
            try:
                items = [model.loop.prepare(f"scene-{k}", s.image(), question) for k, s in enumerate(scenes)]
                if mode == "episodic":
                    results = [model.loop.adapt_episode(items[0])]
                else:
                    results = model.loop.adapt_transductive(items)
            finally:
                hook.remove()
            seconds = time.perf_counter() - started
            gaps = [s.logprob_gap for r in results for s in r.steps if s.logprob_gap is not None]
            rows.append(
                {
                    "check": f"{label} {mode} {backend} logprob_gap",
                    "value": max(gaps, default=0.0),
                    "limit": GAP_LIMIT[dtype_name],
                    "seconds": round(seconds, 2),
                }  # fmt: skip
            )
            deltas[backend, mode] = {n: p.detach().float() - start[n] for n, p in trained.items()}
            first_rollouts[backend, mode] = sampled[0] if sampled else []
            grads[backend, mode] = captured
    for mode in ("episodic", "transductive"):
        ours, theirs = first_rollouts["triton", mode], first_rollouts["torch", mode]
        same = len(ours) == len(theirs)
        same = same and all(a.shape == b.shape and bool((a == b).all()) for a, b in zip(ours, theirs))
        rows.append({"check": f"{label} {mode} first rollouts differ (triton vs torch)", "value": float(not same),
                     "limit": 0.0})  # fmt: skip
        reference, fused = grads["torch", mode], grads["triton", mode]
        error = max((_rel(fused[n], reference[n]) for n in reference), default=float("inf"))  # inf: no update
        rows.append(
            {"check": f"{label} {mode} LoRA grads triton vs torch", "value": error, "limit": TOLERANCE[dtype_name]}
        )
        moved = [(deltas["triton", mode][n], d) for n, d in deltas["torch", mode].items()]
        changed = sum(int((d != 0).sum()) for _, d in moved)
        opposite = sum(int((a * d < 0).sum()) for a, d in moved)
        rows.append(
            {
                "check": f"{label} {mode} LoRA update: fraction moved oppositely",
                "value": opposite / changed if changed else float("inf"),
                "limit": FLIP_LIMIT[dtype_name],
            }  # fmt: skip
        )
    return rows


def _model_dirs(names: list[str], work: Path, dtype_name: str) -> list[tuple[str, str]]:
    import torch

    sys.path.insert(0, str(HERE))
    from real_size import build_model_dir, load_spec

    dirs = []
    for name in names:
        if name == "tiny":
            dirs.append(("tiny", "tiny"))
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            dirs.append((name, str(build_model_dir(load_spec(name), work / name, dtype=dtype))))
    return dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--models", default="tiny,smolvlm-256m", help="'tiny' and/or bench/configs names")
    parser.add_argument("--out", default=None, help="CSV path (default bench/results/gpu_smoke_<device>.csv)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (use --device cpu for the interpreter path)", file=sys.stderr)
        return 2
    dtype_name = "bf16" if args.device == "cuda" else "fp32"  # the models' dtype: load_vlm's default per device
    rows = check_ops(args.device, dtype_name)
    with tempfile.TemporaryDirectory() as work:
        for label, model_dir in _model_dirs(args.models.split(","), Path(work), dtype_name):
            rows += check_adaptation(model_dir, label, args.device, dtype_name)
    out = Path(args.out or HERE / "results" / f"gpu_smoke_{args.device}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(HERE))
    from common import versions

    libraries = {"torch": "torch", "triton": "triton", "transformers": "transformers"}
    meta = {**versions(args.device, libraries), "dtype": dtype_name}
    failed = False
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["check", "value", "limit", "ok", "seconds", *meta])
        writer.writeheader()
        for row in rows:
            row["ok"] = row["value"] <= row["limit"]
            failed |= not row["ok"]
            writer.writerow({"seconds": "", **row, **meta})
            print(f"{'ok  ' if row['ok'] else 'FAIL'} {row['check']:<50} {row['value']:.3g} (limit {row['limit']})")
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
