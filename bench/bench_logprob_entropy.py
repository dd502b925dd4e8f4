"""Microbenchmark of logprob_entropy: log-prob of the targets and entropy from [N, V] logits.

Providers: ``triton`` (ttrv_edge's fused kernel), ``torch`` (TRL's eager path: selective_log_softmax +
entropy_from_logits, row loops included), ``compile`` (torch.compile of the same math without the loops),
``liger`` (Liger's cross-entropy kernel with reduction="none": log-probs only, no entropy, so it does less work).
GB/s counts one read of the logits for fwd, and for fwd+bwd one more read plus one write of d(logits).

  python bench/bench_logprob_entropy.py --N 1024,4096,16384 --V 151936 --dtypes bf16
  python bench/bench_logprob_entropy.py --device cpu --providers torch --N 64 --V 512 --dtypes fp32
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

OP = "logprob_entropy"
PROVIDERS = ("triton", "torch", "compile", "liger")


def _inputs(n, v, dtype, device, pass_):
    logits = (torch.randn(n, v, device=device) * 2).to(DTYPES[dtype]).requires_grad_(pass_ == "fwd+bwd")
    targets = torch.randint(0, v, (n,), device=device)
    return logits, targets


def _forward(provider, logits, targets, args):
    if provider == "triton":
        require_triton(args.device)
        from ttrv_edge.kernels.logprob_entropy_triton import triton_logprob_entropy

        return lambda: triton_logprob_entropy(logits, targets, args.temperature)
    if provider == "torch":
        return lambda: trl_logprob_entropy(logits, targets, args.temperature, args.seq_len)
    if provider == "compile":
        fn = compiled(vectorized_logprob_entropy)
        return lambda: fn(logits, targets, args.temperature)
    require_liger(args.device)
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ce = LigerCrossEntropyLoss(reduction="none")
    return lambda: (-ce(logits / args.temperature if args.temperature != 1.0 else logits, targets),)


def cases(args):
    for dtype in args.dtypes:
        elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
        for v in args.V:
            for n in args.N:
                for pass_ in args.passes:
                    nbytes = n * v * elem * (1 if pass_ == "fwd" else 3) + n * 16
                    for provider in args.providers:

                        def build(provider=provider, n=n, v=v, dtype=dtype, pass_=pass_):
                            logits, targets = _inputs(n, v, dtype, args.device, pass_)
                            return make_pass(_forward(provider, logits, targets, args), [logits], pass_)

                        yield Case(provider, n, v, 0, dtype, pass_, build, nbytes)


def main(argv=None):
    parser = base_parser(OP, PROVIDERS, N="1024,4096,16384", V="49280,151936", H="0")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seq-len", type=int, default=512, help="rows per sequence in TRL's row loop")
    args = parser.parse_args(argv)
    check_args(args, PROVIDERS)
    return run(OP, cases(args), args)


if __name__ == "__main__":
    main()
