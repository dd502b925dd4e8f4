"""Shared helpers of the kernel microbenchmarks: arguments, providers, timing, peak memory, CSV and PNG output.

Each ``bench_<op>.py`` script builds its inputs from the shapes given on the command line, times every
(provider, shape, dtype, pass) case and writes rows with the columns ``CSV_COLUMNS`` to ``bench/results/<op>.csv``
plus a PNG plot beside it. Conventions:

- pass "fwd" runs the forward under ``torch.no_grad()`` (as when computing old/reference log-probs); "fwd+bwd"
  runs the forward with grad and ``torch.autograd.grad`` of a scalar built from the outputs.
- ms: median over ``--repeats`` calls after ``--warmup`` calls; on CUDA each call is timed with events after a
  256 MB write that flushes the L2 cache; on CPU with ``time.perf_counter``.
- peak_MB: memory the measured call allocates on top of what existed before it (the inputs are not counted).
  CUDA: ``torch.cuda.max_memory_allocated``; CPU: the running sum of the allocations and frees that
  ``torch.profiler`` records, an approximation (CPU numbers are for testing the scripts, not for conclusions);
  NaN for torch.compile on CPU, whose allocations the profiler does not see.
- GB/s: the op's ideal traffic (each script says what it counts, typically one read of every input and one write
  of every output) divided by the time; for a memory-bound kernel this is the number to hold against the device's
  bandwidth. ``copy_GB/s`` is that bandwidth measured in the same run (a 1 GiB device-to-device ``copy_``, bytes
  read plus written, timed like the cases; 64 MiB on CPU) and ``of_copy`` = GB/s / copy_GB/s.
- every row also names the device and the library versions (``device_name``, ``torch``, ``triton``, ``liger``).
- A provider that cannot run here (Liger not installed, Triton on CPU without ``TRITON_INTERPRET=1``, a compiler
  missing for torch.compile) is skipped with its reason printed; an out-of-memory case is recorded with NaNs; a case
  whose provider raises anything else is printed with the error and left out of the CSV.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

CSV_COLUMNS = ("op", "provider", "N", "V", "H", "dtype", "pass", "ms", "GB/s", "peak_MB")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
L2_FLUSH_BYTES = 256 * 2**20


class Skip(Exception):
    """A provider that cannot run in this environment; the message says why."""


@dataclass
class Case:
    """One measurement: ``build()`` makes the inputs and returns the zero-argument callable to time."""

    provider: str
    N: int
    V: int
    H: int
    dtype: str
    pass_: str
    build: Callable[[], Callable[[], object]]
    nbytes: int


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def base_parser(op: str, providers: Iterable[str], N: str, V: str, H: str) -> argparse.ArgumentParser:
    """Arguments every script shares; shapes are comma-separated lists (their product is benchmarked)."""
    providers = list(providers)
    parser = argparse.ArgumentParser(description=f"Microbenchmark of {op}; writes CSV + PNG under bench/results/.")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"cuda or cpu (default {default_device})")
    parser.add_argument("--dtypes", type=str_list, default=["bf16"], help="comma list of bf16, fp16, fp32")
    parser.add_argument("--providers", type=str_list, default=providers, help=f"comma list of {', '.join(providers)}")
    parser.add_argument("--N", type=int_list, default=int_list(N), help=f"comma list of rows/tokens (default {N})")
    parser.add_argument("--V", type=int_list, default=int_list(V), help=f"comma list of vocabulary sizes (default {V})")
    parser.add_argument("--H", type=int_list, default=int_list(H), help=f"comma list of hidden sizes (default {H})")
    parser.add_argument("--passes", type=str_list, default=list(PASSES), help="comma list of fwd, fwd+bwd")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (the median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{op}.csv", help="CSV path (PNG beside it)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def check_args(args: argparse.Namespace, providers: Iterable[str]) -> None:
    """Argument errors as SystemExit with a message (argparse style)."""
    known = set(providers)
    bad = [p for p in args.providers if p not in known]
    if bad:
        raise SystemExit(f"unknown provider(s) {bad}; choose from {sorted(known)}")
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)}")
    bad = [p for p in args.passes if p not in PASSES]
    if bad:
        raise SystemExit(f"unknown pass(es) {bad}; choose from {PASSES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu)")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")


def require_triton(device: str) -> None:
    if device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Skip("triton needs CUDA (or TRITON_INTERPRET=1 on CPU, very slow)")
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise Skip(f"triton does not import: {exc}") from exc


def require_liger(device: str):
    """The liger_kernel module, or Skip."""
    try:
        import liger_kernel
    except ImportError as exc:
        raise Skip("liger-kernel is not installed") from exc
    if device != "cuda":
        raise Skip("liger-kernel needs CUDA")
    return liger_kernel


def compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``; a compile failure surfaces as Skip at the first (warm-up) call."""
    compiled_fn = torch.compile(fn, dynamic=False)

    def call(*args, **kwargs):
        try:
            return compiled_fn(*args, **kwargs)
        except Exception as exc:  # inductor needs a working C++/Triton toolchain
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            raise Skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc

    return call


def make_pass(forward: Callable[[], tuple], inputs: list[torch.Tensor], pass_: str) -> Callable[[], object]:
    """The callable to time: forward under no_grad, or forward + grad of sum(outputs) w.r.t. ``inputs``."""
    if pass_ == "fwd":

        def run_fwd():
            with torch.no_grad():
                return forward()

        return run_fwd

    def run_fwd_bwd():
        outputs = forward()
        loss = sum(o.float().sum() for o in outputs)
        return torch.autograd.grad(loss, inputs)

    return run_fwd_bwd


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (see the module docstring)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    if device == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn: Callable[[], object], device: str) -> float:
    """MB allocated by one call of ``fn`` above what was allocated before it (see the module docstring)."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop lines) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def error_line(exc: BaseException, limit: int) -> str:
    """``Type: first line of the message`` (the message cut to ``limit`` characters), for a CSV cell or a log line."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:limit]}"


def run_case(case: Case, args: argparse.Namespace, op: str) -> dict | None:
    """Measure one case; None when its provider is skipped (the reason is printed once per provider)."""
    row = {"op": op, "provider": case.provider, "N": case.N, "V": case.V, "H": case.H, "dtype": case.dtype,
           "pass": case.pass_}  # fmt: skip
    try:
        fn = case.build()
        ms = time_ms(fn, args.device, args.warmup, args.repeats)
        # The profiler does not see the allocations of Inductor's CPU code: no CPU peak for compiled providers.
        unseen = args.device != "cuda" and case.provider.startswith("compile")
        mem = math.nan if args.no_memory or unseen else peak_mb(fn, args.device)
    except Skip as exc:
        if case.provider not in _skipped:
            print(f"skip {case.provider}: {exc}")
            _skipped.add(case.provider)
        return None
    except torch.OutOfMemoryError:
        print(f"OOM {case.provider} N={case.N} V={case.V} H={case.H} {case.dtype} {case.pass_}")
        ms = mem = math.nan
    except Exception as exc:  # a provider's own error (a library's API changed, say): reported, the others go on
        print(f"error {case.provider} N={case.N} V={case.V} H={case.H} {case.dtype} {case.pass_}: "
              f"{error_line(exc, 200)}")  # fmt: skip
        return None
    finally:
        if args.device == "cuda":
            torch.cuda.empty_cache()
    row.update({"ms": ms, "GB/s": case.nbytes / (ms * 1e-3) / 1e9 if ms == ms else math.nan, "peak_MB": mem})
    return row


_skipped: set[str] = set()


def write_csv(rows: list[dict], path: Path, columns: Iterable[str] = CSV_COLUMNS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot(rows: list[dict], path: Path, title: str) -> None:
    """ms and peak MB against N, one line per provider/dtype/V/H, one column per pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = [p for p in PASSES if any(r["pass"] == p for r in rows)] or list(PASSES)
    fig, axes = plt.subplots(2, len(passes), figsize=(6 * len(passes), 8), squeeze=False)
    for col, pass_ in enumerate(passes):
        lines: dict[str, list[dict]] = {}
        for r in rows:
            if r["pass"] == pass_:
                lines.setdefault(f"{r['provider']} {r['dtype']} V={r['V']} H={r['H']}", []).append(r)
        for label, points in sorted(lines.items()):
            points.sort(key=lambda r: r["N"])
            for ax, key in zip(axes[:, col], ("ms", "peak_MB"), strict=True):
                ax.plot([p["N"] for p in points], [p[key] for p in points], marker="o", label=label)
        for ax, key in zip(axes[:, col], ("ms", "peak_MB"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N")
            ax.set_ylabel(key)
            ax.set_title(f"{title} {pass_}: {key}")
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


KERNEL_LIBRARIES = {"torch": "torch", "triton": "triton", "liger": "liger-kernel"}
"""CSV column -> distribution whose version a kernel timing depends on."""


def versions(device, libraries: dict[str, str] = KERNEL_LIBRARIES) -> dict:
    """The device's name and the installed versions of ``libraries`` (CSV column -> distribution; "absent" when not
    installed): the columns every benchmark row carries. ``device``: "cuda", "cpu" or a ``torch.device``."""
    import importlib.metadata
    import platform

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    on_cuda = torch.device(device).type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine()
    found = {column: version(dist) for column, dist in libraries.items()}
    if "torch" in found:
        found["torch"] = torch.__version__  # the build too (+cpu, +cu130)
    return {"device_name": name, **found}


def copy_bandwidth(device: str, warmup: int = 3, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy (bytes read + written), timed like the cases: the bandwidth reference."""
    nbytes = 2**30 if device == "cuda" else 2**26
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run(op: str, cases: Iterable[Case], args: argparse.Namespace, analytic=None) -> list[dict]:
    """Measure every case, print a table, write the CSV (and PNG); returns the rows.

    ``analytic(row) -> dict``: extra columns computed from a row's shape (e.g. GEMM count and FLOPs), appended to
    the CSV after the common ones."""
    _skipped.clear()
    torch.manual_seed(args.seed)
    copy_gbps = copy_bandwidth(args.device, args.warmup, args.repeats)
    meta = versions(args.device)
    print(f"{meta['device_name']}: device-to-device copy {copy_gbps:.4g} GB/s (read + write)")
    rows = []
    print(f"{'provider':>14} {'N':>7} {'V':>7} {'H':>5} {'dtype':>5} {'pass':>8} {'ms':>10} {'GB/s':>8} {'peak_MB':>9}")
    for case in cases:
        row = run_case(case, args, op)
        if row is None:
            continue
        if analytic is not None:
            row.update(analytic(row))
        row.update({"copy_GB/s": copy_gbps, "of_copy": row["GB/s"] / copy_gbps, **meta})
        rows.append(row)
        print(f"{row['provider']:>14} {row['N']:>7} {row['V']:>7} {row['H']:>5} {row['dtype']:>5} {row['pass']:>8} "
              f"{row['ms']:>10.4g} {row['GB/s']:>8.3g} {row['peak_MB']:>9.4g}")  # fmt: skip
        extra = [k for k in rows[0] if k not in CSV_COLUMNS]
        write_csv(rows, args.out, (*CSV_COLUMNS, *extra))  # after every case: a run stopped early keeps its rows
    print(f"wrote {args.out}")
    if not args.no_plot and rows:
        png = args.out.with_suffix(".png")
        plot(rows, png, op)
        print(f"wrote {png}")
    return rows


# --- TRL's eager path, the baseline every script compares against -------------------------------------------------
# Re-implemented from TRL's documented behaviour (trl.trainer.utils, GRPOTrainer): log-softmax one sequence at a
# time to cap memory, then gather the targets; entropy from log-softmax over chunks of 128 rows.


def trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's selective_log_softmax: logits [B, T, V], index [B, T] -> [B, T] (row loop for bf16/fp16)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    out = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logp = torch.log_softmax(row_logits, dim=-1)
        out.append(row_logp.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def trl_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's entropy_from_logits: -sum p log p over the last dim, 128 rows at a time."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for chunk in flat.split(chunk_size, dim=0):
        logp = torch.log_softmax(chunk, dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])


def trl_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float, seq_len: int):
    """(logp, entropy) [N] as TRL's GRPOTrainer computes them: divide by T, view rows as [B, seq_len, V]."""
    n, v = logits.shape
    seq = seq_len if n % seq_len == 0 else n
    z = (logits / temperature).view(n // seq, seq, v)
    idx = targets.view(n // seq, seq)
    return trl_selective_log_softmax(z, idx).reshape(n), trl_entropy_from_logits(z).reshape(n)


def vectorized_logprob_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The same math without TRL's memory-capping loops: what torch.compile is given."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)
