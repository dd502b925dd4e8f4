"""Microbenchmark of linear_logprob_entropy: lm_head matmul + log-prob + entropy from hidden states [N, H].

Providers: ``triton`` (ttrv_edge's chunked fused op), ``torch`` (TRL's eager path: full [N, V] logits =
hidden @ W.T, then selective_log_softmax + entropy_from_logits), ``compile`` (torch.compile of the full-logits
math without TRL's loops), ``chunked`` (ttrv_edge's torch fallback: row chunks under activation checkpointing),
``liger`` (Liger's fused linear cross-entropy, reduction="none": log-probs only). By default the weight is frozen,
as with LoRA (``--train-weight`` makes it trainable): peak_MB is the number this op exists for.
GB/s counts one read of hidden and weight (+ bias) for fwd; fwd+bwd adds a second read and the write of d(hidden)
(and d(weight) with --train-weight). The matmuls make this op compute-bound: compare ms and peak_MB, not GB/s.

  python bench/bench_linear_logprob_entropy.py --N 4096,16384 --V 151936 --H 1536 --dtypes bf16
  python bench/bench_linear_logprob_entropy.py --device cpu --providers torch,chunked --N 64 --V 512 --H 32
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    Case,
    base_parser,
    check_args,
    compiled,
    make_pass,
    require_liger,
    require_triton,
    run,
    trl_logprob_entropy,
    vectorized_logprob_entropy,
)

OP = "linear_logprob_entropy"
PROVIDERS = ("triton", "torch", "compile", "chunked", "liger")


def _inputs(n, v, h, dtype, device, pass_, train_weight):
    dt = DTYPES[dtype]
    hidden = torch.randn(n, h, device=device).to(dt).requires_grad_(pass_ == "fwd+bwd")
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dt).requires_grad_(pass_ == "fwd+bwd" and train_weight)
    targets = torch.randint(0, v, (n,), device=device)
    return hidden, weight, targets


def _full_logits_trl(hidden, weight, targets, temperature, seq_len):
    return trl_logprob_entropy(hidden @ weight.t(), targets, temperature, seq_len)


def _full_logits_vectorized(hidden, weight, targets, temperature):
    return vectorized_logprob_entropy(hidden @ weight.t(), targets, temperature)


def _forward(provider, hidden, weight, targets, args):
    T = args.temperature
    if provider == "triton":
        require_triton(args.device)
        from ttrv_edge.kernels.linear_logprob_entropy_triton import triton_linear_logprob_entropy

        return lambda: triton_linear_logprob_entropy(hidden, weight, targets, None, T, chunk_rows=args.chunk_rows)
    if provider == "torch":
        return lambda: _full_logits_trl(hidden, weight, targets, T, args.seq_len)
    if provider == "compile":
        fn = compiled(_full_logits_vectorized)
        return lambda: fn(hidden, weight, targets, T)
    if provider == "chunked":
        from ttrv_edge.kernels import reference

        chunk = args.chunk_rows or reference.DEFAULT_ROW_CHUNK
        return lambda: reference.linear_logprob_entropy(hidden, weight, targets, None, T, chunk_rows=chunk)
    require_liger(args.device)
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    if T != 1.0:
        return lambda: (-flce(weight, hidden / T, targets),)
    return lambda: (-flce(weight, hidden, targets),)


def cases(args):
    for dtype in args.dtypes:
        elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        for v in args.V:
            for h in args.H:
                for n in args.N:
                    for pass_ in args.passes:
                        reads = (n * h + v * h) * elem
                        nbytes = reads + n * 16
                        if pass_ == "fwd+bwd":
                            nbytes += reads + n * h * elem + (v * h * elem if args.train_weight else 0)
                        inputs_for = (0, 1) if args.train_weight else (0,)
                        for provider in args.providers:

                            def build(
                                provider=provider, n=n, v=v, h=h, dtype=dtype, pass_=pass_, inputs_for=inputs_for
                            ):
                                hidden, weight, targets = _inputs(n, v, h, dtype, args.device, pass_, args.train_weight)
                                grads_of = [(hidden, weight)[i] for i in inputs_for]
                                return make_pass(_forward(provider, hidden, weight, targets, args), grads_of, pass_)

                            yield Case(provider, n, v, h, dtype, pass_, build, nbytes)


def main(argv=None):
    parser = base_parser(OP, PROVIDERS, N="1024,4096,16384", V="49280,151936", H="1536")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=512, help="rows per sequence in TRL's row loop")
    parser.add_argument("--chunk-rows", type=int, default=None, help="row chunk of triton/chunked (default: auto)")
    parser.add_argument("--train-weight", action="store_true", help="the lm_head weight requires grad too")
    args = parser.parse_args(argv)
    check_args(args, PROVIDERS)
    return run(OP, cases(args), args)


if __name__ == "__main__":
    main()
